"""Local training of many clients of one architecture at once (``simulation.vectorize``).

:func:`train_private_group` gives every node what ``node.train_private(...)`` would:
the same student, optimizer state, generator state and metrics (within float
tolerance). Clients whose students share an architecture, data size, optimizer
settings and step count train as one: each parameter is stacked over the clients,
the forward pass runs per client under :func:`torch.func.vmap`, and one optimizer of
the client's own class steps the stacked parameters. That is the same update because
the optimizers allowed (SGD, Adam, AdamW, RMSprop, Adagrad) act elementwise and the
clients of a group share the step count. Every other node (see :func:`why_not`) trains
by ``node.train_private`` itself.

The shuffles and public picks are drawn from each node's generator in the order
:func:`fedkd.training.train_supervised` draws them, before training starts; nodes are
changed only once their group has finished.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd

from fedkd.client_node import ClientNode
from fedkd.config import Config
from fedkd.contracts import Metrics
from fedkd.losses import KD_LOSSES, LogitMAE, LogitMSE, ProbKL, SoftKL
from fedkd.payloads import Logits, Payload, SoftLabels
from fedkd.seeding import seed_client_round
from fedkd.training import KDTargets, _batches, _step_metrics

log = logging.getLogger("fedkd")

#: optimizers whose update is elementwise given the step count (stacking is exact)
ELEMENTWISE = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
)
#: distillation losses computed per client here (see :func:`_kd_fn`)
KD_MODULES = (SoftKL, ProbKL, LogitMSE, LogitMAE)
_RANDOM = (_DropoutNd, nn.RReLU)  # modules that draw random numbers in training mode
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")

Step = tuple[int, torch.Tensor, torch.Tensor | None]  # (epoch, rows, public picks or None)


def why_not(node: ClientNode, kd: Payload | None = None, *, loss: str | None = None) -> str | None:
    """Why ``node`` cannot train vectorised towards ``kd`` (None: it can).

    ``loss`` is the KD loss name ``train_private`` would get. The reasons are plain
    English, for the runtime to report.
    """
    if node.dpsgd:
        return (
            "its private data is sealed by a training-time privacy mechanism (DP-SGD): "
            "only node.train_private trains on it"
        )
    if node.losses is not None:
        return "it trains with a configured step loss (strategy.losses)"
    if node.augmenter() is not None:
        return "train-time augmentation (data.augment) is on"
    recipe = node.recipe
    if recipe.grad_clip > 0:
        return "gradient clipping (clients.grad_clip) is on"
    if recipe.amp:
        return "bfloat16 autocast (amp) is on"
    if kd is not None:
        if not isinstance(kd, (Logits, SoftLabels)):
            return f"its targets are {type(kd).__name__}, not Logits or SoftLabels"
        name = loss or ("prob_kl" if isinstance(kd, SoftLabels) else "soft_kl")
        if name not in KD_LOSSES or KD_LOSSES.get(name) not in KD_MODULES:
            return f"the KD loss {name!r} has no per-client form here"
    return _model_reason(node.model) or _optimizer_reason(node)


def _model_reason(model: nn.Module) -> str | None:
    """Why the student cannot run stacked (None: it can)."""
    if next(model.buffers(), None) is not None:
        return "the student has buffers (e.g. BatchNorm running statistics)"
    for name, m in model.named_modules():
        where = f"model.{name}" if name else "model"
        if isinstance(m, _RANDOM):
            return f"{where} ({type(m).__name__}) draws random numbers in training"
        if isinstance(m, _NormBase):
            return f"{where} ({type(m).__name__}) normalises over each client's batch"
        if any(getattr(m, h, None) for h in _HOOKS):
            return f"{where} has hooks"
    return None


def _optimizer_reason(node: ClientNode) -> str | None:
    """Why the node's optimizer cannot step stacked parameters (None: it can)."""
    opt = node.optimizer
    if type(opt) not in ELEMENTWISE:
        return f"its optimizer {type(opt).__name__} is not one of the elementwise built-ins"
    if len(opt.param_groups) != 1:
        return "its optimizer has more than one parameter group"
    params = list(node.model.parameters())
    group = opt.param_groups[0]["params"]
    if len(group) != len(params) or any(a is not b for a, b in zip(group, params, strict=True)):
        return "its optimizer does not train exactly the student's parameters"
    if opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks:
        return "its optimizer has hooks"
    return None


def _shared(key: str, value: Any) -> bool:
    """Whether an optimizer state entry is shared by a group (the step count, flags)
    rather than one tensor per parameter, stacked over the clients."""
    return key == "step" or not isinstance(value, torch.Tensor)


