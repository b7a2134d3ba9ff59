"""The batch context every distillation loss receives: one object, so no loss needs a loop.

A runtime fills a :class:`Batch` once per step (the student's features, whatever the
payload carries, the labels of a private batch) and calls the loss with it. A loss
names what it reads in ``needs`` (see :mod:`fedkd.kd.base`) and reads it through the
``Batch`` helpers, which fail with a message naming the loss and the missing field.

Needs are strings:

- ``"student.<key>"`` / ``"teacher.<key>"``: a feature of the student / teacher, keyed as
  :func:`fedkd.models.features` keys them (``"logits"``, ``"embedding"``, ``"stage1"``...);
  a trailing ``*`` matches every key with that prefix (``"student.stage*"``);
- ``"labels"``, ``"target_probs"``, ``"prototypes"``: the :class:`Batch` fields of those names.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor

#: the needs that are whole fields of the batch (the others are ``student.*`` / ``teacher.*``)
FIELD_NEEDS = ("labels", "target_probs", "prototypes")


class MissingContextError(ValueError):
    """A loss needs something the batch (its payload, its model or its labels) lacks."""


def check_need(need: str) -> None:
    """Raise ``ValueError`` unless ``need`` is a well-formed need string."""
    side, dot, key = need.partition(".")
    if need in FIELD_NEEDS or (side in ("student", "teacher") and dot and key):
        return
    raise ValueError(
        f"{need!r} is not a need: use 'student.<feature>', 'teacher.<feature>' "
        f"(a trailing * matches a prefix) or one of {', '.join(FIELD_NEEDS)}"
    )


def feature_dims(features: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    """Per-sample shape of each feature (batch dimension dropped), the form ``setup`` takes.

    Same as :func:`fedkd.models.feature_shapes` but from tensors already computed.
    """
    return {k: tuple(v.shape[1:]) for k, v in features.items()}


def _matching(features: Mapping[str, Tensor], key: str) -> list[str]:
    return sorted(k for k in features if fnmatch.fnmatchcase(k, key))


@dataclass
class Batch:
    """One training step's distillation context.

    Attributes:
        student: the student's outputs on this batch, at least ``"logits"`` ``[B, C]``;
            ``"embedding"`` ``[B, D]`` and ``"stage<i>"`` maps when a loss needs them
            (:func:`fedkd.models.features`). Gradients flow through these.
        teacher: the teacher's outputs on the same inputs (``"logits"`` and, where the
            payload has them, ``"embedding"`` / stages), or None (e.g. a private batch
            with a payload that carries no per-sample targets). Read as constants: the
            helpers detach them.
        target_probs: ``[B, C]`` soft labels as probabilities, for payloads that carry
            probabilities rather than logits (DS-FL, CFD, votes).
        labels: ``[B]`` int64 class labels (private batches; None on unlabelled data).
        prototypes: ``[classes, D]`` class prototypes (FedProto-style payloads).
        prototype_mask: ``[classes]`` bool, which rows of ``prototypes`` exist (None: all).
        teacher_mask: ``[B]`` bool, which rows have teacher targets (None: all). Applied
            by :class:`fedkd.kd.WeightedLoss`: a term that reads the teacher or
            ``target_probs`` is computed on those rows only and scaled by their share of
            the batch (rows without a target contribute 0 to the batch mean), as FD's
            per-class targets need for classes no other client has.
        rows: ``[B]`` int64, the batch's row indices into the data being trained on (the
            client's private set during private training), for per-sample targets a
            step loss keeps itself (FedGKT's server logits); None where unknown.
    """

    student: dict[str, Tensor]
    teacher: dict[str, Tensor] | None = None
    target_probs: Tensor | None = None
    labels: Tensor | None = None
    prototypes: Tensor | None = None
    prototype_mask: Tensor | None = None
    teacher_mask: Tensor | None = None
    rows: Tensor | None = None

    @property
    def size(self) -> int:
        """B, the number of samples (rows of the student's features)."""
        return len(next(iter(self.student.values())))

    # --- readers for losses -------------------------------------------------------------

    def student_feature(self, loss: str, key: str) -> Tensor:
        """The student's feature ``key``; ``loss`` (its name) is for the error message."""
        if key not in self.student:
            have = ", ".join(self.student) or "nothing"
            raise MissingContextError(
                f"{loss} needs the student's {key!r}, which the student model does not "
                f"produce here (it produces: {have})"
            )
        return self.student[key]

    def teacher_feature(self, loss: str, key: str) -> Tensor:
        """The teacher's feature ``key``, detached."""
        if self.teacher is None or key not in self.teacher:
            have = ", ".join(self.teacher or {}) or "no teacher outputs"
            raise MissingContextError(
                f"{loss} needs the teacher's {key!r}, which this payload does not carry "
                f"(it carries: {have})"
            )
        return self.teacher[key].detach()

    def student_keys(self, loss: str, pattern: str) -> list[str]:
        """The student's feature keys matching ``pattern`` (e.g. ``"stage*"``), sorted."""
        keys = _matching(self.student, pattern)
        if not keys:
            raise MissingContextError(
                f"{loss} needs the student's {pattern!r} features, which the student model "
                f"does not produce (it produces: {', '.join(self.student) or 'nothing'})"
            )
        return keys

    def teacher_keys(self, pattern: str) -> list[str]:
        """The teacher's feature keys matching ``pattern`` (maybe none), sorted."""
        return _matching(self.teacher or {}, pattern)

    def require_labels(self, loss: str) -> Tensor:
        """The labels, or an error: only private (labelled) batches have them."""
        if self.labels is None:
            raise MissingContextError(
                f"{loss} needs labels, which this batch does not have (private batches "
                "have them; public ones only when the public set is labelled)"
            )
        return self.labels

    def require_target_probs(self, loss: str) -> Tensor:
        """The target probabilities, detached."""
        if self.target_probs is None:
            raise MissingContextError(
                f"{loss} needs target probabilities, which this payload does not carry "
                "(a payload of logits gives 'teacher.logits': use soft_kl)"
            )
        return self.target_probs.detach()

    def require_prototypes(self, loss: str) -> tuple[Tensor, Tensor]:
        """``(prototypes [classes, D], mask [classes] bool)``, detached."""
        if self.prototypes is None:
            raise MissingContextError(
                f"{loss} needs class prototypes, which this payload does not carry"
            )
        protos = self.prototypes.detach()
        mask = self.prototype_mask
        if mask is None:
            mask = torch.ones(len(protos), dtype=torch.bool, device=protos.device)
        return protos, mask.to(device=protos.device, dtype=torch.bool)

    # --- for runtimes ---------------------------------------------------------------------

    def has(self, need: str) -> bool:
        """Whether this batch can satisfy ``need``."""
        check_need(need)
        if need in FIELD_NEEDS:
            return getattr(self, need) is not None
        side, _, key = need.partition(".")
        features = self.student if side == "student" else self.teacher or {}
        return bool(_matching(features, key))

    def missing(self, needs: Iterable[str]) -> list[str]:
        """The needs this batch cannot satisfy, sorted (empty: it has everything)."""
        return sorted(n for n in set(needs) if not self.has(n))

    def dims(self) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
        """``(student_dims, teacher_dims)``: per-sample feature shapes, for ``setup``."""
        return feature_dims(self.student), feature_dims(self.teacher or {})

    def select(self, rows: Tensor) -> Batch:
        """The same context on ``rows`` (an index or bool mask over the batch) only.

        Per-sample tensors are indexed; prototypes (per class) are kept; the result has
        no ``teacher_mask``.
        """

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[rows]

        return replace(
            self,
            student={k: v[rows] for k, v in self.student.items()},
            teacher=None if self.teacher is None else {k: v[rows] for k, v in self.teacher.items()},
            target_probs=pick(self.target_probs),
            labels=pick(self.labels),
            teacher_mask=None,
            rows=pick(self.rows),
        )
