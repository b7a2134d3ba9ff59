"""Losses on relations between the samples of a batch: RKD and a CRD-style contrast."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedkd.kd.base import LOSSES, Dims, KDLoss, require
from fedkd.kd.context import Batch


def pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """``[B, D] -> [B, B]`` Euclidean distances, zero diagonal (RKD's ``pdist``: squared
    distances clamped at ``eps`` before the root, so the gradient stays finite)."""
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))


def triplet_angles(e: Tensor) -> Tensor:
    """``[B, D] -> [B*B*B]``: ``cos angle(e_i - e_j, e_k - e_j)`` for every (j, i, k)."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # [j, i] = e_i - e_j
    return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)


@LOSSES.register("rkd")
class RelationalKD(KDLoss):
    """Relational KD (Park et al. 2019, "Relational Knowledge Distillation", CVPR,
    arXiv:1904.05068): ``w_d * L_D + w_a * L_A`` on the embeddings of the batch, with

    - ``L_D = mean_{i,j} huber(d^s_ij / mu_s, d^t_ij / mu_t)``, ``d_ij = ||e_i - e_j||``,
      ``mu`` the mean of the non-zero distances (so a global scale of either model's
      embeddings changes nothing);
    - ``L_A = mean_{i,j,k} huber(cos^s_jik, cos^t_jik)``, ``cos_jik`` the cosine of the
      angle at ``e_j`` between ``e_i`` and ``e_k``;

    ``huber`` = smooth L1 with threshold 1 (``F.smooth_l1_loss``). Formulas as
    ``torchdistill.losses.mid_level.RKDLoss`` (refactored from the authors' code; it has
    no default weights and its ImageNet sample uses ``dist_factor=1, angle_factor=2``);
    defaults ``w_d = 25, w_a = 50`` as RepDistiller's ``RKDLoss`` and mdistiller's
    ``CFG.RKD`` (``DISTANCE_WEIGHT``, ``ANGLE_WEIGHT``), the CIFAR setting. A batch of one
    sample has no relations: the loss is 0.

    Args:
        distance_weight: ``w_d``. angle_weight: ``w_a``.
        student_key / teacher_key: the features compared (default ``"embedding"``; maps
            are flattened, as torchdistill does).
        eps: the clamp on squared distances (1e-12, as torchdistill / mdistiller).
    """

    name = "rkd"
    needs = frozenset({"student.embedding", "teacher.embedding"})

    def __init__(
        self,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        student_key: str = "embedding",
        teacher_key: str | None = None,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        require(distance_weight >= 0, "distance_weight", f"must be >= 0, got {distance_weight!r}")
        require(angle_weight >= 0, "angle_weight", f"must be >= 0, got {angle_weight!r}")
        require(eps > 0, "eps", f"must be > 0, got {eps!r}")
        self.distance_weight, self.angle_weight, self.eps = (
            float(distance_weight),
            float(angle_weight),
            float(eps),
        )
        self.compare_features(student_key, teacher_key)

    def distance_loss(self, s: Tensor, t: Tensor) -> Tensor:
        """``L_D``: Huber between mean-normalised pairwise distances."""
        d_t = pairwise_distances(t, self.eps)
        d_s = pairwise_distances(s, self.eps)
        return F.smooth_l1_loss(d_s / d_s[d_s > 0].mean(), d_t / d_t[d_t > 0].mean())

    def angle_loss(self, s: Tensor, t: Tensor) -> Tensor:
        """``L_A``: Huber between the cosines of all triplet angles."""
        return F.smooth_l1_loss(triplet_angles(s), triplet_angles(t))

    def forward(self, batch: Batch) -> Tensor:
        s = batch.student_feature(self.who, self.student_key).flatten(1)
        t = batch.teacher_feature(self.who, self.teacher_key).flatten(1)
        if len(s) < 2:
            return s.sum() * 0.0
        total = s.new_zeros(())
        if self.distance_weight:
            total = total + self.distance_weight * self.distance_loss(s, t)
        if self.angle_weight:
            total = total + self.angle_weight * self.angle_loss(s, t)
        return total


class _Embed(nn.Module):
    """CRD's ``Embed``: flatten, linear map to ``dim``, L2-normalise."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


@LOSSES.register("crd")
class ContrastiveRepresentation(KDLoss):
    """A CRD-style contrastive loss (Tian et al. 2020, "Contrastive Representation
    Distillation", ICLR, arXiv:1910.10699) with in-batch negatives:
    ``CE(Z / tau, arange(B)) + CE(Z^T / tau, arange(B))``, where
    ``Z_ij = g_s(s_i) . g_t(t_j)`` and ``g_s``, ``g_t`` are learned linear heads to a
    common ``dim`` followed by L2 normalisation (CRD's ``Embed``).

    Each student embedding must pick out its own sample's teacher embedding among the
    batch's (and each teacher embedding its student's): the InfoNCE form of CRD's
    critic ``exp(g_t(t) . g_s(s) / tau)``, symmetric as CRD sums its student- and
    teacher-anchored losses. Unlike CRD (``torchdistill.losses.mid_level.CRDLoss``,
    mdistiller's ``CRD``), it keeps no memory bank: negatives are the other B - 1
    samples of the batch, not 16,384 drawn from a momentum-updated bank of the whole
    dataset, and the softmax replaces CRD's NCE approximation; so it needs no dataset
    indices, and a larger batch gives more negatives. Defaults as CRD:
    ``dim = 128``, ``tau = 0.07``.

    The heads are sized by :meth:`setup` (call it before the first forward); their
    parameters are this module's: add them to the student's optimizer.

    Args:
        dim: the common feature width. temperature: ``tau``.
        student_key / teacher_key: the features compared (default ``"embedding"``).
    """

    name = "crd"
    needs = frozenset({"student.embedding", "teacher.embedding"})

    def __init__(
        self,
        dim: int = 128,
        temperature: float = 0.07,
        student_key: str = "embedding",
        teacher_key: str | None = None,
    ) -> None:
        super().__init__()
        require(dim >= 1, "dim", f"must be >= 1, got {dim!r}")
        require(temperature > 0, "temperature", f"must be > 0, got {temperature!r}")
        self.dim, self.temperature = int(dim), float(temperature)
        self.compare_features(student_key, teacher_key)
        self.register_module("student_head", None)
        self.register_module("teacher_head", None)
        self._dims: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    def setup(self, student_dims: Dims, teacher_dims: Dims) -> None:
        dims = self.unsized_dims(student_dims, teacher_dims)
        if dims is None:
            return
        s, t = dims
        self.student_head = _Embed(math.prod(s), self.dim)
        self.teacher_head = _Embed(math.prod(t), self.dim)
        self._dims = (s, t)

    @property
    def needs_setup(self) -> bool:
        return self.student_head is None

    def forward(self, batch: Batch) -> Tensor:
        if self.student_head is None or self.teacher_head is None:
            raise RuntimeError(
                f"{self.who}: its projection heads are sized by setup(student_dims, "
                "teacher_dims); call it before the first forward and add its parameters "
                "to the optimizer"
            )
        z_s = self.student_head(batch.student_feature(self.who, self.student_key))
        z_t = self.teacher_head(batch.teacher_feature(self.who, self.teacher_key))
        sim = z_s @ z_t.t() / self.temperature
        target = torch.arange(len(sim), device=sim.device)
        return F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target)
