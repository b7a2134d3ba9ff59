"""The loss of one client training step, computed from batch contexts.

The runtime keeps the loop (batches, device, rate schedule, clipping, privacy) and, per
step, builds up to two :class:`~fedkd.kd.Batch` contexts:

- ``main``: the batch being trained on: a private batch (``labels``; with per-class
  targets, as FD's, also the teacher's targets per row and ``teacher_mask``), or a
  public batch when distilling (the teacher's targets, no labels);
- ``paired``: during private training towards targets on *public* samples (KD, DS-FL,
  FedMD's revisit), a random public batch of the same size with the teacher's targets;
  None otherwise.

A :class:`StepLoss` turns them into the scalar to minimise. :class:`RoutedLoss` is the
one a config writes (``strategy.losses = [...]``): each term is computed on the first
context that has everything it reads (``ce`` on the private batch, ``soft_kl`` on the
paired public batch or on the private batch's per-class targets), so one list serves
private training and public distillation alike. A term that applies to neither context
is skipped (``ce`` while distilling on unlabelled public data; any teacher term in a
round without targets); a term that reads a teacher feature the targets do not carry is
an error, as is a step on which no term applies.

A strategy replaces the step by passing its own :class:`StepLoss` (e.g. mutual learning,
a proximal term) to :meth:`fedkd.strategy.ClientNode.train_private` or
:meth:`~fedkd.strategy.ClientNode.distill_public`; it never writes the loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fedkd.kd.compose import WeightedLoss, build_loss
from fedkd.kd.context import Batch, MissingContextError


def _reads_teacher(needs: frozenset[str]) -> bool:
    return any(n.startswith("teacher.") or n == "target_probs" for n in needs)


class StepLoss(nn.Module):
    """A training step's loss from ``(main, paired)`` contexts (see the module docstring).

    Subclasses set ``needs`` (what the student must produce: ``"student.embedding"`` or
    ``"student.stage*"`` make the runtime compute :func:`fedkd.models.features`; logits
    are always there) and implement :meth:`forward`. ``terms`` holds the last step's
    named values for the round's metrics (floats). Parameters of the module (adapters)
    are trained with the student by an optimizer of the student's kind and settings
    (:meth:`optimizer_like`), at the student's current rate; its moments start afresh
    each round (the adapters' weights are kept, see :class:`RoutedLoss`).
    """

    needs: frozenset[str] = frozenset({"student.logits"})

    def __init__(self) -> None:
        super().__init__()
        self.terms: dict[str, float] = {}
        self._optimizer: torch.optim.Optimizer | None = None

    def forward(self, main: Batch, paired: Batch | None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def optimizer_like(self, student: torch.optim.Optimizer) -> torch.optim.Optimizer | None:
        """The optimizer of this step's own parameters (None: it has none yet), of the
        student optimizer's class and settings, following its learning rate."""
        params = list(self.parameters())
        if not params:
            return None
        if self._optimizer is None or len(self._optimizer.param_groups[0]["params"]) != len(params):
            self._optimizer = type(student)(params, **student.defaults)
        for group in self._optimizer.param_groups:
            group["lr"] = student.param_groups[0]["lr"]
        return self._optimizer

    @property
    def wants_features(self) -> bool:
        """True if the student must return more than its logits."""
        return any(n.startswith("student.") and n != "student.logits" for n in self.needs)


class RoutedLoss(StepLoss):
    """A :class:`~fedkd.kd.WeightedLoss` whose terms are each computed on the first
    context that has what they read (``main``, then ``paired``).

    Learnable parts are sized on the first step with teacher outputs, from that step's
    feature shapes (seeded by ``seed``), then loaded from ``state`` if given (the
    client's saved adapters); until then their terms cannot apply and are skipped.
    """

    def __init__(
        self, weighted: WeightedLoss, *, seed: int = 0, state: Mapping[str, Tensor] | None = None
    ) -> None:
        super().__init__()
        self.weighted = weighted
        self.needs = weighted.needs
        self.seed = seed
        self._state = dict(state) if state else None

    @classmethod
    def from_config(cls, specs: Any, field: str = "strategy.losses", **kwargs: Any) -> RoutedLoss:
        """From the config list ``[{ name, weight, <params> }]`` (:func:`build_loss`)."""
        return cls(build_loss(specs, field), **kwargs)

    def _setup(self, main: Batch, paired: Batch | None) -> None:
        teacher = next((b for b in (main, paired) if b is not None and b.teacher), main)
        device = main.student["logits"].device
        self.weighted.setup(main.dims()[0], teacher.dims()[1], seed=self.seed)
        self.weighted.to(device)
        if self._state:
            self.weighted.load_state_dict(self._state)
            self._state = None

    def _context(self, loss: nn.Module, main: Batch, paired: Batch | None) -> Batch | None:
        candidates = [b for b in (main, paired) if b is not None]
        for batch in candidates:
            if not batch.missing(loss.needs):
                return batch
        with_teacher = [b for b in candidates if b.teacher or b.target_probs is not None]
        if _reads_teacher(loss.needs) and with_teacher:
            names = {id(main): "the batch trained on", id(paired): "the paired public batch"}
            lacks = "; ".join(
                f"{names[id(b)]} lacks {', '.join(b.missing(loss.needs))}" for b in candidates
            )
            raise MissingContextError(
                f"strategy.losses: {loss.name} needs {', '.join(sorted(loss.needs))} on one "
                f"batch, and no batch of this step has them all ({lacks})"
            )
        return None  # e.g. ce on unlabelled public data; teacher terms before any target

    def forward(self, main: Batch, paired: Batch | None) -> Tensor:
        has_teacher = any(b is not None and b.teacher for b in (main, paired))
        if self.weighted.needs_setup and has_teacher:  # before targets, adapters wait
            self._setup(main, paired)
        total: Tensor | None = None
        terms: dict[str, float] = {}
        w = self.weighted
        for name, weight, loss in zip(w.names, w.weights, w.losses, strict=True):
            batch = self._context(loss, main, paired)
            if batch is None:
                continue
            value = w._term(loss, batch)
            terms[name] = float(value.detach())
            total = weight * value if total is None else total + weight * value
        if total is None:
            have = sorted(n for n in ("labels", "target_probs") if getattr(main, n) is not None)
            raise MissingContextError(
                f"strategy.losses: no term applies to this step (the batch has: "
                f"{', '.join(have + ['student outputs'])}, teacher targets: "
                f"{'yes' if main.teacher or paired is not None else 'none'}); add a term "
                'it can compute, e.g. { name = "ce" } for private training'
            )
        self.terms = terms
        return total

    def state(self) -> dict[str, Tensor]:
        """The learnable parts' weights, to keep with the client's state between rounds."""
        return {k: v.detach().cpu().clone() for k, v in self.weighted.state_dict().items()}


def student_outputs(
    model: nn.Module, x: Tensor, step: StepLoss, features: bool = False
) -> dict[str, Tensor]:
    """The student's outputs on ``x``: its logits, or all its named features when the step
    reads more or ``features`` asks (:func:`fedkd.models.features`, one forward pass)."""
    if step.wants_features or features:
        from fedkd.models import features

        return features(model, x)
    return {"logits": model(x)}
