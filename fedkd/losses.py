"""Distillation losses by name.

Each loss is an ``nn.Module`` called as ``loss(student_logits, teacher_logits)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedkd.registry import Registry

KD_LOSSES: Registry[type[nn.Module]] = Registry(
    "kd loss",
    check=lambda c: isinstance(c, type) and issubclass(c, nn.Module),
    group="fedkd.kd_losses",
)


@KD_LOSSES.register("soft_kl")
class SoftKL(nn.Module):
    """Hinton et al. (2015): ``T^2 * KL(softmax(t/T) || softmax(s/T))``, batch mean.

    The ``T^2`` factor keeps gradient magnitudes comparable across temperatures,
    so the KD term can be mixed with cross-entropy by a fixed weight.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        log_p_student = F.log_softmax(student_logits / t, dim=-1)
        log_p_teacher = F.log_softmax(teacher_logits / t, dim=-1)
        kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
        return kl * t * t


@KD_LOSSES.register("mse")
class LogitMSE(nn.Module):
    """Mean squared error between raw logits (Ba & Caruana 2014; FedMD's digest uses L1/L2)."""

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(student_logits, teacher_logits)


@KD_LOSSES.register("prob_kl")
class ProbKL(SoftKL):
    """KL from target *probabilities* to the student: ``T^2 * KL(q || softmax(s/T))``.

    For targets that arrive as soft labels (DS-FL, CFD, Cronus). Equal to the
    cross-entropy with soft targets minus the targets' entropy (a constant), so
    it has the same gradients as the soft cross-entropy those papers use.
    """

    def forward(self, student_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        log_p_student = F.log_softmax(student_logits / t, dim=-1)
        kl = F.kl_div(log_p_student, target_probs, reduction="batchmean")
        return kl * t * t


@KD_LOSSES.register("mae")
class LogitMAE(nn.Module):
    """Mean absolute error between raw logits (FedMD's digest step)."""

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(student_logits, teacher_logits)


def make_kd_loss(name: str, temperature: float = 1.0) -> nn.Module:
    """The KD loss registered as ``name``; temperature-scaled ones (``soft_kl``,
    ``prob_kl``) get ``temperature``, the others take none."""
    cls = KD_LOSSES.get(name)
    return cls(temperature) if issubclass(cls, SoftKL) else cls()
