"""The seal on private data under DP-SGD, and the preflight that refuses before round 1.

Every way a client strategy can reach its private data is either privatised (DP-SGD
ran: the accountant grew) or refused with ``PrivacyError`` before any step on it;
never run in the clear. Without a training-time mechanism nothing changes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import pickle
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedkd.config import ConfigError, load_config
from fedkd.data import prepare_federated_data
from fedkd.payloads import Logits, Payload
from fedkd.privacy import guard
from fedkd.privacy.accounting import PrivacyError, accountant_epsilon
from fedkd.privacy.dpsgd import HISTORY_KEY, dp_train
from fedkd.privacy.preflight import preflight
from fedkd.strategy import ClientNode, ClientStrategy, Metrics, ServerNode, ServerStrategy
from fedkd.training import make_optimizer, train_supervised
from strategies.kd import KDClient
from tests.conftest import SMALL
from tests.test_strategies import BASE, D, blobs, make_client
from tests.test_strategies import C as CLASSES

ROOT = Path(__file__).resolve().parents[1]
HERE = "tests.test_privacy_guard"


def _cfg(mechanism: str = "dpsgd", *extra: str):
    return load_config(
        None, [*BASE, "clients.models=['mlp']", f"privacy.mechanism={mechanism}", *extra]
    )


def _node(mechanism: str = "dpsgd", strategy: str = "the client strategy"):
    """A client built as fedkd.client builds one (privacy set when a mechanism is on)."""
    cfg = _cfg(mechanism)
    privacy = cfg.privacy if mechanism != "none" else None
    return make_client(cfg, 0, privacy=privacy, strategy_name=strategy)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _run(strategy: ClientStrategy, node: ClientNode) -> None:
    strategy.setup(node)
    strategy.train(node, None)
    strategy.predict(node, np.arange(8))


def _private_rows_in(seen: list[torch.Tensor]) -> bool:
    """Whether any tensor a spy saw holds a row of the private inputs (blobs seed 1000)."""
    x, _ = blobs(48, seed=1000)
    for t in seen:
        if t.is_floating_point() and t.dim() >= 1 and t.shape[-1] == D:
            rows = t.detach().reshape(-1, D)
            if (rows[:, None, :] == x[None]).all(-1).any():
                return True
    return False


def _epsilon(node: ClientNode) -> float:
    history = node.dp_history()
    return accountant_epsilon(history, 1e-5) if history else 0.0


# --- client strategies: every route to the private data ---------------------------------


class Base(ClientStrategy):
    def train(self, node: ClientNode, targets: Payload | None) -> Metrics:
        return {}

    def predict(self, node: ClientNode, public_idx: np.ndarray) -> Payload:
        return Logits(public_idx, node.public_logits(public_idx))


class TrainPrivate(Base):
    """(a) the sanctioned path."""

    def train(self, node, targets):
        return node.train_private(epochs=1)


class TrainOnX(Base):
    """(a) node.train_on on the private tensors themselves."""

    def train(self, node, targets):
        return node.train_on(node.x, node.y)


class TrainOnClone(Base):
    """(a) node.train_on on a copy of them."""

    def train(self, node, targets):
        return node.train_on(node.x.clone(), node.y.clone())


class ClassMeans(Base):
    """(a) per-class means of the private samples (FD's payload)."""

    def predict(self, node, public_idx):
        return node.class_mean_logits()


class OwnLoop(Base):
    """(b) its own loop and optimizer over the private data."""

    def train(self, node, targets):
        opt = torch.optim.SGD(node.model.parameters(), lr=0.5)
        for xb, yb in zip(node.x.split(8), node.y.split(8), strict=True):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(node.model(xb), yb).backward()
            opt.step()
        return {}


class StashInSetup(Base):
    """(c) keep the tensors from setup in node.state, train on them later."""

    def setup(self, node):
        node.state["mine"] = (node.x, node.y)

    def train(self, node, targets):
        x, y = node.state["mine"]
        return node.train_on(x, y)


class AsDict(Base):
    """(c) dataclasses.asdict(node), which reads every field."""

    def train(self, node, targets):
        fields = dataclasses.asdict(node)
        return node.train_on(fields["x"], fields["y"])


class Internal(Base):
    """(c) the runtime's own accessor."""

    def train(self, node, targets):
        return node.train_on(*node.private_data())


class Store(Base):
    """(c) the guard's store of sealed values."""

    def train(self, node, targets):
        return node.train_on(guard.stored(node, "x"), guard.stored(node, "y"))


class Unseal(Base):
    """(c) switch the mechanism off, then read."""

    def train(self, node, targets):
        node.privacy = None
        return node.train_on(node.x, node.y)


class Weaken(Base):
    """Keep DP-SGD, with almost no noise."""

    def train(self, node, targets):
        node.privacy = dataclasses.replace(node.privacy, noise_multiplier=1e-6)
        return node.train_private()


class WholeBatch(Base):
    """Keep DP-SGD, with a sample rate of 1 (the ledger assumes clients.batch_size)."""

    def train(self, node, targets):
        node.settings = dataclasses.replace(node.settings, batch_size=10**6)
        return node.train_private()


SEEN: list[torch.Tensor] = []


class ForwardHook(Base):
    """(c) watch the private batches through a hook while DP-SGD trains."""

    def setup(self, node):
        node.model.register_forward_pre_hook(lambda m, args: SEEN.append(args[0]))

    def train(self, node, targets):
        return node.train_private()


class ParamHook(Base):
    """(c) the un-noised batch gradient through a parameter hook."""

    def train(self, node, targets):
        next(node.model.parameters()).register_hook(lambda g: SEEN.append(g))
        return node.train_private()


class Spy(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        SEEN.append(x)
        return self.inner(x)


class WrapModel(Base):
    """(c) a student wrapped in a module that records its inputs."""

    def train(self, node, targets):
        node.model = Spy(node.model)
        return node.train_private()


class PatchForward(Base):
    """(c) a per-instance forward that records its inputs."""

    def train(self, node, targets):
        inner = node.model.forward
        node.model.forward = lambda x: (SEEN.append(x), inner(x))[1]
        return node.train_private()


class SavedTensors(Base):
    """(c) autograd's saved tensors (the layer inputs) during DP-SGD."""

    def train(self, node, targets):
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: (SEEN.append(t), t)[1], lambda t: t
        ):
            return node.train_private()


class FunctionMode(Base):
    """(c) every torch call's arguments during DP-SGD."""

    def train(self, node, targets):
        from torch.overrides import TorchFunctionMode

        class Watch(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                SEEN.extend(a for a in args if isinstance(a, torch.Tensor))
                return func(*args, **(kwargs or {}))

        with Watch():
            return node.train_private()


class PublicOnly(Base):
    """Public data is free: distillation and supervised steps on the public set."""

    def train(self, node, targets):
        idx = np.arange(16)
        node.distill_public(Logits(idx, node.public_logits(idx) * 2), epochs=1)
        return node.train_on(node.public_x, node.public_y, epochs=1)


class DirectDPTrain(Base):
    """fedkd.privacy.dpsgd.dp_train called directly: the node's own settings apply."""

    def train(self, node, targets):
        return dp_train(node, epochs=1)


class CatchAndGoOn(Base):
    """Catching the refusal yields nothing; training then goes through DP-SGD."""

    def train(self, node, targets):
        with contextlib.suppress(PrivacyError):
            node.train_on(node.x, node.y)
        return node.train_private(epochs=1)


class ForgetsHistory(Base):
    """Rewrites the accountant history it can see."""

    def train(self, node, targets):
        out = node.train_private(epochs=1)
        node.state[HISTORY_KEY] = []
        return out


class LateReader(Base):
    """Reads node.x only from round 3: out of the preflight's reach."""

    def train(self, node, targets):
        if node.round >= 3:
            return node.train_on(node.x, node.y)
        return node.train_private(epochs=1)


class Dice(TrainPrivate):
    """Draws from the global random generators (which the preflight must restore)."""

    def train(self, node, targets):
        torch.rand(3), np.random.rand(3), random.random()
        return super().train(node, targets)


class ClearServer(ServerStrategy):
    """A server strategy whose clients train in the clear by default."""

    client_strategy = OwnLoop
    uses_teacher = False

    def aggregate(self, server: ServerNode, payloads: dict[int, Payload]) -> Payload | None:
        return None


# (strategy, what the one-line refusal names)
REFUSED = [
    (TrainOnX, "TrainOnX.train read node.x"),
    (TrainOnClone, "TrainOnClone.train read node.x"),
    (ClassMeans, "ClassMeans.predict: per-class means"),
    (OwnLoop, "OwnLoop.train read node.x"),
    (StashInSetup, "StashInSetup.setup read node.x"),
    (AsDict, "AsDict.train read node.x"),
    (Internal, r"Internal.train read node.private_data\(\)"),
    (Store, "Store.train read the stored node.x"),
    (Unseal, "Unseal.train changed node.privacy"),
    (Weaken, "Weaken.train changed node.privacy"),
    (WholeBatch, "WholeBatch.train changed node.settings"),
    (ForwardHook, "ForwardHook.train asked for DP-SGD .* with hooks on node.model"),
    (ParamHook, r"ParamHook.train asked for DP-SGD .* with hooks on node.model.*\.weight"),
    (WrapModel, "WrapModel.train asked for DP-SGD .* node.model of class Spy"),
    (PatchForward, "PatchForward.train asked for DP-SGD .* a patched call on node.model"),
    (SavedTensors, "SavedTensors.train asked for DP-SGD .* saved-tensor hooks"),
    (FunctionMode, "FunctionMode.train asked for DP-SGD .* a torch function or dispatch mode"),
]


@pytest.mark.parametrize(("cls", "names"), REFUSED, ids=[c.__name__ for c, _ in REFUSED])
def test_every_clear_route_is_refused_before_any_step(cls, names):
    node = _node()
    before = _weights(node.model)
    SEEN.clear()
    with pytest.raises(PrivacyError, match=names) as err:
        _run(cls(), node)
    message = str(err.value)
    assert "\n" not in message and "'dpsgd'" in message
    inner = node.model.inner if isinstance(node.model, Spy) else node.model
    assert _same(_weights(inner), before), "the student moved before the refusal"
    assert not _private_rows_in(SEEN)  # no spy saw a private input
    assert node.dp_history() is None  # no DP-SGD step was taken
    assert node.sealed  # still sealed afterwards


def test_patched_torch_classes_are_refused(monkeypatch):
    """Patching a layer's or the optimizer's class (process-wide) is caught too."""
    node = _node()
    before = _weights(node.model)
    seen: list[torch.Tensor] = []
    forward = torch.nn.Linear.forward
    spy = lambda self, x: (seen.append(x), forward(self, x))[1]  # noqa: E731
    monkeypatch.setattr(torch.nn.Linear, "forward", spy)
    with pytest.raises(PrivacyError, match="with a patched Linear.forward, which could see"):
        node.train_private()
    monkeypatch.undo()
    step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, closure=None: step(self, closure))
    with pytest.raises(PrivacyError, match="with a patched Adam.step, which could see"):
        node.train_private()
    monkeypatch.undo()
    assert not _private_rows_in(seen) and _same(_weights(node.model), before)
    node.train_private(epochs=1)  # unpatched again: DP-SGD runs
    assert _epsilon(node) > 0


def test_the_refusal_says_what_to_do():
    with pytest.raises(PrivacyError) as err:
        _run(OwnLoop(), _node())
    assert str(err.value) == (
        "OwnLoop.train read node.x under privacy.mechanism = 'dpsgd': private data is sealed; "
        "train on it with node.train_private(...), which runs DP-SGD, or use "
        "privacy.mechanism = 'client_gaussian'"
    )
    node = _node(strategy="MyClient")  # outside any strategy method: the node's strategy_name
    with pytest.raises(PrivacyError, match="^MyClient read node.y under"):
        _ = node.y


@pytest.mark.parametrize("cls", [TrainPrivate, DirectDPTrain, CatchAndGoOn])
def test_sanctioned_routes_run_dp_sgd(cls):
    node = _node()
    before = _weights(node.model)
    _run(cls(), node)
    history = node.dp_history()
    assert history and history[-1][0] == 1.0  # the configured noise multiplier
    assert sum(h[2] for h in history) > 0 and _epsilon(node) > 0
    assert node.state[HISTORY_KEY] == history
    assert not _same(_weights(node.model), before)  # it did train


def test_hooks_the_student_was_built_with_are_kept():
    """A model may come with its own hooks (e.g. from a registered user model)."""
    node = _node("none")
    node.model.register_forward_pre_hook(lambda m, args: None)
    node = dataclasses.replace(node, privacy=_cfg().privacy)  # built with the hook
    TrainPrivate().train(node, None)
    assert _epsilon(node) > 0


def test_public_data_stays_free_under_dpsgd():
    node = _node()
    before = _weights(node.model)
    _run(PublicOnly(), node)
    assert not _same(_weights(node.model), before)
    assert node.dp_history() is None  # no budget spent on public data
    assert node.num_examples == 48  # a count is not private data


def test_the_runtime_keeps_the_accountant_history():
    node = _node()
    _run(ForgetsHistory(), node)
    assert node.state[HISTORY_KEY] == []  # what the strategy wrote ...
    assert node.dp_history() and _epsilon(node) > 0  # ... is not what the runtime reports


def test_introspection_finds_no_private_tensor():
    """vars(), dir() + getattr, copies and pickles of a sealed node hold no private data."""
    node = _node("none")
    x, y = node.x, node.y
    node.privacy = _cfg().privacy  # seal it now, as tests/test_privacy.py does

    def private(value: object) -> bool:
        return isinstance(value, torch.Tensor) and any(
            value.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in (x, y)
        )

    def values(obj: object) -> list[object]:
        out = []
        for name in {*dir(obj), *vars(obj)}:
            try:
                out.append(getattr(obj, name))
            except (PrivacyError, AttributeError):
                continue
        return out

    found = values(node)
    found += [v for d in (vars(node), node.state) for v in d.values()]
    assert not any(private(v) for v in found)
    for name in ("_x", "_y", "_data", "__x"):
        assert not hasattr(node, name)
    for clone in (copy.copy, copy.deepcopy, pickle.dumps, dataclasses.asdict):
        with pytest.raises(PrivacyError, match="under privacy.mechanism = 'dpsgd'"):
            clone(node)
    assert x.numpy().tobytes() not in pickle.dumps({k: v for k, v in vars(node).items()})


def test_unsealed_nodes_copy_as_before():
    node = _node("none")
    for twin in (copy.copy(node), copy.deepcopy(node), pickle.loads(pickle.dumps(node))):
        assert torch.equal(twin.x, node.x) and torch.equal(twin.y, node.y)
        assert twin.num_examples == node.num_examples and twin.privacy is None
    assert copy.copy(node).x is node.x


def test_train_on_refuses_private_tensors_however_obtained():
    """Belt and braces: tensors reached around the seal (here through the guard's private
    store, a deliberate bypass) are still refused by train_on, views included."""
    node = _node()
    x, y = guard._STORE[node]["x"], guard._STORE[node]["y"]
    before = _weights(node.model)
    for xs, ys in ((x, y), (x[:10], y[:10]), (x.view(48, D), y)):
        with pytest.raises(PrivacyError, match=r"read the private data \(in train_on\)"):
            node.train_on(xs, ys)
    assert _same(_weights(node.model), before)


def test_paths_the_preflight_cannot_reach_fail_at_run_time():
    node = _node()
    _run(LateReader(), node)  # rounds 1-2: DP-SGD only
    node.round = 3
    before = _weights(node.model)
    with pytest.raises(PrivacyError, match="LateReader.train read node.x"):
        LateReader().train(node, None)
    assert _same(_weights(node.model), before)


@pytest.mark.parametrize("mechanism", ["none", "client_gaussian"])
def test_no_seal_without_a_training_time_mechanism(mechanism):
    node = _node(mechanism)
    x, y = blobs(48, seed=1000)
    assert not node.sealed and not guard.sealed(node.privacy)
    assert torch.equal(node.x, x) and torch.equal(node.y, y)
    _run(OwnLoop(), node)  # its own loop is the user's business here
    node = _node(mechanism)
    node.train_on(node.x, node.y)
    assert isinstance(node.class_mean_logits().means, np.ndarray)
    node.privacy = None  # settings may change freely
    assert guard.sealed(_cfg().privacy) and not guard.sealed(None)


def test_numbers_without_a_seal_are_the_plain_training_loop():
    """train_private under mechanism none is exactly train_supervised on (x, y)."""
    from fedkd.models import build_model

    node = _node("none")
    node.train_private()
    cfg = _cfg("none")
    model = build_model(cfg.clients.models[0], (D,), CLASSES, seed=0)
    opt = make_optimizer(cfg.clients.optimizer, model, cfg.clients.lr)
    x, y = blobs(48, seed=1000)
    train_supervised(
        model,
        opt,
        x,
        y,
        epochs=cfg.clients.local_epochs,
        batch_size=cfg.clients.batch_size,
        generator=torch.Generator().manual_seed(0),
    )
    assert _same(_weights(node.model), _weights(model))


# --- preflight ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDKD_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        federated, _ = prepare_federated_data(load_config(None, SMALL))
    return federated


def _small(*extra: str):
    return load_config(None, [*SMALL, "privacy.mechanism=dpsgd", *extra])


@pytest.mark.parametrize(
    "cls", [OwnLoop, TrainOnClone, StashInSetup, AsDict, Internal, ForwardHook, WrapModel]
)
def test_preflight_refuses_a_per_client_strategy(data, cls):
    cfg = _small(f'clients.strategies={{"1-2" = "{HERE}:{cls.__name__}"}}')
    with pytest.raises(ConfigError) as err:
        preflight(cfg, data)
    assert err.value.field == "clients.strategies.1-2"
    assert f"client strategy {cls.__name__} cannot run under privacy.mechanism = 'dpsgd'" in str(
        err.value
    )
    assert "no privacy budget" in str(err.value) and "\n" not in str(err.value)


def test_preflight_refuses_a_default_client_strategy(data):
    with pytest.raises(ConfigError, match="OwnLoop.train read node.x") as err:
        preflight(_small(f"strategy.name={HERE}:ClearServer"), data)
    assert err.value.field == "privacy.mechanism"


def test_preflight_refuses_fd_which_shares_per_class_means(data):
    with pytest.raises(ConfigError, match="FDClient.train: per-class means") as err:
        preflight(_small("strategy.name=fd"), data)
    assert err.value.field == "privacy.mechanism"


@pytest.mark.parametrize(
    "name", ["kd", "fedmd", "dsfl", "feddf", "fedavg", "cfd", "cronus", "local"]
)
def test_preflight_passes_the_built_in_strategies(data, name):
    extra = ["clients.models=['mlp']"] if name == "fedavg" else []
    preflight(_small(f"strategy.name={name}", *extra), data)


def test_preflight_passes_late_readers_and_is_off_without_a_seal(data):
    preflight(_small(f'clients.strategies={{"0" = "{HERE}:LateReader"}}'), data)
    for mechanism in ("none", "client_gaussian"):
        cfg = load_config(
            None,
            [*SMALL, f"strategy.name={HERE}:ClearServer", f"privacy.mechanism={mechanism}"],
        )
        preflight(cfg, data)  # the seal is off: nothing to refuse


def test_preflight_leaves_global_randomness_alone_and_is_quick(data):
    cfg = load_config(ROOT / "simulations" / "quickstart.toml", [*SMALL, "privacy.mechanism=dpsgd"])
    cfg = load_config(cfg, [f'clients.strategies={{"0" = "fedmd", "1" = "{HERE}:Dice"}}'])
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    preflight(cfg, data)  # warm: imports and the first optimizer are one-off costs
    start = time.perf_counter()
    preflight(cfg, data)
    assert time.perf_counter() - start < 1.0
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]


