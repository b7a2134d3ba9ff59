"""Distillation losses, configured rather than coded.

Each loss is a small :class:`KDLoss` (an ``nn.Module``) that takes one :class:`Batch`
(student features, teacher outputs or targets, labels, prototypes) and returns a
scalar; a config combines them::

    strategy.losses = [
        { name = "ce", weight = 0.1 },
        { name = "soft_kl", weight = 0.9, temperature = 4 },
        { name = "rkd", weight = 1.0 },
    ]

and :func:`build_loss` turns that list into a :class:`WeightedLoss`.

Built-in losses (registered in :data:`LOSSES`; a user's ``KDLoss`` subclass is named by
``"package.module:Class"``):

========  ==============================================  ================================
name      what                                            reads
========  ==============================================  ================================
ce        cross-entropy on labels                         student.logits, labels
soft_kl   T^2 KL(teacher || student), Hinton et al. 2015  student.logits, teacher.logits
prob_kl   T^2 KL(target probs || student)                 student.logits, target_probs
mse       MSE between logits                              student.logits, teacher.logits
mae       L1 between logits                               student.logits, teacher.logits
dkd       decoupled KD, Zhao et al. 2022                  student/teacher.logits, labels
hint      FitNets regression, Romero et al. 2015          student/teacher.embedding (*)
at        attention transfer, Zagoruyko & Komodakis 2017  student/teacher.stage*
rkd       relational KD (distance + angle), Park 2019     student/teacher.embedding
crd       contrastive (in-batch), after Tian et al. 2020  student/teacher.embedding (*)
proto     prototype matching, FedProto (Tan et al. 2022)  student.embedding, labels, prototypes
========  ==============================================  ================================

(*) has learnable parameters: call ``setup(student_dims, teacher_dims)`` before the first
forward and add ``parameters()`` to the optimizer.
"""

from fedkd.kd.base import LOSSES, Dims, KDLoss, ParamError
from fedkd.kd.compose import WeightedLoss, build_loss, build_term
from fedkd.kd.context import Batch, MissingContextError, feature_dims
from fedkd.kd.features import AttentionTransfer, Hint, PrototypeMatching
from fedkd.kd.logits import (
    CrossEntropy,
    DecoupledKD,
    LogitMAELoss,
    LogitMSELoss,
    ProbTargetKL,
    SoftTargetKL,
)
from fedkd.kd.relational import ContrastiveRepresentation, RelationalKD

__all__ = [
    "LOSSES",
    "AttentionTransfer",
    "Batch",
    "ContrastiveRepresentation",
    "CrossEntropy",
    "DecoupledKD",
    "Dims",
    "Hint",
    "KDLoss",
    "LogitMAELoss",
    "LogitMSELoss",
    "MissingContextError",
    "ParamError",
    "ProbTargetKL",
    "PrototypeMatching",
    "RelationalKD",
    "SoftTargetKL",
    "WeightedLoss",
    "build_loss",
    "build_term",
    "feature_dims",
]