def _plain(value: Any) -> Any:
    """A hashable, comparable stand-in for a state or hyperparameter value."""
    if isinstance(value, torch.Tensor):
        return (str(value.dtype), tuple(value.shape), tuple(value.flatten().tolist()))
    return repr(value)


def _group_key(node: ClientNode) -> tuple[Any, ...]:
    """What clients must share to train as one (architecture, data size, optimizer
    settings and step counts, recipe, epochs, batch size, device)."""
    model, opt = node.model, node.optimizer
    group = opt.param_groups[0]
    x, y = node.private_data()
    return (
        type(model),
        repr(model),
        tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in model.named_parameters()),
        tuple(x.shape),
        x.dtype,
        y.dtype,
        tuple(node.public_x.shape),
        node.public_x.dtype,
        type(opt),
        tuple(sorted((k, _plain(v)) for k, v in group.items() if k != "params")),
        tuple(
            tuple(sorted((k, _plain(v) if _shared(k, v) else "*") for k, v in opt.state[p].items()))
            if p in opt.state
            else ()
            for p in group["params"]
        ),
        node.settings.local_epochs,
        node.settings.batch_size,
        repr(node.recipe),
        str(node.device),
    )


def train_private_group(
    nodes: Sequence[ClientNode],
    *,
    kd: Logits | SoftLabels | None = None,
    kd_weight: float = 0.0,
    temperature: float = 1.0,
    loss: str | None = None,
) -> list[Metrics]:
    """``node.train_private(kd=kd, kd_weight=kd_weight, temperature=temperature,
    loss=loss)`` for each node, vectorised over groups of clients that can train as one.

    Returns each node's metrics, in order, with ``"vectorized"``: 1.0 where the node
    trained in a group, 0.0 where it trained alone (a singleton group, an ineligible
    node, see :func:`why_not`, or a group whose student failed under ``vmap``: logged).
    Nodes that train alone do so in their input order, each from the global generators
    seeded as for its own round (:func:`fedkd.seeding.seed_client_round`), so the global
    random numbers they draw (e.g. dropout) are the per-client path's wherever the
    strategy's ``setup`` draws none.
    """
    groups: dict[Any, list[int]] = {}
    for i, node in enumerate(nodes):
        key = ("alone", i) if why_not(node, kd, loss=loss) else _group_key(node)
        groups.setdefault(key, []).append(i)
    out: list[Metrics | None] = [None] * len(nodes)
    for members in groups.values():
        if len(members) > 1:
            group = [nodes[i] for i in members]
            try:
                metrics = _train_group(group, kd, kd_weight, temperature, loss)
            except Exception as err:  # raised before any node changed: train them alone
                log.warning("%d clients could not train vectorised (%s)", len(group), err)
                continue
            for i, m in zip(members, metrics, strict=True):
                out[i] = {**m, "vectorized": 1.0}
    for i, node in enumerate(nodes):
        if out[i] is None:  # from the global generators its own round would start with
            seed_client_round(node.seed, node.round, node.cid)
            m = node.train_private(kd=kd, kd_weight=kd_weight, temperature=temperature, loss=loss)
            out[i] = {**m, "vectorized": 0.0}
    return [m for m in out if m is not None]


def _draws(node: ClientNode, n: int, kd_rows: int | None) -> tuple[list[Step], torch.Generator]:
    """Every step's shuffled rows and public picks (``kd_rows`` targets; None: no KD
    term), drawn as :func:`fedkd.training.train_supervised` would, from a copy of the
    node's generator (returned, to be the node's once training is done)."""
    g = torch.Generator(device=node.generator.device)
    g.set_state(node.generator.get_state())
    steps: list[Step] = []
    for epoch in range(node.settings.local_epochs):
        for rows in _batches(n, node.settings.batch_size, g):
            pick = None if kd_rows is None else torch.randint(kd_rows, (len(rows),), generator=g)
            steps.append((epoch, rows, pick))
    return steps, g