# --- the server side: central noise and PATE -----------------------------------------------


class SpyMeanServer(ServerStrategy):
    """A server strategy that tries to look at raw client payloads."""

    client_strategy = KDClient
    accepts = (Logits,)

    def aggregates_by_mean(self) -> bool:
        return True

    def check_payload(self, server: ServerNode, cid: int, payload: Payload) -> None:
        server.state.setdefault("checked", []).append(cid)

    def aggregate(self, server: ServerNode, payloads: dict[int, Payload]) -> Payload:
        server.state.setdefault("seen", []).append(sorted(payloads))
        return next(iter(payloads.values()))


def test_under_central_noise_the_server_strategy_sees_only_the_noisy_mean(tmp_path):
    from fedkd.federation import Federation
    from fedkd.inline import InlineTransport

    cfg = load_config(
        None,
        [*SMALL, "rounds=2", f"output_dir={tmp_path}", "privacy.mechanism=client_gaussian"],
    )
    data, path = prepare_federated_data(cfg)
    federation = Federation(cfg, data, SpyMeanServer())
    federation.run(InlineTransport(cfg, str(path)))
    assert federation.server.state["seen"] == [[-1], [-1]]  # one noisy mean, never a client's
    assert "checked" not in federation.server.state  # raw payloads are not handed to it


def test_under_pate_a_client_cannot_send_anything_but_votes(tmp_path):
    from fedkd.federation import Federation
    from fedkd.inline import InlineTransport

    cfg = load_config(
        None,
        [
            *SMALL,
            "rounds=1",
            f"output_dir={tmp_path}",
            'strategy={name="pate"}',
            'clients.strategies={"1"="kd"}',  # this client sends its raw logits
        ],
    )
    data, path = prepare_federated_data(cfg)
    (record,) = Federation(cfg, data).run(InlineTransport(cfg, str(path)))
    (failure,) = record.failures
    assert failure.cid == 1 and "accepts votes, got logits" in failure.error
    assert 1 not in record.clients
