"""The distillation-loss base class and its registry.

A loss is an ``nn.Module`` subclass of :class:`KDLoss`: hyperparameters in ``__init__``
(keyword arguments with defaults, so a config can set them), the maths in
``forward(batch)``, which returns a scalar, and ``needs``, the set of context fields it
reads (:mod:`fedkd.kd.context`), so the runtime computes features only when some loss
needs them.

Learnable parts (the FitNets adapter, CRD's projection heads) are sized by an explicit
:meth:`KDLoss.setup` call with the per-sample feature shapes of both models, never lazily
on the first batch: their parameters then exist before the optimizer is built, and are
ordinary ``nn.Module`` parameters that the runtime adds to it.

Example:
    A user loss, selected in a config as ``{ name = "my_lab.losses:CosineEmbedding" }``::

        class CosineEmbedding(KDLoss):
            needs = frozenset({"student.embedding", "teacher.embedding"})

            def __init__(self, margin: float = 0.0) -> None:
                super().__init__()
                self.margin = margin

            def forward(self, batch: Batch) -> Tensor:
                s = batch.student_feature(self.who, "embedding")
                t = batch.teacher_feature(self.who, "embedding")
                return (1 - F.cosine_similarity(s, t) - self.margin).clamp(min=0).mean()
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from fedkd.kd.context import Batch
from fedkd.registry import Registry

#: per-sample feature shapes by key, batch dimension dropped (``fedkd.models.feature_shapes``)
Dims = Mapping[str, Sequence[int]]


class ParamError(ValueError):
    """A hyperparameter out of range; ``param`` names it (for ``strategy.losses[i].<param>``)."""

    def __init__(self, param: str, message: str) -> None:
        self.param = param
        self.reason = message
        super().__init__(f"{param}: {message}")


def require(ok: bool, param: str, message: str) -> None:
    """Raise :class:`ParamError` for ``param`` unless ``ok``."""
    if not ok:
        raise ParamError(param, message)


class KDLoss(nn.Module):
    """Base of every distillation loss: ``forward(batch) -> scalar``.

    Attributes:
        name: the name the loss is known by in messages; built-ins set their registered
            name, :func:`fedkd.kd.build_loss` sets the configured one.
        needs: what ``forward`` reads (see :mod:`fedkd.kd.context`). The class attribute
            holds the defaults; a loss whose feature keys are parameters sets its own in
            ``__init__``. Read ``loss.needs`` on the instance.
    """

    name: str = ""
    needs: frozenset[str] = frozenset()

    @property
    def who(self) -> str:
        """The loss's name for messages."""
        return self.name or type(self).__name__

    def forward(self, batch: Batch) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement forward(batch)")

    def setup(self, student_dims: Dims, teacher_dims: Dims) -> None:
        """Size learnable parts from both models' per-sample feature shapes
        (e.g. ``fedkd.models.feature_shapes(model, input_shape)`` or
        :meth:`Batch.dims`). Idempotent for the same shapes. Default: nothing to size."""

    @property
    def needs_setup(self) -> bool:
        """True while :meth:`setup` has yet to be called (only losses with parameters)."""
        return False

    def compare_features(self, student_key: str, teacher_key: str | None) -> None:
        """For a loss between a student and a teacher feature: set ``student_key``,
        ``teacher_key`` (default: the student's) and the ``needs`` they make."""
        self.student_key = student_key
        self.teacher_key = teacher_key or student_key
        self.needs = frozenset({f"student.{self.student_key}", f"teacher.{self.teacher_key}"})

    def unsized_dims(
        self, student_dims: Dims, teacher_dims: Dims
    ) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """For :meth:`setup` of a loss sized by its compared features: their shapes
        ``(s, t)`` if the loss is not sized yet; None if it already is for these shapes
        (setup is idempotent); ValueError if it was sized for others. The subclass sets
        ``self._dims = (s, t)`` once sized."""
        s = shape_of(student_dims, self.student_key, "student", self.who)
        t = shape_of(teacher_dims, self.teacher_key, "teacher", self.who)
        sized = getattr(self, "_dims", None)
        if sized is None:
            return s, t
        if sized != (s, t):
            raise ValueError(f"{self.who} was set up for {sized}, now given {(s, t)}")
        return None


def _is_loss(obj: object) -> bool:
    return isinstance(obj, type) and issubclass(obj, KDLoss)


LOSSES: Registry[type[KDLoss]] = Registry("kd loss", check=_is_loss, group="fedkd.losses")


def shape_of(dims: Dims, key: str, side: str, loss: str) -> tuple[int, ...]:
    """``dims[key]`` as a tuple, or a ValueError naming the loss, the side and the key."""
    if key not in dims:
        have = ", ".join(dims) or "nothing"
        raise ValueError(f"{loss}: the {side} has no feature {key!r} to size from (has: {have})")
    return tuple(int(d) for d in dims[key])
