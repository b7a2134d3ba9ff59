"""The plug-in API: a federated KD algorithm is a client strategy plus a server strategy.

The runtime owns the round loop. Each round, for every sampled client::

    targets  = ServerStrategy.targets(...)        # from the previous round (None in round 1)
    metrics  = ClientStrategy.train(node, targets)  # digest targets + local training
    payload  = ClientStrategy.predict(node, public_idx)
    # ... the student is evaluated on the test set, the payload travels to the server ...
    agg      = ServerStrategy.aggregate(server, {cid: payload})
    metrics  = ServerStrategy.distill(server, agg)   # e.g. train the global teacher
    targets  = ServerStrategy.targets(server, agg, next_public_idx)

Hooks see typed payloads and the node objects below, never Flower records, so a
strategy runs unchanged under Flower+Ray and in the in-process runner.

Example:
    >>> @dataclass(frozen=True)
    ... class MyParams:
    ...     temperature: float = 2.0
    >>> class MyClient(ClientStrategy):
    ...     Params = MyParams
    ...     def train(self, node, targets):
    ...         t = self.params.temperature
    ...         return node.train_private(kd=targets, kd_weight=0.5, temperature=t)
    ...     def predict(self, node, public_idx):
    ...         return Logits(public_idx, node.public_logits(public_idx))
"""

from __future__ import annotations

import functools
import math
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import nn

from fedkd.config import (
    ClientsConfig,
    Config,
    ConfigError,
    PrivacyConfig,
    ServerConfig,
    Spec,
    from_dict,
)
from fedkd.data.transforms import Augment
from fedkd.kd.step import RoutedLoss, StepLoss
from fedkd.losses import make_kd_loss
from fedkd.models import build_model
from fedkd.payloads import (
    ClassLogits,
    EmbeddedLogits,
    Logits,
    Payload,
    PayloadError,
    SoftLabels,
    Weights,
)
from fedkd.privacy import guard
from fedkd.privacy.accounting import PrivacyError, PrivacyLedger
from fedkd.privacy.dpsgd import HISTORY_KEY
from fedkd.privacy.guard import Locked, Sealed, stored
from fedkd.recipes import Recipe
from fedkd.registry import Registry
from fedkd.seeding import derive_seed
from fedkd.training import (
    ClassKDTargets,
    ClassMeans,
    KDTargets,
    distill,
    evaluate,
    make_optimizer,
    predict_logits,
    train_supervised,
)

Metrics = dict[str, float]
LogitsT = TypeVar("LogitsT", Logits, SoftLabels)


@dataclass(frozen=True)
class NoParams:
    """For strategies without hyperparameters."""


#: where a client's state keeps the configured loss's learnable parts between rounds
LOSSES_KEY = "kd_losses"

#: strategy-table keys the runtime handles for every strategy (not the Params' fields):
#: ``losses``, the client training loss as a weighted list (:mod:`fedkd.kd.step`)
RUNTIME_PARAMS = ("losses",)


def make_params(cls: type, values: dict[str, Any], path: str) -> Any:
    """Build a strategy's params dataclass, naming ``path.<field>`` in any error. The
    runtime's own keys (:data:`RUNTIME_PARAMS`) are validated here and left out."""
    if "losses" in values:
        from fedkd.kd import build_loss

        needs = build_loss(values["losses"], f"{path}.losses").needs
        if "prototypes" in needs:  # no runtime context has them: the term would never run
            raise ConfigError(
                f"{path}.losses",
                "a loss reads prototypes, which only a strategy's own step provides "
                "(e.g. fedproto's); it cannot be a configured loss",
            )
    values = {k: v for k, v in values.items() if k not in RUNTIME_PARAMS}
    try:
        return from_dict(cls, values, path)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(path, str(err)) from None


def public_kd_targets(
    public_x: torch.Tensor,
    targets: Logits | SoftLabels,
    temperature: float,
    loss: str | None = None,
) -> KDTargets:
    """Targets on public indices -> (public inputs, targets, loss) on ``public_x``'s device.

    ``loss`` defaults to ``soft_kl`` for :class:`Logits` and ``prob_kl`` for
    :class:`SoftLabels` (whose values are already probabilities).
    """
    if isinstance(targets, SoftLabels):
        values, default = targets.probs, "prob_kl"
    elif isinstance(targets, Logits):
        values, default = targets.values, "soft_kl"
    else:
        raise TypeError(f"cannot distill towards a {type(targets).__name__} payload")
    idx = torch.as_tensor(targets.idx, dtype=torch.long, device=public_x.device)
    values_t = torch.as_tensor(values, dtype=torch.float32, device=public_x.device)
    kd_loss = make_kd_loss(loss or default, temperature)
    features = None
    if isinstance(targets, EmbeddedLogits):
        emb = torch.as_tensor(targets.embedding, dtype=torch.float32, device=public_x.device)
        features = {"embedding": emb}
    probs = isinstance(targets, SoftLabels)
    return KDTargets(public_x[idx], values_t, kd_loss, probs=probs, features=features)


