"""Membership-inference audit: a loss-threshold attack (Yeom et al., 2018) on a student.

Members are the client's private training samples; non-members are as many samples
of the global test set, which the student never trained on. The attack scores each
sample by its negative loss (members tend to have lower loss) and is summarised by
its ROC AUC (0.5 = no better than chance) and its advantage, max over thresholds
of TPR - FPR (0 = chance; an (epsilon, 0)-DP learner bounds it by e^epsilon - 1).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedkd.training import predict_logits


def per_sample_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    logits = predict_logits(model, x)
    return F.cross_entropy(logits, y, reduction="none").double().cpu().numpy()


def attack_scores(member_loss: np.ndarray, nonmember_loss: np.ndarray) -> dict[str, float]:
    """AUC and advantage of the threshold attack ``loss < t`` => member."""
    from sklearn.metrics import roc_auc_score, roc_curve

    labels = np.r_[np.ones(len(member_loss)), np.zeros(len(nonmember_loss))]
    scores = -np.r_[member_loss, nonmember_loss]
    fpr, tpr, _ = roc_curve(labels, scores)
    return {
        "mia_auc": float(roc_auc_score(labels, scores)),
        "mia_advantage": float(np.max(tpr - fpr)),
    }


def loss_attack(
    model: nn.Module,
    members: tuple[torch.Tensor, torch.Tensor],
    nonmembers: tuple[torch.Tensor, torch.Tensor],
) -> dict[str, float]:
    """Audit ``model`` with equal numbers of members and non-members."""
    n = min(len(members[1]), len(nonmembers[1]))
    if n == 0:
        return {}
    m = per_sample_loss(model, members[0][:n], members[1][:n])
    o = per_sample_loss(model, nonmembers[0][:n], nonmembers[1][:n])
    return attack_scores(m, o)
