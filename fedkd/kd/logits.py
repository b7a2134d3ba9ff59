"""Losses on logits: cross-entropy, soft-target KL, logit regression, decoupled KD.

``soft_kl``, ``prob_kl``, ``mse`` and ``mae`` are the context-based forms of the
losses in :mod:`fedkd.losses` (which the classic training loop calls as
``loss(student_logits, teacher_logits)``); they wrap those classes, so the maths lives
in one place.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fedkd.kd.base import LOSSES, KDLoss, require
from fedkd.kd.context import Batch
from fedkd.losses import LogitMAE, LogitMSE, ProbKL, SoftKL


@LOSSES.register("ce")
class CrossEntropy(KDLoss):
    """Cross-entropy on the labels: ``-(1/B) sum_i log softmax(s_i)[y_i]``.

    The supervised term of every KD objective (Hinton et al. 2015, "Distilling the
    Knowledge in a Neural Network", arXiv:1503.02531, mix it with the soft term).
    torchdistill: ``torch.nn.CrossEntropyLoss`` in a ``SimpleLossWrapper`` with
    ``target.uses_label: True`` (or the ``alpha`` part of
    ``torchdistill.losses.mid_level.KDLoss``).

    Args:
        label_smoothing: as ``torch.nn.functional.cross_entropy`` (default 0).
    """

    name = "ce"
    needs = frozenset({"student.logits", "labels"})

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        require(
            0 <= label_smoothing < 1,
            "label_smoothing",
            f"must be in [0, 1), got {label_smoothing!r}",
        )
        self.label_smoothing = float(label_smoothing)

    def forward(self, batch: Batch) -> Tensor:
        logits = batch.student_feature(self.who, "logits")
        labels = batch.require_labels(self.who)
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)


def _temperature(t: float) -> float:
    require(t > 0, "temperature", f"must be > 0, got {t!r}")
    return float(t)


@LOSSES.register("soft_kl")
class SoftTargetKL(KDLoss):
    """Soft-target KD (Hinton et al. 2015, arXiv:1503.02531):
    ``T^2 * (1/B) sum_i KL(softmax(t_i/T) || softmax(s_i/T))``.

    ``T^2`` keeps the gradient scale independent of ``T``, so the term mixes with ``ce``
    at a fixed weight. torchdistill: the soft part of
    ``torchdistill.losses.mid_level.KDLoss``, ``beta * T^2 * KLDivLoss("batchmean")``
    (KDLoss has no default ``T``, and drops the ``T^2`` when it is given no ``alpha``;
    its CIFAR sample configs use ``temperature: 4.0``, its ImageNet ones 1.0). Default
    ``T = 4``, as those CIFAR configs and mdistiller's ``CFG.KD.TEMPERATURE``.
    Computed by :class:`fedkd.losses.SoftKL`.
    """

    name = "soft_kl"
    needs = frozenset({"student.logits", "teacher.logits"})

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.fn = SoftKL(_temperature(temperature))

    def forward(self, batch: Batch) -> Tensor:
        s = batch.student_feature(self.who, "logits")
        return self.fn(s, batch.teacher_feature(self.who, "logits"))


@LOSSES.register("prob_kl")
class ProbTargetKL(KDLoss):
    """KL from target probabilities: ``T^2 * (1/B) sum_i KL(q_i || softmax(s_i/T))``.

    For payloads of soft labels (DS-FL, Itahara et al. 2021; CFD, Sattler et al. 2021):
    the soft cross-entropy those papers use minus the targets' entropy (a constant).
    torchdistill: ``KLDivLoss(reduction="batchmean")`` in a ``SimpleLossWrapper``.
    Default ``T = 1`` (targets are already probabilities). Computed by
    :class:`fedkd.losses.ProbKL`.
    """

    name = "prob_kl"
    needs = frozenset({"student.logits", "target_probs"})

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.fn = ProbKL(_temperature(temperature))

    def forward(self, batch: Batch) -> Tensor:
        s = batch.student_feature(self.who, "logits")
        return self.fn(s, batch.require_target_probs(self.who))


@LOSSES.register("mse")
class LogitMSELoss(KDLoss):
    """Logit regression: ``(1/(B*C)) sum_ij (s_ij - t_ij)^2`` (Ba & Caruana 2014, "Do
    Deep Nets Really Need to be Deep?"; FedMD, Li & Wang 2019, arXiv:1910.03581).
    torchdistill: ``torch.nn.MSELoss`` in a ``SimpleLossWrapper``. Computed by
    :class:`fedkd.losses.LogitMSE`."""

    name = "mse"
    needs = frozenset({"student.logits", "teacher.logits"})

    def __init__(self) -> None:
        super().__init__()
        self.fn = LogitMSE()

    def forward(self, batch: Batch) -> Tensor:
        s = batch.student_feature(self.who, "logits")
        return self.fn(s, batch.teacher_feature(self.who, "logits"))


@LOSSES.register("mae")
class LogitMAELoss(KDLoss):
    """Logit L1: ``(1/(B*C)) sum_ij |s_ij - t_ij|`` (FedMD's digest, Li & Wang 2019).
    torchdistill: ``torch.nn.L1Loss`` in a ``SimpleLossWrapper``. Computed by
    :class:`fedkd.losses.LogitMAE`."""

    name = "mae"
    needs = frozenset({"student.logits", "teacher.logits"})

    def __init__(self) -> None:
        super().__init__()
        self.fn = LogitMAE()

    def forward(self, batch: Batch) -> Tensor:
        s = batch.student_feature(self.who, "logits")
        return self.fn(s, batch.teacher_feature(self.who, "logits"))


@LOSSES.register("dkd")
class DecoupledKD(KDLoss):
    """Decoupled KD (Zhao et al. 2022, "Decoupled Knowledge Distillation", CVPR,
    arXiv:2203.08679): ``alpha * TCKD + beta * NCKD``, with, for sample i of class y,

    - ``TCKD = T^2 KL(b^t || b^s)``, ``b = [p_y, 1 - p_y]`` the binary target / non-target
      split of ``p = softmax(z/T)``;
    - ``NCKD = T^2 KL(p~^t || p~^s)``, ``p~`` the softmax over the non-target classes only;

    each summed over the batch and divided by B. Classic KD is
    ``TCKD + (1 - p^t_y) NCKD`` (the paper's Eq. 7). Follows the authors' code
    (mdistiller ``mdistiller/distillers/DKD.py``, ``dkd_loss``: the target logit is pushed
    out by subtracting 1000; defaults ``alpha=1, beta=8, T=4`` as its ``CFG.DKD``, whose
    per-pair CIFAR-100 configs tune ``beta``). torchdistill has no DKD loss
    (``torchdistill/losses/mid_level.py`` lists none); this one matches mdistiller's.

    Omitted: mdistiller scales the loss by ``min(epoch / 20, 1)`` (``CFG.DKD.WARMUP``);
    a loss here does not know the epoch, so ramp the term's weight instead if wanted.

    Args:
        alpha: TCKD weight. beta: NCKD weight. temperature: T.
        target: the class treated as the target: ``"labels"`` (the paper; needs a
            labelled batch) or ``"teacher"`` (the teacher's arg-max, for unlabelled
            public data; an extension, not in the paper).
    """

    name = "dkd"
    needs = frozenset({"student.logits", "teacher.logits", "labels"})

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        target: Literal["labels", "teacher"] = "labels",
    ) -> None:
        super().__init__()
        require(alpha >= 0, "alpha", f"must be >= 0, got {alpha!r}")
        require(beta >= 0, "beta", f"must be >= 0, got {beta!r}")
        require(
            target in ("labels", "teacher"),
            "target",
            f"must be 'labels' or 'teacher', got {target!r}",
        )
        self.alpha, self.beta = float(alpha), float(beta)
        self.temperature = _temperature(temperature)
        self.target = target
        if target == "teacher":
            self.needs = frozenset({"student.logits", "teacher.logits"})

    def forward(self, batch: Batch) -> Tensor:
        s = batch.student_feature(self.who, "logits")
        t = batch.teacher_feature(self.who, "logits")
        y = batch.require_labels(self.who) if self.target == "labels" else t.argmax(dim=-1)
        return self.alpha * self.tckd(s, t, y) + self.beta * self.nckd(s, t, y)

    def tckd(self, s: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """Target-class KD: KL between the binary (target, rest) distributions."""
        temp = self.temperature
        gt = F.one_hot(y, s.shape[-1]).bool()
        p_s, p_t = F.softmax(s / temp, dim=-1), F.softmax(t / temp, dim=-1)
        b_s = torch.stack([(p_s * gt).sum(-1), (p_s * ~gt).sum(-1)], dim=-1)
        b_t = torch.stack([(p_t * gt).sum(-1), (p_t * ~gt).sum(-1)], dim=-1)
        return F.kl_div(torch.log(b_s), b_t, reduction="sum") * temp**2 / len(y)

    def nckd(self, s: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """Non-target-class KD: KL between the softmaxes over the other classes."""
        temp = self.temperature
        push = 1000.0 * F.one_hot(y, s.shape[-1]).to(s.dtype)
        log_p_s = F.log_softmax(s / temp - push, dim=-1)
        p_t = F.softmax(t / temp - push, dim=-1)
        return F.kl_div(log_p_s, p_t, reduction="sum") * temp**2 / len(y)