def softmax_rows(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise ``softmax(logits / temperature)`` (float64 inside, float32 out)."""
    z = torch.from_numpy(np.asarray(logits)).double() / temperature
    return torch.softmax(z, dim=-1).float().numpy()


def model_weights(model: nn.Module) -> Weights:
    """A model's state dict as a :class:`Weights` payload (CPU NumPy copies)."""
    return Weights({k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()})


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` is ``b`` or a view of its memory."""
    if a is b:
        return True
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (AttributeError, RuntimeError):
        return False


def load_weights(model: nn.Module, weights: Weights) -> None:
    """Load a :class:`Weights` payload into ``model`` (names and shapes must match)."""
    device = next(model.parameters()).device
    model.load_state_dict(
        {k: torch.as_tensor(v, device=device) for k, v in weights.tensors.items()}
    )


_STORED = "__fedkd_stored__"  # the stored values' key in a node's pickled state


def _strategy_hook(default: str) -> str:
    """``Class.method`` of the innermost client strategy method on the call stack."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, ClientStrategy):
            return f"{type(owner).__name__}.{frame.f_code.co_name}"
        frame = frame.f_back
    return default


@dataclass(eq=False, repr=False)
class ClientNode:
    """One client as a strategy sees it: its student, data and persistent state.

    ``state`` holds extra values a strategy wants to keep across rounds (saved with
    the student). Tensors live on ``device``. ``public_y`` are the public set's
    labels: only algorithms that assume a *labelled* public set (FedMD) use them.

    Under a training-time privacy mechanism (DP-SGD) the private ``x`` and ``y`` are
    sealed (:mod:`fedkd.privacy.guard`): reading them raises :class:`PrivacyError`,
    ``privacy`` and ``settings`` cannot change, and the only way to train on them is
    :meth:`train_private`. ``strategy_name`` names the strategy in such errors.
    """

    cid: int
    round: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    x: torch.Tensor = Sealed()  # type: ignore[assignment]
    y: torch.Tensor = Sealed()  # type: ignore[assignment]
    public_x: torch.Tensor
    public_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    settings: ClientsConfig = Locked()  # type: ignore[assignment]
    generator: torch.Generator
    device: torch.device
    state: dict[str, Any] = field(default_factory=dict)
    privacy: PrivacyConfig | None = Locked(None)  # type: ignore[assignment]  # None: no mechanism
    seed: int = 0  # the run seed (DP-SGD noise is derived from it)
    strategy_name: str = "the client strategy"
    rounds: int = 1  # the run's rounds (the length of a schedule's round clock)
    # train-time augmentation of private batches (data.augment; fixed under DP-SGD, as
    # it sees the private batches) and its own generator
    augment: Augment = Locked(Augment())  # type: ignore[assignment]
    augment_generator: torch.Generator | None = None
    amp: bool = False  # training under bfloat16 autocast (the config's amp)
    # the configured training loss (strategy.losses), used wherever the node trains
    # unless a strategy passes its own step; None: the strategy's own loss
    losses: StepLoss | None = None

    def __post_init__(self) -> None:
        # what DP-SGD may train: the student and optimizer as the runtime built them
        guard.store(self, "built", guard.fingerprint(self.model, self.optimizer))
        guard.store(self, HISTORY_KEY, [tuple(h) for h in self.state.get(HISTORY_KEY, [])])
        guard.store(self, "dp_ran", HISTORY_KEY in self.state)

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles carry the stored values, but not while sealed."""
        return {**self.__dict__, _STORED: guard.snapshot(self)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        guard.restore(self, state.pop(_STORED))
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (
            f"ClientNode(cid={self.cid}, round={self.round}, examples={self.num_examples}, "
            f"sealed={self.sealed})"
        )

    @property
    def sealed(self) -> bool:
        """Whether the private data is sealed (a training-time privacy mechanism is on)."""
        return guard.sealed(self.privacy)

    def _who(self) -> str:
        """The client strategy method running now (for error messages)."""
        return _strategy_hook(self.strategy_name)

    def _sealed_message(self, what: str) -> str:
        assert self.privacy is not None
        return guard.sealed_message(self._who(), what, self.privacy)

    def private_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The private ``(x, y)``, for fedkd's runtime only (DP-SGD, the membership audit):
        while sealed, any other caller gets :class:`PrivacyError`."""
        if self.sealed and not guard.runtime_caller():
            raise PrivacyError(self._sealed_message("node.private_data()"))
        return stored(self, "x"), stored(self, "y")

    def dp_history(self) -> list[tuple[float, float, int]] | None:
        """This client's DP-SGD accountant history over all its rounds, as the runtime kept
        it (whatever a strategy wrote to ``state``); None if DP-SGD never ran for it."""
        if not stored(self, "dp_ran"):
            return None
        return list(stored(self, HISTORY_KEY))

    @property
    def num_examples(self) -> int:
        return len(stored(self, "y"))

    @property
    def recipe(self) -> Recipe:
        """``[clients]``' schedule, clipping and label smoothing, at this round."""
        return Recipe.of(self.settings, self.round, self.rounds, self.amp)

    def augmenter(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """``augment`` as a batch -> batch function on its own generator (None if off)."""
        return self.augment.bound(self.augment_generator or self.generator)

    @property
    def dpsgd(self) -> bool:
        """Whether private training runs through a training-time privacy mechanism (e.g.
        Opacus DP-SGD, record-level DP): :meth:`train_private` is then the only path."""
        return self.sealed

    def kd_targets(
        self, targets: Logits | SoftLabels, temperature: float, loss: str | None = None
    ) -> KDTargets:
        """Pair server targets with this client's copy of the public inputs."""
        return public_kd_targets(self.public_x, targets, temperature, loss)

    def class_kd_targets(
        self, targets: ClassLogits, temperature: float = 1.0, loss: str = "soft_kl"
    ) -> ClassKDTargets:
        """Per-class targets for :meth:`train_private`; ``loss="prob_kl"`` when the rows
        are mean probabilities rather than mean logits."""
        return ClassKDTargets(
            torch.as_tensor(targets.means, dtype=torch.float32, device=self.device),
            torch.as_tensor(targets.counts > 0, device=self.device),
            make_kd_loss(loss, temperature),
            probs=loss == "prob_kl",
        )

    def train_on(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        epochs: int | None = None,
        kd: KDTargets | ClassKDTargets | None = None,
        kd_weight: float = 0.0,
        augment: bool = False,
        class_means: ClassMeans | None = None,
        step: StepLoss | None = None,
    ) -> Metrics:
        """Epochs of cross-entropy on (x, y), optionally mixed with a KD term (or the loss
        ``step`` / the configured ``strategy.losses`` computes, :mod:`fedkd.kd.step`);
        ``augment`` applies the run's train-time augmentation to the batches of ``x``
        (:meth:`train_private` does; a strategy training on public inputs may ask);
        ``class_means`` collects the outputs per label during training (FD).

        Not for the private data while it is sealed (use :meth:`train_private`)."""
        if self.sealed and _shares_memory(x, stored(self, "x")):
            raise PrivacyError(self._sealed_message("the private data (in train_on)"))
        step = self._step(step)
        return self._kept(
            step,
            train_supervised(
                self.model,
                self.optimizer,
                x,
                y,
                epochs=self.settings.local_epochs if epochs is None else epochs,
                batch_size=self.settings.batch_size,
                generator=self.generator,
                kd=kd,
                kd_weight=kd_weight,
                recipe=self.recipe,
                augment=self.augmenter() if augment else None,
                class_means=class_means,
                step=step,
            ),
        )

    def _step(self, step: StepLoss | None) -> StepLoss | None:
        """The step loss to train with: the strategy's own, else the configured one; both
        at once is refused (the configured list would be silently ignored)."""
        if step is not None and self.losses is not None and step is not self.losses:
            raise ConfigError(
                "strategy.losses",
                f"{self._who()} trains with its own step loss ({type(step).__name__}), so a "
                "configured loss list would be ignored; remove strategy.losses for it",
            )
        return step or self.losses

    def _kept(self, step: StepLoss | None, metrics: Metrics) -> Metrics:
        """Keep the configured loss's learnable parts (adapters) with the client's state."""
        if step is not None and step is self.losses and isinstance(step, RoutedLoss):
            self.state[LOSSES_KEY] = step.state()
        return metrics

    def train_private(
        self,
        *,
        epochs: int | None = None,
        kd: Logits | SoftLabels | ClassLogits | None = None,
        kd_weight: float = 0.0,
        temperature: float = 1.0,
        loss: str | None = None,
        class_means: ClassMeans | None = None,
        step: StepLoss | None = None,
    ) -> Metrics:
        """Local epochs (default ``clients.local_epochs``) of cross-entropy on private
        data, mixed with distillation towards ``kd``: targets on public samples
        (``Logits``, ``SoftLabels``), or per-class targets on the private samples
        themselves (``ClassLogits``; classes with count 0 get no KD term).
        ``class_means`` (:meth:`class_means`) collects the per-label outputs of the
        training steps, as FD does; refused under DP-SGD (they are private-data outputs
        released outside it). ``step`` (or the configured ``strategy.losses``) computes
        each step's loss instead of the CE + KD mix (``kd_weight``, ``loss`` and
        ``temperature`` then only shape the targets' kind); not yet under DP-SGD."""
        if class_means is not None and self.privacy is not None and self.sealed:
            raise PrivacyError(self._class_means_refusal())
        if self.dpsgd and (step or self.losses) is not None:
            raise PrivacyError(
                f"{self._who()}: a custom training loss (a step, or strategy.losses) does "
                "not run under DP-SGD yet; its per-sample gradients are not clipped and "
                "noised, which the mechanism requires"
            )
        if self.dpsgd:
            return self._train_private_dp(epochs, kd, kd_weight, temperature, loss)
        targets: KDTargets | ClassKDTargets | None = None
        if isinstance(kd, (Logits, SoftLabels)):
            targets = self.kd_targets(kd, temperature, loss)
        elif isinstance(kd, ClassLogits):
            targets = self.class_kd_targets(kd, temperature, loss or "soft_kl")
        x, y = self.private_data()
        return self.train_on(
            x,
            y,
            epochs=epochs,
            kd=targets,
            kd_weight=kd_weight,
            augment=True,
            class_means=class_means,
            step=step,
        )

    def _train_private_dp(
        self,
        epochs: int | None,
        kd: Logits | SoftLabels | ClassLogits | None,
        kd_weight: float,
        temperature: float,
        loss: str | None,
    ) -> Metrics:
        """DP-SGD cross-entropy on private data; the KD term, which touches only public
        inputs, runs as separate, non-private steps on the public targets, as many as
        ``kd_weight / (1 - kd_weight)`` times the DP-SGD steps (the same balance as the
        mixed loss without DP)."""
        assert self.privacy is not None
        if isinstance(kd, ClassLogits) and kd_weight > 0:  # refuse before spending budget
            raise PrivacyError(
                f"{self._who()}: per-class KD trains on private samples outside DP-SGD, "
                f"which privacy.mechanism = {self.privacy.mechanism!r} forbids; use "
                "privacy.mechanism = 'client_gaussian' for this strategy"
            )
        epochs = self.settings.local_epochs if epochs is None else epochs
        out = self._dp_sgd(epochs)
        if kd is not None and kd_weight > 0:
            ratio = kd_weight / (1 - kd_weight) if kd_weight < 1 else 1.0
            steps = max(1, round(ratio * out["dp_steps_round"]))
            targets = self.kd_targets(kd, temperature, loss)
            per_epoch = math.ceil(len(targets.logits) / self.settings.batch_size)
            out["kd"] = distill(
                self.model,
                self.optimizer,
                targets,
                epochs=math.ceil(steps / max(per_epoch, 1)),
                batch_size=self.settings.batch_size,
                generator=self.generator,
                max_steps=steps,
                recipe=self.recipe,
            )["kd"]
        return out

    def _dp_sgd(self, epochs: int) -> Metrics:
        from fedkd.privacy.mechanism import make_mechanism

        return make_mechanism(self.privacy).train(self, epochs=epochs)

    def distill_public(
        self,
        targets: Logits | SoftLabels,
        *,
        epochs: int,
        temperature: float = 1.0,
        loss: str | None = None,
        augment: bool = False,
        step: StepLoss | None = None,
    ) -> Metrics:
        """Epochs of pure distillation towards ``targets`` on the public inputs
        (augmented by the run's train-time augmentation if ``augment``); ``step`` (or the
        configured ``strategy.losses``) computes each step's loss instead of ``loss``."""
        step = self._step(step)
        return self._kept(
            step,
            distill(
                self.model,
                self.optimizer,
                self.kd_targets(targets, temperature, loss),
                epochs=epochs,
                batch_size=self.settings.batch_size,
                generator=self.generator,
                recipe=self.recipe,
                augment=self.augmenter() if augment else None,
                step=step,
            ),
        )

    def public_logits(self, idx: np.ndarray) -> np.ndarray:
        """The student's logits on public samples ``idx`` (float32, eval mode)."""
        x = self.public_x[torch.as_tensor(idx, dtype=torch.long, device=self.device)]
        return predict_logits(self.model, x).cpu().numpy().astype(np.float32)

    def public_probs(self, idx: np.ndarray, temperature: float = 1.0) -> SoftLabels:
        """The student's softmax outputs (at ``temperature``) on public samples ``idx``."""
        return SoftLabels(np.asarray(idx), softmax_rows(self.public_logits(idx), temperature))

    def _class_means_refusal(self) -> str:
        assert self.privacy is not None
        return (
            f"{self._who()}: per-class means are computed from private data outside "
            f"DP-SGD, which privacy.mechanism = {self.privacy.mechanism!r} forbids (FD's "
            "per-class means may use privacy.mechanism = 'client_gaussian' instead)"
        )

    def class_means(self, softmax: bool = True, key: str = "logits") -> ClassMeans:
        """An empty per-class accumulator for :meth:`train_private` (``class_means=``):
        FD's per-label averages of the outputs produced during local training, or, with
        ``key = "embedding"`` (and a step loss), FedProto's class prototypes."""
        return ClassMeans.zeros(self.num_classes, softmax, key)

    def class_mean_logits(self, softmax: bool = False) -> ClassLogits:
        """Mean logit vector (or, with ``softmax``, mean probability vector) of this
        client's private samples of each class, from the current model in eval mode
        after training (FD's ``collect = "after"``; the paper collects during training,
        see :meth:`class_means`)."""
        if self.privacy is not None and self.sealed:
            raise PrivacyError(self._class_means_refusal())
        x, y = self.private_data()
        logits = predict_logits(self.model, x).double().cpu()
        if softmax:
            logits = torch.softmax(logits, dim=-1)
        y = y.cpu()
        c = self.num_classes
        sums = torch.zeros(c, c, dtype=torch.float64).index_add_(0, y, logits)
        counts = torch.bincount(y, minlength=c).double()
        means = sums / counts.clamp(min=1).unsqueeze(1)
        return ClassLogits(means.float().numpy(), counts.float().numpy())

    def weights(self) -> Weights:
        """The student's parameters and buffers."""
        return model_weights(self.model)

    def load_weights(self, weights: Weights) -> None:
        """Replace the student's parameters and buffers (e.g. by the global model)."""
        load_weights(self.model, weights)

    def reset_optimizer(self) -> None:
        """A fresh optimizer (``clients.optimizer`` at ``clients.lr``; a schedule scales
        that rate from the next step on), e.g. after the
        student was replaced by a global model."""
        self.optimizer = make_optimizer(self.settings.optimizer, self.model, self.settings.lr)

    def evaluate(self) -> Metrics:
        return evaluate(self.model, self.test_x, self.test_y)


@dataclass
class ServerNode:
    """The server as a strategy sees it: the global teacher (if any), the public set,
    and the experiment's config (to build and evaluate per-architecture models)."""

    round: int
    teacher: nn.Module | None
    optimizer: torch.optim.Optimizer | None
    public_x: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    config: Config
    generator: torch.Generator
    num_examples: dict[int, int] = field(default_factory=dict)  # private-set size per client
    public_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # this round
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    teacher_updates: int = 0  # rounds in which distill_teacher ran
    privacy: PrivacyLedger | None = None  # privacy spent so far (strategies may add to it)
    state: dict[str, Any] = field(default_factory=dict)
    aggregations: int = 0  # calls of combine() so far (the summary says if the aggregator ran)
    augment: Augment = field(default_factory=Augment)  # used where a strategy asks for it
    augment_generator: torch.Generator | None = None

    @property
    def settings(self) -> ServerConfig:
        return self.config.server

    @property
    def recipe(self) -> Recipe:
        """``[server]``'s schedule and clipping, at this round."""
        return Recipe.of(self.settings, self.round, self.config.rounds, self.config.amp)

    def student_spec(self, cid: int) -> Spec:
        """Client ``cid``'s student architecture."""
        from fedkd.client import student_spec

        return student_spec(self.config, cid)

    def build_model(self, spec: Spec, seed_key: str = "server-model") -> nn.Module:
        """A fresh model of ``spec`` for this task, seeded from the experiment seed."""
        shape = tuple(self.public_x.shape[1:])
        seed = derive_seed(self.config.seed, f"{seed_key}:{spec}")
        return build_model(spec, shape, self.num_classes, seed=seed).to(self.device)

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """``server.optimizer`` at ``server.lr`` for ``model``."""
        return make_optimizer(self.settings.optimizer, model, self.settings.lr)

    def logits(self, model: nn.Module, idx: np.ndarray, embedding: bool = False) -> Logits:
        """``model``'s logits on public samples ``idx`` (with ``embedding``, also its
        embedding of each: an :class:`EmbeddedLogits`)."""
        x = self.public_x[torch.as_tensor(idx, dtype=torch.long, device=self.device)]
        if not embedding:
            return Logits(np.asarray(idx), predict_logits(model, x).cpu().numpy())
        from fedkd.models import features

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = [features(model, chunk) for chunk in x.split(1024)]
        finally:
            model.train(was_training)
        cat = lambda k: torch.cat([o[k] for o in out]).float().cpu().numpy()  # noqa: E731
        return EmbeddedLogits(np.asarray(idx), cat("logits"), cat("embedding"))

    @functools.cached_property
    def clients_read(self) -> frozenset[str]:
        """The teacher features the clients' configured losses read (``strategy.losses``:
        e.g. ``{"logits", "embedding"}``); targets built with :meth:`teacher_logits`
        carry the embedding when some client reads it."""
        return teacher_reads(self.config)

    def soft_labels(
        self, model: nn.Module, idx: np.ndarray, temperature: float = 1.0
    ) -> SoftLabels:
        """``model``'s softmax outputs (at ``temperature``) on public samples ``idx``."""
        logits = self.logits(model, idx)
        return SoftLabels(logits.idx, softmax_rows(logits.values, temperature))

    def combine(
        self,
        payloads: Mapping[int, LogitsT],
        weights: Sequence[float] | None = None,
    ) -> LogitsT:
        """Combine logit-type payloads (all :class:`Logits` or all :class:`SoftLabels`, on
        the same public indices) with ``server.aggregator``.

        ``weights`` (one per payload, in order) are the strategy's own weighting, used by
        the ``mean`` aggregator; robust aggregators ignore them. Soft labels come back as
        probability rows (negative values clipped, rows renormalised).
        """
        from fedkd.aggregators import Mean, make_aggregator

        items = list(payloads.items())
        if not items:
            raise ValueError("cannot combine zero payloads")
        kind = type(items[0][1])
        if kind not in (Logits, SoftLabels) or any(type(p) is not kind for _, p in items):
            kinds = sorted({type(p).__name__ for _, p in items})
            raise TypeError(f"combine takes Logits or SoftLabels of one type, got {kinds}")
        idx = items[0][1].idx
        if any(not np.array_equal(p.idx, idx) for _, p in items):
            raise PayloadError("cannot combine payloads over different public indices")
        aggregator = make_aggregator(self.settings.aggregator)
        w = None if weights is None else np.asarray(weights, dtype=np.float64)
        if aggregator.by_size:
            w = np.asarray([self.num_examples[cid] for cid, _ in items], dtype=np.float64)
        field_name = "values" if kind is Logits else "probs"
        stacked = np.stack([getattr(p, field_name) for _, p in items]).astype(np.float64)
        out = aggregator(stacked, w)
        self.aggregations += 1
        if kind is SoftLabels:
            if not isinstance(aggregator, Mean):  # a mean of probability rows is one already
                out = np.clip(out, 0.0, None)
                total = out.sum(axis=1, keepdims=True)
                # e.g. the median of disagreeing one-hot rows is all zeros: use their mean
                empty = total[:, 0] <= 1e-12
                out[empty] = stacked.mean(axis=0)[empty]
                out = out / np.maximum(out.sum(axis=1, keepdims=True), 1e-12)
            return SoftLabels(idx.copy(), out.astype(np.float32))  # type: ignore[return-value]
        return Logits(idx.copy(), out.astype(np.float32))  # type: ignore[return-value]

    def distill_into(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        targets: Logits | SoftLabels,
        *,
        temperature: float = 1.0,
        epochs: int | None = None,
        loss: str | None = None,
        augment: bool = False,
    ) -> Metrics:
        """Distill ``model`` towards ``targets`` on the public inputs
        (``server.epochs`` passes by default, batches of ``server.batch_size``;
        augmented by the run's train-time augmentation if ``augment``)."""
        return distill(
            model,
            optimizer,
            public_kd_targets(self.public_x, targets, temperature, loss),
            epochs=self.settings.epochs if epochs is None else epochs,
            batch_size=self.settings.batch_size,
            generator=self.generator,
            recipe=self.recipe,
            augment=self.augment.bound(self.augment_generator or self.generator)
            if augment
            else None,
        )

    def distill_teacher(
        self, targets: Logits | SoftLabels, *, temperature: float, augment: bool = False
    ) -> Metrics:
        """``server.epochs`` of distillation of the teacher towards ``targets``."""
        if self.teacher is None or self.optimizer is None:
            raise RuntimeError("this strategy declared uses_teacher = False")
        self.teacher_updates += 1
        return self.distill_into(
            self.teacher, self.optimizer, targets, temperature=temperature, augment=augment
        )

    def teacher_logits(self, idx: np.ndarray) -> Logits:
        """The teacher's logits on public samples ``idx``, with its embeddings where the
        clients' losses read ``teacher.embedding`` (:meth:`clients_read`)."""
        if self.teacher is None:
            raise RuntimeError("this strategy declared uses_teacher = False")
        return self.logits(self.teacher, idx, embedding="embedding" in self.clients_read)

    def evaluate(self, model: nn.Module) -> Metrics:
        """Accuracy and loss of ``model`` on the global test set."""
        return evaluate(model, self.test_x, self.test_y)


class ClientStrategy(ABC):
    """What one client does each round. Subclass, set ``Params``, implement two hooks."""

    Params: ClassVar[type] = NoParams

    def __init__(self, params: Any = None) -> None:
        self.params = self.Params() if params is None else params

    def setup(self, node: ClientNode) -> None:  # noqa: B027 - optional hook
        """Called once, the first time this client is sampled, after its student is built
        (e.g. FedMD's transfer-learning warm-up)."""

    @abstractmethod
    def train(self, node: ClientNode, targets: Payload | None) -> Metrics:
        """Learn this round: digest the server's ``targets`` (None in round 1 unless the
        server strategy sends initial targets) and/or train on private data. May change
        ``node.model``, ``node.optimizer`` and ``node.state``."""

    @abstractmethod
    def predict(self, node: ClientNode, public_idx: np.ndarray) -> Payload | None:
        """What to send the server (None: nothing). Must not change the student."""

    def evaluate(self, node: ClientNode) -> Metrics:
        """Extra metrics of this client after the round (e.g. accuracy by nearest
        prototype), recorded per client and round as ``eval_<name>`` beside the
        runtime's own test accuracy. Finite numbers only. Must not change the student
        and must not read sealed private data. Default: none."""
        return {}


class ServerStrategy(ABC):
    """How the server samples clients and turns their payloads into the next targets.

    Class attributes: ``Params`` (hyperparameters dataclass, shared with the client
    side), ``client_strategy`` (the client side clients run by default),
    ``uses_teacher`` (whether the server holds a global teacher model, built from
    ``server.teacher``), ``accepts`` (payload types :meth:`aggregate` takes; other
    payloads are rejected on arrival, with the reason logged and recorded) and
    ``clients_use_public`` (False: clients get an empty ``public_idx`` and the
    round's public indices are not sent, nor counted as bytes down; per round,
    :meth:`public_query` decides).

    Only :meth:`aggregate` is required. Call order per round: :meth:`sample`,
    :meth:`public_query`, :meth:`client_targets` (per sampled client), then, for the
    valid replies, :meth:`check_payload`, :meth:`aggregate`, :meth:`distill`,
    :meth:`evaluate`, :meth:`targets`.
    """

    Params: ClassVar[type] = NoParams
    client_strategy: ClassVar[type[ClientStrategy]]
    uses_teacher: ClassVar[bool] = True
    accepts: ClassVar[tuple[type[Payload], ...]] = (Payload,)
    clients_use_public: ClassVar[bool] = True
    # where the strategy is itself a DP mechanism, the stage it acts on (PATE: "votes"),
    # charging ServerNode.privacy itself; privacy.mechanism must then be "none"
    own_mechanism: ClassVar[str | None] = None
    # the strategy combines logits / soft labels with ServerNode.combine, so a robust
    # server.aggregator applies to it (other aggregators than "mean" are refused otherwise)
    uses_aggregator: ClassVar[bool] = False

    def __init__(self, params: Any = None) -> None:
        self.params = self.Params() if params is None else params

    @classmethod  # noqa: B027 - optional hook
    def check_config(cls, config: Config) -> None:
        """Reject configurations this algorithm cannot run (raise :class:`ConfigError`
        naming the field). Runs before any data is built or Ray starts."""

    def target_features(self) -> frozenset[str]:
        """The teacher features this strategy's targets can carry, which the clients'
        configured losses (``strategy.losses``) may read as ``teacher.<feature>``.
        Default: ``{"logits"}`` (payloads of logits or soft labels)."""
        return frozenset({"logits"})

    def aggregates_by_mean(self) -> bool:
        """True if :meth:`aggregate` only post-processes the plain (unweighted) mean of
        the payloads: a mechanism acting on the aggregate (central client-level DP) may
        then hand it one payload, the noisy mean (keyed -1). Default: False."""
        return False

    def setup(self, server: ServerNode) -> None:  # noqa: B027 - optional hook
        """Called once before round 1, after the teacher (if any) is built."""

    def sample(self, server: ServerNode, clients: int) -> list[int]:
        """Client ids that take part in round ``server.round``. Default: a seeded
        ``clients.fraction`` of all ``clients``."""
        from fedkd.rounds import sample_clients

        return sample_clients(server.config, server.round)

    def public_query(self, server: ServerNode, public_idx: np.ndarray) -> np.ndarray:
        """The public indices the clients get in round ``server.round`` (each client's
        ``predict(node, public_idx)``): ``public_idx``, the round's seeded subset, or part
        of it; an empty array sends none (e.g. rounds in which the strategy asks nothing,
        as one-shot PATE before its query round). Payloads are validated against it.
        Default: ``public_idx`` if ``clients_use_public``, else an empty array."""
        return public_idx if self.clients_use_public else public_idx[:0]

    def client_targets(
        self, server: ServerNode, cid: int, targets: Payload | None
    ) -> Payload | None:
        """What client ``cid`` receives this round. Default: the shared ``targets``
        (from :meth:`targets` of the previous round; None in round 1)."""
        return targets

    def check_payload(  # noqa: B027 - optional hook
        self, server: ServerNode, cid: int, payload: Payload
    ) -> None:
        """Extra checks on an arriving payload (after its own ``validate``); raise
        :class:`PayloadError` to reject it. Default: none."""

    @abstractmethod
    def aggregate(self, server: ServerNode, payloads: dict[int, Payload]) -> Payload | None:
        """Combine the valid payloads of this round (keyed by client id, in id order)."""

    def distill(self, server: ServerNode, aggregate: Payload) -> Metrics:
        """Optionally train server-side models on the aggregate. Default: nothing."""
        return {}

    def evaluate(self, server: ServerNode) -> Metrics:
        """Test metrics of the server's model(s), reported as the round's ``teacher``
        entry (an ``accuracy`` key is plotted). Default: the teacher, if any."""
        return server.evaluate(server.teacher) if server.teacher is not None else {}

    def targets(
        self, server: ServerNode, aggregate: Payload | None, public_idx: np.ndarray
    ) -> Payload | None:
        """Targets sent with the next round, whose public subset is ``public_idx``
        (``aggregate`` is None when no valid payload arrived). Default: the aggregate."""
        return aggregate


def _is_subclass_of(base: type) -> Any:
    return lambda c: isinstance(c, type) and issubclass(c, base)


CLIENT_STRATEGIES: Registry[type[ClientStrategy]] = Registry(
    "client strategy", check=_is_subclass_of(ClientStrategy), autoload="strategies"
)
SERVER_STRATEGIES: Registry[type[ServerStrategy]] = Registry(
    "strategy", check=_is_subclass_of(ServerStrategy), autoload="strategies"
)


def server_strategy(config: Config) -> ServerStrategy:
    """The configured server strategy, with its params and config requirements validated."""
    cls = SERVER_STRATEGIES.get(config.strategy.name)
    strategy = cls(make_params(cls.Params, config.strategy.params, "strategy"))
    cls.check_config(config)
    _check_teacher_reads(config, strategy)
    return strategy


def refuse_configured_losses(config: Config, strategy: str, own_loss: str) -> None:
    """For a strategy whose clients train with a step loss of their own: refuse a
    configured ``strategy.losses`` before the run (``ClientNode`` would refuse it in the
    first round), naming the list's config path."""
    for cid in range(config.clients.count):
        configured = client_losses(config, cid)
        if configured is not None:
            raise ConfigError(
                configured[1],
                f"{strategy} trains with its own loss ({own_loss}) and would ignore a "
                "configured loss list; remove it",
            )


def _loss_needs(config: Config) -> dict[str, frozenset[str]]:
    """Every configured loss list's needs, by its config path."""
    from fedkd.kd import build_loss

    out: dict[str, frozenset[str]] = {}
    for cid in range(config.clients.count):
        configured = client_losses(config, cid)
        if configured is not None and configured[1] not in out:
            out[configured[1]] = build_loss(*configured).needs
    return out


def teacher_reads(config: Config) -> frozenset[str]:
    """The ``teacher.<feature>`` keys any client's configured loss reads."""
    return frozenset(
        need.split(".", 1)[1]
        for needs in _loss_needs(config).values()
        for need in needs
        if need.startswith("teacher.")
    )


def _check_teacher_reads(config: Config, strategy: ServerStrategy) -> None:
    """Refuse, before the run, a configured loss that reads a teacher feature the
    strategy's targets never carry (it would fail in round 2)."""
    offered = strategy.target_features()
    for path, needs in _loss_needs(config).items():
        for need in sorted(needs):
            if need.startswith("teacher.") and need.split(".", 1)[1] not in offered:
                raise ConfigError(
                    path,
                    f"a loss reads {need}, which {config.strategy.name}'s targets do not "
                    f"carry (they carry: {', '.join(sorted(offered))})",
                )


def client_strategy(config: Config, cid: int) -> ClientStrategy:
    """Client ``cid``'s strategy: an explicit ``clients.strategies`` range, else the default.

    An explicit entry whose ``Params`` class is the server strategy's takes the
    ``[strategy]`` parameters as defaults for the ones it does not set.
    """
    from fedkd.config import parse_id_range

    server_cls = SERVER_STRATEGIES.get(config.strategy.name)
    for key, spec in config.clients.strategies.items():
        if cid in parse_id_range(key, config.clients.count, "clients.strategies"):
            cls = CLIENT_STRATEGIES.get(spec.name)
            params = spec.params
            if cls.Params is server_cls.Params:  # same family: [strategy] params are defaults
                params = {**config.strategy.params, **spec.params}
            return cls(make_params(cls.Params, params, f"clients.strategies.{key}"))
    cls = server_cls.client_strategy
    params = config.strategy.params
    if cls.Params is not server_cls.Params:  # e.g. feddf's clients run fedavg's client side
        names = {f.name for f in fields(cls.Params)}
        params = {k: v for k, v in params.items() if k in names}
    return cls(make_params(cls.Params, params, "strategy"))


def client_losses(config: Config, cid: int) -> tuple[Any, str] | None:
    """Client ``cid``'s configured training loss list and its config path
    (``strategy.losses``, or ``clients.strategies.<range>.losses`` where an explicit
    entry sets one); None when neither does (the strategy's own loss)."""
    from fedkd.config import parse_id_range

    for key, spec in config.clients.strategies.items():
        if cid in parse_id_range(key, config.clients.count, "clients.strategies"):
            if "losses" in spec.params:
                return spec.params["losses"], f"clients.strategies.{key}.losses"
            break
    if "losses" in config.strategy.params:
        return config.strategy.params["losses"], "strategy.losses"
    return None
