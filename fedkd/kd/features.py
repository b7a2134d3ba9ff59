"""Losses on intermediate features: FitNets hints, attention transfer, prototype matching."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedkd.kd.base import LOSSES, Dims, KDLoss, ParamError, require
from fedkd.kd.context import Batch, MissingContextError

_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d}


def _pool_to(x: Tensor, size: tuple[int, ...]) -> Tensor:
    """``x`` ``[B, C, *spatial]`` average-pooled to ``size`` (unchanged if it has it)."""
    return x if tuple(x.shape[2:]) == size else _POOL[len(size)](x, size)


@LOSSES.register("hint")
class Hint(KDLoss):
    """FitNets hint (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets", ICLR,
    arXiv:1412.6550): ``mean((r(f_s) - f_t)^2)``, the student's feature ``f_s`` mapped to
    the teacher's ``f_t`` by a learned regressor ``r``.

    ``r`` is an affine map: ``nn.Linear`` for ``[B, D]`` features, a 1x1 convolution for
    ``[B, C, L]`` / ``[B, C, H, W]`` maps (its output average-pooled to the teacher's
    spatial size when they differ). ``regressor = "convreg"`` appends BatchNorm and ReLU,
    as torchdistill's ``torchdistill.models.adaptation.ConvReg`` (RepDistiller's and
    mdistiller's ``ConvReg``) does; the plain map is the default because BatchNorm fails
    on the one-sample batches fedkd's loops can produce. The mean over all elements
    follows mdistiller's ``FitNet`` (``F.mse_loss``); torchdistill's FitNets sample config
    sums (``MSELoss(reduction="sum")`` in a ``SimpleLossWrapper``) and the paper halves
    the sum: a constant factor, for the term's weight (mdistiller uses 100).

    The regressor is sized by :meth:`setup` (call it before the first forward) and its
    parameters are this module's: add them to the student's optimizer.

    Args:
        student_key: the student feature (default ``"embedding"``; or ``"stage2"``...).
        teacher_key: the teacher feature (default: the same key).
        regressor: ``"linear"`` (default) or ``"convreg"``.
    """

    name = "hint"
    needs = frozenset({"student.embedding", "teacher.embedding"})

    def __init__(
        self,
        student_key: str = "embedding",
        teacher_key: str | None = None,
        regressor: Literal["linear", "convreg"] = "linear",
    ) -> None:
        super().__init__()
        require(
            regressor in ("linear", "convreg"),
            "regressor",
            f"must be 'linear' or 'convreg', got {regressor!r}",
        )
        self.compare_features(student_key, teacher_key)
        self.regressor = regressor
        self.register_module("adapter", None)
        self._dims: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    def setup(self, student_dims: Dims, teacher_dims: Dims) -> None:
        dims = self.unsized_dims(student_dims, teacher_dims)
        if dims is None:
            return
        s, t = dims
        if len(s) != len(t) or len(s) not in (1, 2, 3):
            raise ValueError(
                f"{self.who} cannot map the student's {self.student_key!r} {s} to the "
                f"teacher's {self.teacher_key!r} {t}: both must be [D], [C, L] or [C, H, W]"
            )
        if len(s) == 1:
            layer, norm = nn.Linear(s[0], t[0]), nn.BatchNorm1d(t[0])
        elif len(s) == 2:
            layer, norm = nn.Conv1d(s[0], t[0], 1), nn.BatchNorm1d(t[0])
        else:
            layer, norm = nn.Conv2d(s[0], t[0], 1), nn.BatchNorm2d(t[0])
        self.adapter = (
            layer if self.regressor == "linear" else nn.Sequential(layer, norm, nn.ReLU())
        )
        self._dims = (s, t)

    @property
    def needs_setup(self) -> bool:
        return self.adapter is None

    def forward(self, batch: Batch) -> Tensor:
        if self.adapter is None:
            raise RuntimeError(
                f"{self.who}: its regressor is sized by setup(student_dims, teacher_dims); "
                "call it before the first forward and add its parameters to the optimizer"
            )
        s = batch.student_feature(self.who, self.student_key)
        t = batch.teacher_feature(self.who, self.teacher_key)
        return F.mse_loss(_pool_to(self.adapter(s), tuple(t.shape[2:])), t)


def attention_map(feature: Tensor, p: float) -> Tensor:
    """Zagoruyko & Komodakis' ``Q = vec(mean_c |F_c|^p) / ||.||_2``, per sample:
    ``[B, C, *S] -> [B, prod(S)]``."""
    return F.normalize(feature.abs().pow(p).mean(1).flatten(1), dim=1)


@LOSSES.register("at")
class AttentionTransfer(KDLoss):
    """Attention transfer (Zagoruyko & Komodakis 2017, "Paying More Attention to
    Attention", ICLR, arXiv:1612.03928), as the authors' code computes it:
    ``beta * sum_stages mean_{i,j} (Q_s[i,j] - Q_t[i,j])^2`` with
    ``Q = vec(mean_c |F_c|^p) / ||vec(mean_c |F_c|^p)||_2`` per sample.

    torchdistill: ``torchdistill.losses.mid_level.ATLoss`` with ``mode="code"`` (the
    default; ``"paper"`` uses Eq. 2's un-squared norm), whose ImageNet sample weights it
    by 1000; mdistiller: ``p=2``, ``CFG.AT.LOSS.FEAT_WEIGHT = 1000``; the authors'
    ``cifar.py`` (szagoruyko/attention-transfer) multiplies the sum by ``--beta``, 1e+3 in
    its README. Defaults: ``p = 2``, ``beta = 1000``. When the two maps of a pair differ
    in spatial size, the larger is average-pooled to the smaller (``adaptive_avg_pool``,
    as mdistiller's ``AT`` does); channel counts may differ. Works for 1-D ``[B, C, L]``
    and 2-D maps.

    Args:
        p: the exponent. beta: the factor in front of the sum.
        student_stages: the student's stage keys to match (default: every ``stage*`` key
            the student and the teacher both have, paired by name).
        teacher_stages: the teacher's keys, paired in order (default: ``student_stages``).
    """

    name = "at"
    needs = frozenset({"student.stage*", "teacher.stage*"})

    def __init__(
        self,
        p: float = 2.0,
        beta: float = 1000.0,
        student_stages: list[str] | None = None,
        teacher_stages: list[str] | None = None,
    ) -> None:
        super().__init__()
        require(p > 0, "p", f"must be > 0, got {p!r}")
        require(beta >= 0, "beta", f"must be >= 0, got {beta!r}")
        if teacher_stages is not None and student_stages is None:
            raise ParamError("teacher_stages", "needs student_stages (pairs are in order)")
        if student_stages is not None:
            require(len(student_stages) > 0, "student_stages", "must name at least one stage")
            teacher_stages = list(teacher_stages or student_stages)
            require(
                len(teacher_stages) == len(student_stages),
                "teacher_stages",
                f"pairs in order with student_stages: {len(teacher_stages)} keys for "
                f"{len(student_stages)}",
            )
            self.needs = frozenset(
                {f"student.{k}" for k in student_stages} | {f"teacher.{k}" for k in teacher_stages}
            )
        self.p, self.beta = float(p), float(beta)
        self.student_stages, self.teacher_stages = student_stages, teacher_stages

    def pairs(self, batch: Batch) -> list[tuple[str, str]]:
        """The (student key, teacher key) pairs this batch is compared on."""
        if self.student_stages is not None:
            return list(zip(self.student_stages, self.teacher_stages or [], strict=True))
        student = batch.student_keys(self.who, "stage*")
        common = sorted(set(student) & set(batch.teacher_keys("stage*")))
        if not common:
            have = ", ".join(batch.teacher or {}) or "no teacher outputs"
            raise MissingContextError(
                f"{self.who} needs the teacher's stage features matching the student's "
                f"({', '.join(student)}), which this payload does not carry (it carries: {have})"
            )
        return [(k, k) for k in common]

    def forward(self, batch: Batch) -> Tensor:
        total = None
        for s_key, t_key in self.pairs(batch):
            f_s = batch.student_feature(self.who, s_key)
            f_t = batch.teacher_feature(self.who, t_key)
            if f_s.dim() != f_t.dim() or f_s.dim() not in (3, 4):
                raise MissingContextError(
                    f"{self.who}: the student's {s_key!r} {tuple(f_s.shape)} and the "
                    f"teacher's {t_key!r} {tuple(f_t.shape)} are not maps of the same kind"
                )
            size = tuple(min(a, b) for a, b in zip(f_s.shape[2:], f_t.shape[2:], strict=True))
            diff = attention_map(_pool_to(f_s, size), self.p) - attention_map(
                _pool_to(f_t, size), self.p
            )
            term = diff.pow(2).mean()
            total = term if total is None else total + term
        assert total is not None  # pairs() is never empty
        return self.beta * total


@LOSSES.register("proto")
class PrototypeMatching(KDLoss):
    """Prototype matching (FedProto, Tan et al. 2022, "FedProto: Federated Prototype
    Learning across Heterogeneous Clients", AAAI, arXiv:2105.00243):
    ``(1/(B*D)) sum_i m[y_i] ||e_i - P[y_i]||^2``, the student embedding ``e_i`` of each
    labelled sample pulled to its class prototype ``P[y_i]``.

    A sample whose class has no prototype (``prototype_mask[y] == False``) contributes 0
    but still counts in the mean over ``B * D``: this is the authors' code
    (``nn.MSELoss()`` between the embeddings and a copy with the known classes' rows
    replaced by their prototypes), whose ``ld`` weight (default 1) is this term's weight.
    torchdistill has no counterpart.
    """

    name = "proto"
    needs = frozenset({"student.embedding", "labels", "prototypes"})

    def forward(self, batch: Batch) -> Tensor:
        e = batch.student_feature(self.who, "embedding")
        y = batch.require_labels(self.who)
        protos, mask = batch.require_prototypes(self.who)
        if protos.dim() != 2 or protos.shape[1] != e.shape[1]:
            raise MissingContextError(
                f"{self.who}: the prototypes {tuple(protos.shape)} do not fit the student's "
                f"embedding [B, {e.shape[1]}]"
            )
        if len(y) and int(y.max()) >= len(protos):
            raise MissingContextError(
                f"{self.who}: label {int(y.max())} has no prototype row ({len(protos)} classes)"
            )
        keep = mask[y].unsqueeze(1)
        target = torch.where(keep, protos.to(e.dtype)[y], e.detach())
        return F.mse_loss(e, target, reduction="sum") / max(e.numel(), 1)
