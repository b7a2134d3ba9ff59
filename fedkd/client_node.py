"""The client as a strategy sees it (:class:`ClientNode`): its student, its data
(sealed under a training-time privacy mechanism) and its persistent state, with the
training entry points that keep privacy, augmentation and the configured losses."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedkd.config import ClientsConfig, ConfigError, PrivacyConfig
from fedkd.contracts import Metrics
from fedkd.data.transforms import Augment
from fedkd.kd.step import RoutedLoss, StepLoss
from fedkd.losses import make_kd_loss
from fedkd.payloads import ClassLogits, Logits, SoftLabels, Weights
from fedkd.privacy import guard
from fedkd.privacy.accounting import PrivacyError
from fedkd.privacy.dpsgd import HISTORY_KEY
from fedkd.privacy.guard import Locked, Sealed, stored
from fedkd.privacy.mechanism import make_mechanism
from fedkd.recipes import Recipe
from fedkd.training import (
    ClassKDTargets,
    ClassMeans,
    KDTargets,
    distill,
    evaluate,
    make_optimizer,
    predict_logits,
    public_kd_targets,
    softmax_rows,
    train_supervised,
)
from fedkd.weights import load_weights, model_weights

#: where a client's state keeps the configured loss's learnable parts between rounds
LOSSES_KEY = "kd_losses"


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` is ``b`` or a view of its memory."""
    if a is b:
        return True
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (AttributeError, RuntimeError):
        return False


_STORED = "__fedkd_stored__"  # the stored values' key in a node's pickled state


def _strategy_hook(default: str) -> str:
    """``Class.method`` of the innermost client strategy method on the call stack."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if getattr(type(owner), "_fedkd_hooks", False):  # a ClientStrategy (no import cycle)
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
