"""A weighted sum of distillation losses, built from a config list.

``strategy.losses = [{ name = "ce", weight = 0.1 }, { name = "soft_kl", weight = 0.9,
temperature = 4 }, { name = "rkd", weight = 1.0 }]`` becomes
``build_loss(specs)``: a :class:`WeightedLoss` whose forward returns
``sum_k w_k * loss_k(batch)`` and remembers each term's value for metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

import torch
from torch import Tensor, nn

from fedkd.config import ConfigError, Spec, check_plugin_params
from fedkd.kd.base import LOSSES, Dims, KDLoss, ParamError
from fedkd.kd.context import Batch, check_need
from fedkd.registry import UnknownNameError, bind_params


def _reads_teacher(needs: frozenset[str]) -> bool:
    return any(n.startswith("teacher.") or n == "target_probs" for n in needs)


class WeightedLoss(nn.Module):
    """``sum_k w_k * loss_k(batch)`` over terms with weight > 0.

    Attributes:
        names: each term's key in :attr:`last_terms`: its loss name, with ``[i]`` (its
            index in ``terms``, i.e. in the config list) appended when a name occurs
            more than once. Terms of weight 0 are dropped (not computed, not needed).
        weights: each term's weight.
        losses: the term modules (an ``nn.ModuleList``, so ``self.parameters()`` holds
            every learnable adapter: give them to the optimizer after :meth:`setup`).
        needs: the union of the terms' needs.
        last_terms: the unweighted value of each term at the last forward (floats).

    With a ``teacher_mask`` in the batch, a term that reads the teacher or
    ``target_probs`` is computed on the masked rows and scaled by their share of the
    batch (0 when none); other terms see the whole batch.
    """

    def __init__(self, terms: Sequence[tuple[str, float, KDLoss]]) -> None:
        super().__init__()
        counts: dict[str, int] = {}
        for name, _, _ in terms:
            counts[name] = counts.get(name, 0) + 1
        kept = [
            (n if counts[n] == 1 else f"{n}[{i}]", float(w), loss)
            for i, (n, w, loss) in enumerate(terms)
            if w > 0
        ]
        if not kept:
            raise ValueError("a weighted loss needs at least one term with weight > 0")
        self.names = [n for n, _, _ in kept]
        self.weights = [w for _, w, _ in kept]
        self.losses = nn.ModuleList([loss for _, _, loss in kept])
        self.needs: frozenset[str] = frozenset().union(*(loss.needs for loss in self.losses))
        self.last_terms: dict[str, float] = {}

    def forward(self, batch: Batch) -> Tensor:
        total: Tensor | None = None
        terms: dict[str, float] = {}
        for name, weight, loss in zip(self.names, self.weights, self.losses, strict=True):
            value = self._term(loss, batch)
            terms[name] = float(value.detach())
            total = weight * value if total is None else total + weight * value
        self.last_terms = terms
        assert total is not None
        return total

    @staticmethod
    def _term(loss: nn.Module, batch: Batch) -> Tensor:
        mask = batch.teacher_mask
        if mask is None or not _reads_teacher(loss.needs):
            return loss(batch)
        mask = mask.to(dtype=torch.bool)
        logits = batch.student.get("logits", next(iter(batch.student.values())))
        if not bool(mask.any()):
            return logits.new_zeros(())
        share = mask.float().mean()
        return share * loss(batch.select(mask))

    def setup(self, student_dims: Dims, teacher_dims: Dims, *, seed: int | None = None) -> None:
        """Size every term's learnable parts (see :meth:`KDLoss.setup`); with ``seed``,
        their initial weights come from it rather than the global RNG. New parameters are
        on the CPU: move the module with ``.to(device)`` afterwards."""
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:  # the CPU generator only: new parameters start on it
                torch.random.default_generator.manual_seed(seed)
            for loss in self.losses:
                loss.setup(student_dims, teacher_dims)

    @property
    def needs_setup(self) -> bool:
        """True while some term still needs :meth:`setup`."""
        return any(loss.needs_setup for loss in self.losses)

    def extra_repr(self) -> str:
        return " + ".join(f"{w:g}*{n}" for n, w in zip(self.names, self.weights, strict=True))


def _weight(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ConfigError(path, f"must be a number >= 0, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(path, f"must be a finite number >= 0, got {value!r}")
    return float(value)


def build_term(spec: Spec | Mapping[str, Any], path: str) -> tuple[str, float, KDLoss]:
    """One ``{ name = ..., weight = ..., <params> }`` entry -> ``(name, weight, loss)``.

    Errors are :class:`ConfigError` naming ``path`` (``strategy.losses[2]``) and the field:
    ``.name``, ``.weight`` or the parameter."""
    spec = Spec.parse(spec, path)
    params = dict(spec.params)
    weight = _weight(params.pop("weight", 1.0), f"{path}.weight")
    try:
        cls = LOSSES.get(spec.name)
    except UnknownNameError as err:
        raise ConfigError(f"{path}.name", str(err)) from None
    except TypeError:
        raise ConfigError(
            f"{path}.name", f"{spec.name!r} is not a distillation loss (subclass fedkd.kd.KDLoss)"
        ) from None
    bind_params(cls, params, path)
    check_plugin_params(cls, params, path)
    try:
        loss = cls(**params)
    except ParamError as err:
        raise ConfigError(f"{path}.{err.param}", err.reason) from None
    except (TypeError, ValueError) as err:
        raise ConfigError(path, f"{spec.name}: {err}") from None
    loss.name = spec.name
    try:
        for need in loss.needs:
            check_need(need)
    except ValueError as err:
        raise ConfigError(f"{path}.name", f"{spec.name}.needs: {err}") from None
    return spec.name, weight, loss


def build_loss(
    specs: Sequence[Spec | Mapping[str, Any]], field: str = "strategy.losses"
) -> WeightedLoss:
    """The :class:`WeightedLoss` a config list describes.

    Each entry is a table (or :class:`fedkd.config.Spec`) with ``name`` (a registered
    loss, or ``"package.module:Class"`` for a :class:`KDLoss` subclass of your own),
    ``weight`` (finite, >= 0; default 1; 0 switches the term off) and the loss's own
    parameters. Weights are used as given (not normalised).

    Raises:
        ConfigError: naming the field, e.g. ``strategy.losses[2].temperature``, for an
            unknown name or parameter, a mistyped or out-of-range value, a bad weight, an
            empty list, or weights that are all 0.
    """
    if isinstance(specs, str | Mapping) or not isinstance(specs, Sequence):
        raise ConfigError(field, f"expected a list of loss tables, got {specs!r}")
    if not specs:
        raise ConfigError(field, 'needs at least one loss, e.g. [{ name = "soft_kl" }]')
    terms = [build_term(spec, f"{field}[{i}]") for i, spec in enumerate(specs)]
    if not any(w > 0 for _, w, _ in terms):
        raise ConfigError(field, "every weight is 0: at least one term must count")
    return WeightedLoss(terms)