def _kd_fn(kd_loss: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``kd_loss`` as a per-client function that vmap batches. ``F.kl_div`` has no vmap
    batching rule (vmap would loop over the clients), so the KL losses are written out
    as ``kl_div``'s own formula with the same ``batchmean`` reduction."""
    if type(kd_loss) in (LogitMSE, LogitMAE):
        return kd_loss
    t, probs = kd_loss.temperature, type(kd_loss) is ProbKL

    def kl(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(student / t, dim=-1)
        if probs:  # kl_div(log_p, q) = q * (log q - log_p), 0 where q = 0
            pointwise = torch.xlogy(target, target) - target * log_p
        else:  # log_target: kl_div(log_p, log_q) = q * (log_q - log_p)
            log_q = F.log_softmax(target / t, dim=-1)
            pointwise = log_q.exp() * (log_q - log_p)
        return pointwise.sum() / student.shape[0] * t * t

    return kl


def _client_losses(
    model: nn.Module, smoothing: float, kd_loss: nn.Module | None, kd_weight: float
) -> Callable[..., torch.Tensor]:
    """One client's (loss, CE, KD) of a step as one tensor, from its parameters, batch
    and public batch with targets: what :func:`fedkd.training._supervised_losses` gives."""
    kd_fn = None if kd_loss is None else _kd_fn(kd_loss)

    def losses(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, *pub: Any):
        ce = F.cross_entropy(functional_call(model, params, (x,)), y, label_smoothing=smoothing)
        if kd_fn is None:
            return torch.stack([ce, ce, torch.zeros_like(ce)])
        kd_term = kd_fn(functional_call(model, params, (pub[0],)), pub[1])
        return torch.stack([(1 - kd_weight) * ce + kd_weight * kd_term, ce, kd_term])

    return losses


def _stack_state(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One parameter's optimizer state over the clients: per-parameter tensors stacked,
    shared entries (the step count, equal within a group) copied from the first."""
    out: dict[str, Any] = {}
    for k, v in states[0].items():
        if not _shared(k, v):
            out[k] = torch.stack([s[k] for s in states])
        else:
            out[k] = v.clone() if isinstance(v, torch.Tensor) else v
    return out


def _slice_state(state: dict[str, Any], i: int) -> dict[str, Any]:
    """Client ``i``'s own copy of one stacked parameter's optimizer state."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        if not _shared(k, v):
            out[k] = v[i].clone()
        else:
            out[k] = v.clone() if isinstance(v, torch.Tensor) else v
    return out


def _stacked_optimizer(nodes: Sequence[ClientNode], leaves: list[torch.Tensor]) -> Any:
    """One optimizer of the nodes' class and settings over the stacked ``leaves``, with
    the nodes' own state, stacked."""
    first = nodes[0].optimizer
    settings = {k: v for k, v in first.param_groups[0].items() if k != "params"}
    opt = type(first)([{**settings, "params": leaves}])
    opt.state.clear()  # e.g. Adagrad fills its state on construction
    for j, leaf in enumerate(leaves):
        states = [n.optimizer.state.get(n.optimizer.param_groups[0]["params"][j]) for n in nodes]
        if states[0]:  # the group key makes every node's state alike
            opt.state[leaf] = _stack_state(states)  # type: ignore[arg-type]
    return opt


def _write_back(nodes: Sequence[ClientNode], leaves: list[torch.Tensor], opt: Any) -> None:
    """Each client's slice of the stacked parameters, gradients and optimizer state
    into its own student and optimizer (in torch's own state format)."""
    settings = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    with torch.no_grad():
        for i, node in enumerate(nodes):
            mine = node.optimizer
            mine.param_groups[0].update(settings)  # e.g. the rate a schedule set
            for p, leaf in zip(mine.param_groups[0]["params"], leaves, strict=True):
                p.copy_(leaf[i])
                if leaf.grad is not None:  # the last step's, as train_supervised leaves it
                    p.grad = leaf.grad[i].clone()
                if leaf in opt.state:
                    mine.state[p] = _slice_state(opt.state[leaf], i)


Feed = Callable[[torch.Tensor, "torch.Tensor | None"], list[torch.Tensor]]


def _feeder(data: list[tuple[torch.Tensor, torch.Tensor]], targets: list[KDTargets]) -> Feed:
    """A step's per-client arguments (batch, labels[, public batch, targets]), stacked,
    from the stacked rows and public picks (``[clients, batch]`` each)."""
    x, y = torch.stack([d[0] for d in data]), torch.stack([d[1] for d in data])
    clients = torch.arange(len(data), device=x.device)[:, None]
    public, shared = None, True
    if targets:  # one copy of the public inputs when every node holds the same
        shared = all(t is targets[0] or torch.equal(t.x, targets[0].x) for t in targets[1:])
        public = targets[0].x if shared else torch.stack([t.x for t in targets])

    def feed(rows: torch.Tensor, pick: torch.Tensor | None) -> list[torch.Tensor]:
        rows = rows.to(x.device)
        args = [x[clients, rows], y[clients, rows]]
        if pick is not None and public is not None:
            pick = pick.to(x.device)
            args += [public[pick] if shared else public[clients, pick], targets[0].logits[pick]]
        return args

    return feed


def _train_group(
    nodes: Sequence[ClientNode],
    kd: Logits | SoftLabels | None,
    kd_weight: float,
    temperature: float,
    loss: str | None,
) -> list[Metrics]:
    """``train_private`` for the nodes of one group, as one stacked model."""
    first, recipe, epochs = nodes[0], nodes[0].recipe, nodes[0].settings.local_epochs
    data = [node.private_data() for node in nodes]
    targets = _kd_targets(nodes, kd, temperature, loss) if kd is not None else []
    use_kd = bool(targets) and kd_weight > 0
    kd_rows = len(targets[0].logits) if use_kd else None
    plans = [_draws(node, len(y), kd_rows) for node, (_, y) in zip(nodes, data, strict=True)]
    for node in nodes:
        node.model.train()
    names = [name for name, _ in first.model.named_parameters()]
    leaves = [
        torch.stack([p.detach() for p in ps]).requires_grad_(ps[0].requires_grad)
        for ps in zip(*(node.model.parameters() for node in nodes), strict=True)
    ]
    opt = _stacked_optimizer(nodes, leaves)
    kd_loss = targets[0].loss if use_kd else None
    losses = vmap(_client_losses(first.model, recipe.label_smoothing, kd_loss, kd_weight))
    feed = _feeder(data, targets if use_kd else [])
    totals = torch.zeros(len(nodes), 3, dtype=torch.float64, device=leaves[0].device)
    steps, lr = len(plans[0][0]), None
    for s in range(steps):
        lr = recipe.set_lr(opt, epoch=plans[0][0][s][0], epochs=epochs, step=s, steps=steps)
        rows = torch.stack([draws[s][1] for draws, _ in plans])
        pick = torch.stack([draws[s][2] for draws, _ in plans]) if use_kd else None  # type: ignore[misc]
        values = losses(dict(zip(names, leaves, strict=True)), *feed(rows, pick))
        opt.zero_grad(set_to_none=True)
        values[:, 0].sum().backward()  # the clients are independent: each its own gradient
        opt.step()
        totals += values.detach().double()  # as train_supervised's sums of .item()
    _write_back(nodes, leaves, opt)
    for node, (_, g) in zip(nodes, plans, strict=True):
        node.generator.set_state(g.get_state())
    return [_metrics(node, row, steps, lr) for node, row in zip(nodes, totals, strict=True)]


def _kd_targets(
    nodes: Sequence[ClientNode], kd: Logits | SoftLabels, temperature: float, loss: str | None
) -> list[KDTargets]:
    """Each node's KD targets; built once for nodes that hold the same public inputs (the
    runtime gives every node a view of one array), not once per node."""
    built: dict[tuple[Any, ...], KDTargets] = {}
    out = []
    for node in nodes:
        x = node.public_x
        key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, str(x.device))
        if key not in built:
            built[key] = node.kd_targets(kd, temperature, loss)
        out.append(built[key])
    return out


def _metrics(node: ClientNode, totals: torch.Tensor, steps: int, lr: float | None) -> Metrics:
    """A node's metrics as ``train_on`` reports them (``train_supervised``'s means)."""
    loss, ce, kd = totals.tolist()
    return node._kept(None, _step_metrics({"loss": loss, "ce": ce, "kd": kd}, steps, lr))


def start_notes(config: Config, data_path: str) -> list[str]:
    """Where ``simulation.vectorize`` is on, why some clients will train one at a time,
    said before the run (the per-client ``train_vectorized`` metric says who did): a
    strategy without a group path, a client :func:`why_not` refuses, or a private-set
    size no other client of its kind shares."""
    from fedkd.assignment import clients_per_message, student_spec
    from fedkd.client import ClientRuntime
    from fedkd.state_store import MemoryStateStore

    if not config.simulation.vectorize:
        return []
    if clients_per_message(config, 2) == 1:
        return ["simulation.clients_per_message = 1: each message carries one client"]
    runtime = ClientRuntime(config, data_path, MemoryStateStore())
    kinds: dict[tuple[str, str], list[int]] = {}
    for cid in range(config.clients.count):
        strategy, params = runtime.strategy_of(cid)
        label = f"{strategy.__name__} client(s) on {student_spec(config, cid)}"
        kinds.setdefault((label, repr(params)), []).append(cid)
    notes = []
    for (label, _), cids in kinds.items():
        who = f"{len(cids)} {label} (e.g. client {cids[0]})"
        strategy, node = runtime.fresh_node(cids[0])
        why = None if type(strategy).trains_in_groups() else "the strategy has no train_group"
        why = why or why_not(node)
        if why:
            notes.append(f"{who} train one at a time: {why}")
            continue
        sizes = Counter(len(runtime.data.client(c).y) for c in cids)
        alone = sum(n for n in sizes.values() if n == 1)
        if alone:
            notes.append(
                f"{alone} of {who} have a private-set size no other of them has: they train "
                "one at a time (an iid or shard partition gives equal sizes)"
            )
    return notes
