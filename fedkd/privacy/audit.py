"""Membership-inference audit: a loss-threshold attack (Yeom et al., 2018) on a student.

Members are the client's private training samples; non-members are samples of the
global test set, which the student never trained on, matched class by class (the
same number per label), so that label skew is not mistaken for membership. The attack scores each
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
    """Audit ``model`` on label-matched members and non-members: for every class, as many
    of each as both sides have, so a client's label skew does not pass for membership."""
    my, oy = members[1].cpu().numpy(), nonmembers[1].cpu().numpy()
    pick_m, pick_o = [], []
    for c in np.unique(my):
        m_rows, o_rows = np.flatnonzero(my == c), np.flatnonzero(oy == c)
        k = min(len(m_rows), len(o_rows))
        pick_m.extend(m_rows[:k])
        pick_o.extend(o_rows[:k])
    if not pick_m:
        return {}
    dev = members[0].device
    im, io = torch.as_tensor(pick_m, device=dev), torch.as_tensor(pick_o, device=dev)
    m = per_sample_loss(model, members[0][im], members[1][im])
    o = per_sample_loss(model, nonmembers[0][io], nonmembers[1][io])
    return attack_scores(m, o)
