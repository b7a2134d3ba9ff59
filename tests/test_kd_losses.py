"""fedkd.kd: each loss against values computed by hand (NumPy, explicit loops), their
properties, the config list -> WeightedLoss builder and its errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedkd.config import ConfigError, Spec
from fedkd.kd import (
    LOSSES,
    AttentionTransfer,
    Batch,
    ContrastiveRepresentation,
    CrossEntropy,
    DecoupledKD,
    Hint,
    KDLoss,
    LogitMAELoss,
    LogitMSELoss,
    MissingContextError,
    ProbTargetKL,
    PrototypeMatching,
    RelationalKD,
    SoftTargetKL,
    WeightedLoss,
    build_loss,
)
from fedkd.losses import SoftKL

S = [[1.0, 2.0, 0.0], [0.5, -1.0, 2.0]]  # student logits, 2 samples x 3 classes
T = [[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]]  # teacher logits
Y = [1, 2]


def t(x, grad: bool = False) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64, requires_grad=grad)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0))


def logits_batch(s=S, tt=T, y=Y) -> Batch:
    return Batch(
        student={"logits": t(s, grad=True)},
        teacher={"logits": t(tt)},
        labels=None if y is None else torch.tensor(y),
    )


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


# --- logit losses ---------------------------------------------------------------------------


def test_ce_by_hand() -> None:
    s = np.array(S)
    want = -np.mean([math.log(softmax(s[i])[Y[i]]) for i in range(2)])
    assert CrossEntropy()(logits_batch()).item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_soft_kl_by_hand(temp: float) -> None:
    s, tt = np.array(S), np.array(T)
    want = temp**2 * np.mean([kl(softmax(tt[i] / temp), softmax(s[i] / temp)) for i in range(2)])
    assert SoftTargetKL(temp)(logits_batch()).item() == pytest.approx(want, rel=1e-10)


def test_soft_kl_default_temperature_and_reuse_of_the_old_loss() -> None:
    loss = SoftTargetKL()
    assert loss.fn.temperature == 4.0 and isinstance(loss.fn, SoftKL)
    b = logits_batch()
    assert loss(b).item() == pytest.approx(SoftKL(4.0)(t(S), t(T)).item(), rel=1e-12)


def test_soft_kl_t2_scaling_keeps_the_high_temperature_limit() -> None:
    # Hinton et al. 2015, Sec. 2.1: for large T, T^2 KL -> (1/2C) sum_j (s~_j - t~_j)^2 with
    # centred logits, independent of T: the T^2 factor is what keeps the magnitude.
    s, tt = np.array(S), np.array(T)
    c = s.shape[1]
    centred = (s - s.mean(1, keepdims=True)) - (tt - tt.mean(1, keepdims=True))
    limit = np.mean((centred**2).sum(1) / (2 * c))
    for temp in (50.0, 200.0):
        assert SoftTargetKL(temp)(logits_batch()).item() == pytest.approx(limit, rel=2e-2)


def test_prob_kl_by_hand() -> None:
    q = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
    b = Batch(student={"logits": t(S)}, target_probs=t(q.tolist()))
    s = np.array(S)
    want = np.mean([kl(q[i], softmax(s[i])) for i in range(2)])
    assert ProbTargetKL()(b).item() == pytest.approx(want, rel=1e-10)
    want2 = 4 * np.mean([kl(q[i], softmax(s[i] / 2)) for i in range(2)])
    assert ProbTargetKL(temperature=2)(b).item() == pytest.approx(want2, rel=1e-10)


def test_mse_and_mae_by_hand() -> None:
    d = [S[i][j] - T[i][j] for i in range(2) for j in range(3)]
    assert LogitMSELoss()(logits_batch()).item() == pytest.approx(sum(x * x for x in d) / 6)
    assert LogitMAELoss()(logits_batch()).item() == pytest.approx(sum(abs(x) for x in d) / 6)


def _dkd_parts(s: np.ndarray, tt: np.ndarray, y: list[int], temp: float) -> tuple[float, float]:
    """TCKD and NCKD with the non-target classes removed outright (no -1000 trick)."""
    tckd = nckd = 0.0
    for i, yi in enumerate(y):
        ps, pt = softmax(s[i] / temp), softmax(tt[i] / temp)
        tckd += kl([pt[yi], 1 - pt[yi]], [ps[yi], 1 - ps[yi]])
        others = [j for j in range(len(ps)) if j != yi]
        nckd += kl(softmax(tt[i][others] / temp), softmax(s[i][others] / temp))
    n = len(y)
    return temp**2 * tckd / n, temp**2 * nckd / n


def test_dkd_by_hand_and_its_parts() -> None:
    s, tt = np.array(S), np.array(T)
    tckd, nckd = _dkd_parts(s, tt, Y, 4.0)
    b = logits_batch()
    assert DecoupledKD()(b).item() == pytest.approx(tckd + 8 * nckd, rel=1e-9)  # alpha 1, beta 8
    assert DecoupledKD(alpha=1, beta=0)(b).item() == pytest.approx(tckd, rel=1e-9)
    assert DecoupledKD(alpha=0, beta=1)(b).item() == pytest.approx(nckd, rel=1e-9)
    tckd2, nckd2 = _dkd_parts(s, tt, Y, 2.0)
    got = DecoupledKD(alpha=2, beta=3, temperature=2)(b).item()
    assert got == pytest.approx(2 * tckd2 + 3 * nckd2, rel=1e-9)


def test_dkd_reduces_to_kd() -> None:
    # Zhao et al. 2022, Eq. 7: KD = TCKD + (1 - p^t_target) NCKD, sample by sample.
    for i in range(2):
        b = logits_batch([S[i]], [T[i]], [Y[i]])
        tckd = DecoupledKD(alpha=1, beta=0, temperature=3)(b)
        nckd = DecoupledKD(alpha=0, beta=1, temperature=3)(b)
        p_t = softmax(np.array(T[i]) / 3)[Y[i]]
        kd = SoftTargetKL(3)(b)
        assert kd.item() == pytest.approx((tckd + (1 - p_t) * nckd).item(), rel=1e-9)


def test_dkd_teacher_target_needs_no_labels() -> None:
    loss = DecoupledKD(target="teacher")
    assert "labels" not in loss.needs
    argmax = [int(np.argmax(row)) for row in T]
    tckd, nckd = _dkd_parts(np.array(S), np.array(T), argmax, 4.0)
    assert loss(logits_batch(y=None)).item() == pytest.approx(tckd + 8 * nckd, rel=1e-9)


@pytest.mark.parametrize("cls", [SoftTargetKL, LogitMSELoss, LogitMAELoss, DecoupledKD])
def test_logit_losses_vanish_when_student_equals_teacher(cls) -> None:
    assert cls()(logits_batch(S, S)).item() == pytest.approx(0.0, abs=1e-9)


# --- feature losses -------------------------------------------------------------------------


def test_hint_linear_by_hand_and_gradients() -> None:
    loss = Hint()
    assert loss.needs == {"student.embedding", "teacher.embedding"} and loss.needs_setup
    loss.setup({"embedding": (2,)}, {"embedding": (3,)})
    assert not loss.needs_setup
    w = [[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]]
    bias = [0.1, 0.0, -0.2]
    with torch.no_grad():
        loss.adapter.weight.copy_(torch.tensor(w))
        loss.adapter.bias.copy_(torch.tensor(bias))
    e_s, e_t = [[1.0, 2.0], [-1.0, 0.5]], [[1.0, 0.0, 3.0], [0.0, 1.0, 1.0]]
    total = 0.0
    for i in range(2):
        for k in range(3):
            r = sum(w[k][j] * e_s[i][j] for j in range(2)) + bias[k]
            total += (r - e_t[i][k]) ** 2
    student = torch.tensor(e_s, requires_grad=True)
    b = Batch(student={"embedding": student}, teacher={"embedding": torch.tensor(e_t)})
    value = loss(b)
    assert value.item() == pytest.approx(total / 6, rel=1e-6)
    value.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())


def test_hint_on_maps_pools_to_the_teacher_size() -> None:
    loss = Hint(student_key="stage1", teacher_key="stage2")
    assert loss.needs == {"student.stage1", "teacher.stage2"}
    loss.setup({"stage1": (1, 4, 4)}, {"stage2": (1, 2, 2)})
    with torch.no_grad():  # 1x1 conv: r = 2 x + 1
        loss.adapter.weight.fill_(2.0)
        loss.adapter.bias.fill_(1.0)
    x = np.arange(16, dtype=float).reshape(4, 4)
    target = np.array([[1.0, 2.0], [3.0, 4.0]])
    pooled = np.array(
        [[x[2 * a : 2 * a + 2, 2 * c : 2 * c + 2].mean() for c in range(2)] for a in range(2)]
    )
    want = np.mean((2 * pooled + 1 - target) ** 2)
    b = Batch(
        student={"stage1": torch.tensor(x).float().view(1, 1, 4, 4)},
        teacher={"stage2": torch.tensor(target).float().view(1, 1, 2, 2)},
    )
    assert loss(b).item() == pytest.approx(want, rel=1e-6)


def test_hint_setup_rules() -> None:
    loss = Hint()
    with pytest.raises(RuntimeError, match="setup"):
        loss(
            Batch(
                student={"embedding": torch.zeros(2, 2)}, teacher={"embedding": torch.zeros(2, 2)}
            )
        )
    with pytest.raises(ValueError, match="cannot map"):
        Hint(student_key="stage1", teacher_key="embedding").setup(
            {"stage1": (2, 3)}, {"embedding": (4,)}
        )
    with pytest.raises(ValueError, match="no feature 'embedding'"):
        loss.setup({"logits": (3,)}, {"embedding": (4,)})
    loss.setup({"embedding": (2,)}, {"embedding": (4,)})
    weight = loss.adapter.weight
    loss.setup({"embedding": (2,)}, {"embedding": (4,)})  # same shapes: a no-op
    assert loss.adapter.weight is weight
    with pytest.raises(ValueError, match="set up for"):
        loss.setup({"embedding": (3,)}, {"embedding": (4,)})
    conv = Hint(regressor="convreg")
    conv.setup({"embedding": (2,)}, {"embedding": (4,)})
    assert [type(m).__name__ for m in conv.adapter] == ["Linear", "BatchNorm1d", "ReLU"]


def _attention(f: np.ndarray) -> np.ndarray:
    """Per-sample attention maps by explicit loops: mean over channels of f^2, L2-normalised."""
    out = []
    for sample in f:
        a = np.zeros(sample.shape[1:])
        for ch in sample:
            a += ch**2 / len(sample)
        flat = a.reshape(-1)
        out.append(flat / np.linalg.norm(flat))
    return np.array(out)


def test_at_by_hand_over_matching_stages() -> None:
    rng = np.random.default_rng(0)
    s1, t1 = rng.normal(size=(2, 2, 3, 3)), rng.normal(size=(2, 4, 3, 3))
    s2, t2 = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 5, 2, 2))
    s2_pooled = s2.reshape(2, 3, 2, 2, 2, 2).mean(axis=(3, 5))  # 4x4 -> 2x2 average pooling
    want = 1000 * (
        np.mean((_attention(s1) - _attention(t1)) ** 2)
        + np.mean((_attention(s2_pooled) - _attention(t2)) ** 2)
    )
    b = Batch(
        student={"logits": t(S), "stage1": t(s1.tolist()), "stage2": t(s2.tolist())},
        teacher={"stage1": t(t1.tolist()), "stage2": t(t2.tolist()), "stage3": t(t2.tolist())},
    )
    loss = AttentionTransfer()
    assert loss.needs == {"student.stage*", "teacher.stage*"}
    assert loss.pairs(b) == [("stage1", "stage1"), ("stage2", "stage2")]
    assert loss(b).item() == pytest.approx(want, rel=1e-9)
    explicit = AttentionTransfer(student_stages=["stage2"], teacher_stages=["stage3"], beta=1)
    assert explicit.needs == {"student.stage2", "teacher.stage3"}
    want2 = np.mean((_attention(s2_pooled) - _attention(t2)) ** 2)
    assert explicit(b).item() == pytest.approx(want2, rel=1e-9)


def test_at_on_1d_maps_vanishes_for_equal_attention_and_has_gradients() -> None:
    f = torch.randn(3, 4, 8, dtype=torch.float64, requires_grad=True)
    b = Batch(student={"stage1": f}, teacher={"stage1": (2 * f).detach()})  # same attention
    value = AttentionTransfer()(b)
    assert value.item() == pytest.approx(0.0, abs=1e-12)
    other = Batch(
        student={"stage1": f}, teacher={"stage1": torch.randn(3, 2, 8, dtype=torch.float64)}
    )
    AttentionTransfer()(other).backward()
    assert f.grad is not None and f.grad.abs().sum() > 0


def test_at_refuses_bad_parameters() -> None:
    with pytest.raises(ValueError, match="teacher_stages"):
        AttentionTransfer(teacher_stages=["stage1"])
    with pytest.raises(ValueError, match="teacher_stages"):
        AttentionTransfer(student_stages=["stage1"], teacher_stages=["stage1", "stage2"])


def _rkd_by_hand(s: np.ndarray, tt: np.ndarray) -> tuple[float, float]:
    n = len(s)

    def dist(e):
        d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(n)] for i in range(n)])
        return d / d[~np.eye(n, dtype=bool)].mean()

    ds, dt = dist(s), dist(tt)
    loss_d = np.mean([huber(ds[i, j] - dt[i, j]) for i in range(n) for j in range(n)])

    def cos(e, i, j, k):
        u, v = e[i] - e[j], e[k] - e[j]
        nu, nv = np.linalg.norm(u), np.linalg.norm(v)
        return 0.0 if nu == 0 or nv == 0 else float(u @ v / (nu * nv))

    diffs = [
        cos(s, i, j, k) - cos(tt, i, j, k) for j in range(n) for i in range(n) for k in range(n)
    ]
    return float(loss_d), float(np.mean([huber(x) for x in diffs]))


def test_rkd_by_hand() -> None:
    rng = np.random.default_rng(1)
    s, tt = rng.normal(size=(4, 3)), 3 * rng.normal(size=(4, 5))
    loss_d, loss_a = _rkd_by_hand(s, tt)
    b = Batch(student={"embedding": t(s.tolist())}, teacher={"embedding": t(tt.tolist())})
    assert RelationalKD()(b).item() == pytest.approx(25 * loss_d + 50 * loss_a, rel=1e-7)
    assert RelationalKD(1, 0)(b).item() == pytest.approx(loss_d, rel=1e-7)
    assert RelationalKD(0, 1)(b).item() == pytest.approx(loss_a, rel=1e-7)


def test_rkd_invariances_and_gradients() -> None:
    rng = np.random.default_rng(2)
    s = t(rng.normal(size=(5, 4)).tolist(), grad=True)
    tt = t(rng.normal(size=(5, 6)).tolist())
    base = RelationalKD()(Batch(student={"embedding": s}, teacher={"embedding": tt}))
    for scale_s, scale_t in [(10.0, 1.0), (1.0, 0.1), (3.0, 7.0)]:
        b = Batch(student={"embedding": scale_s * s}, teacher={"embedding": scale_t * tt})
        assert RelationalKD()(b).item() == pytest.approx(base.item(), rel=1e-6)
    same = Batch(student={"embedding": s}, teacher={"embedding": s.detach()})
    assert RelationalKD()(same).item() == pytest.approx(0.0, abs=1e-9)
    base.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    one = Batch(student={"embedding": s[:1]}, teacher={"embedding": tt[:1]})
    assert RelationalKD()(one).item() == 0.0  # one sample has no relations


def test_crd_by_hand_and_gradients() -> None:
    loss = ContrastiveRepresentation(dim=2, temperature=0.5)
    loss.setup({"embedding": (3,)}, {"embedding": (2,)})
    ws = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]])
    wt = np.array([[1.0, 2.0], [-1.0, 1.0]])
    with torch.no_grad():
        loss.student_head.linear.weight.copy_(torch.tensor(ws))
        loss.student_head.linear.bias.zero_()
        loss.teacher_head.linear.weight.copy_(torch.tensor(wt))
        loss.teacher_head.linear.bias.fill_(0.5)
    e_s = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 1.0], [2.0, 0.0, 0.0]])
    e_t = np.array([[1.0, 0.0], [0.5, 2.0], [-1.0, 1.0]])
    z_s = e_s @ ws.T
    z_t = e_t @ wt.T + 0.5
    z_s /= np.linalg.norm(z_s, axis=1, keepdims=True)
    z_t /= np.linalg.norm(z_t, axis=1, keepdims=True)
    sim = z_s @ z_t.T / 0.5

    def ce_rows(m):
        return np.mean([-math.log(softmax(m[i])[i]) for i in range(len(m))])

    want = ce_rows(sim) + ce_rows(sim.T)
    student = torch.tensor(e_s, dtype=torch.float32, requires_grad=True)
    teacher = torch.tensor(e_t, dtype=torch.float32, requires_grad=True)
    value = loss(Batch(student={"embedding": student}, teacher={"embedding": teacher}))
    assert value.item() == pytest.approx(want, rel=1e-5)
    value.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None  # the teacher is a constant
    for head in (loss.student_head, loss.teacher_head):
        assert all(p.grad is not None for p in head.parameters())
    assert loss.dim == 2 and ContrastiveRepresentation().dim == 128
    assert ContrastiveRepresentation().temperature == 0.07


def test_crd_requires_setup() -> None:
    loss = ContrastiveRepresentation()
    assert loss.needs_setup and not list(loss.parameters())
    with pytest.raises(RuntimeError, match="setup"):
        loss(
            Batch(
                student={"embedding": torch.zeros(2, 2)}, teacher={"embedding": torch.zeros(2, 2)}
            )
        )
    with pytest.raises(ValueError, match="no feature 'embedding'"):
        ContrastiveRepresentation().setup({"embedding": (4,)}, {"stage3": (2, 5)})
    loss = ContrastiveRepresentation(teacher_key="stage3")
    loss.setup({"embedding": (4,)}, {"stage3": (2, 5)})  # maps are flattened
    assert loss.teacher_head.linear.in_features == 10


def test_proto_by_hand_with_missing_classes() -> None:
    protos = [[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]
    mask = [True, True, False]
    e = [[1.5, 0.5], [0.0, -1.0], [3.0, 3.0], [1.0, 1.0]]
    y = [0, 1, 2, 0]
    total = 0.0
    for i in range(4):
        if mask[y[i]]:
            total += sum((e[i][d] - protos[y[i]][d]) ** 2 for d in range(2))
    want = total / (4 * 2)  # class 2 has no prototype: 0, but it counts in the mean
    emb = torch.tensor(e, requires_grad=True)
    b = Batch(
        student={"embedding": emb},
        labels=torch.tensor(y),
        prototypes=torch.tensor(protos),
        prototype_mask=torch.tensor(mask),
    )
    value = PrototypeMatching()(b)
    assert value.item() == pytest.approx(want)
    value.backward()
    assert emb.grad[2].abs().sum() == 0 and emb.grad[0].abs().sum() > 0
    exact = Batch(
        student={"embedding": torch.tensor(protos[:2])},
        labels=torch.tensor([0, 1]),
        prototypes=torch.tensor(protos),
    )
    assert PrototypeMatching()(exact).item() == 0.0
    wide = Batch(
        student={"embedding": torch.zeros(2, 3)},
        labels=torch.tensor([0, 1]),
        prototypes=torch.tensor(protos),
    )
    with pytest.raises(MissingContextError, match="do not fit"):
        PrototypeMatching()(wide)


# --- missing context ------------------------------------------------------------------------


def test_missing_context_messages_name_the_loss_and_the_field() -> None:
    only_logits = Batch(student={"logits": t(S)}, teacher={"logits": t(T)})
    with pytest.raises(MissingContextError) as err:
        RelationalKD()(Batch(student={"embedding": t(S)}, teacher={"logits": t(T)}))
    assert str(err.value).startswith(
        "rkd needs the teacher's 'embedding', which this payload does not carry"
    )
    assert "logits" in str(err.value)
    with pytest.raises(MissingContextError, match="^rkd needs the student's 'embedding'"):
        RelationalKD()(only_logits)
    with pytest.raises(MissingContextError, match="^ce needs labels"):
        CrossEntropy()(only_logits)
    with pytest.raises(MissingContextError, match="^dkd needs labels"):
        DecoupledKD()(only_logits)
    with pytest.raises(MissingContextError, match="^prob_kl needs target probabilities"):
        ProbTargetKL()(only_logits)
    with pytest.raises(MissingContextError, match="^soft_kl needs the teacher's 'logits'"):
        SoftTargetKL()(Batch(student={"logits": t(S)}))
    with pytest.raises(MissingContextError, match="^proto needs class prototypes"):
        PrototypeMatching()(Batch(student={"embedding": t(S)}, labels=torch.tensor(Y)))
    with pytest.raises(MissingContextError, match="^at needs the student's 'stage\\*'"):
        AttentionTransfer()(only_logits)
    staged = Batch(student={"stage1": torch.zeros(2, 1, 3)}, teacher={"logits": t(T)})
    with pytest.raises(
        MissingContextError,
        match="^at needs the teacher's stage features matching the student's \\(stage1\\)",
    ):
        AttentionTransfer()(staged)


def test_batch_has_missing_and_select() -> None:
    b = Batch(
        student={"logits": t(S), "stage1": torch.zeros(2, 1, 3)},
        teacher={"logits": t(T)},
        labels=torch.tensor(Y),
    )
    assert b.size == 2
    assert b.has("student.stage*") and not b.has("teacher.stage*")
    assert b.missing(["labels", "prototypes", "teacher.embedding", "student.logits"]) == [
        "prototypes",
        "teacher.embedding",
    ]
    with pytest.raises(ValueError, match="not a need"):
        b.has("logits")
    part = b.select(torch.tensor([False, True]))
    assert part.size == 1 and part.labels.tolist() == [2] and part.teacher["logits"].shape == (1, 3)
    assert b.dims() == ({"logits": (3,), "stage1": (1, 3)}, {"logits": (3,)})


# --- composition ----------------------------------------------------------------------------


class MyLoss(KDLoss):
    """A user loss selected by import path: mean squared student logit, times ``scale``."""

    needs = frozenset({"student.logits"})

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.scale * batch.student_feature(self.who, "logits").pow(2).mean()


def test_weighted_loss_is_the_weighted_sum_and_reports_terms() -> None:
    loss = build_loss(
        [
            {"name": "ce", "weight": 0.1},
            {"name": "soft_kl", "weight": 0.9, "temperature": 4},
            {"name": "mse", "weight": 0.5},
        ]
    )
    assert isinstance(loss, WeightedLoss)
    assert loss.needs == {"student.logits", "labels", "teacher.logits"}
    b = logits_batch()
    total = loss(b)
    ce, kd, mse = CrossEntropy()(b), SoftTargetKL(4)(b), LogitMSELoss()(b)
    assert total.item() == pytest.approx((0.1 * ce + 0.9 * kd + 0.5 * mse).item(), rel=1e-12)
    assert loss.last_terms == pytest.approx(
        {"ce": ce.item(), "soft_kl": kd.item(), "mse": mse.item()}
    )
    total.backward()
    assert b.student["logits"].grad is not None
    assert "0.1*ce + 0.9*soft_kl + 0.5*mse" in repr(loss)


def test_weighted_loss_names_repeats_by_index_and_drops_zero_weights() -> None:
    loss = build_loss(
        [
            {"name": "soft_kl", "temperature": 2},
            {"name": "rkd", "weight": 0},
            Spec("soft_kl", {"temperature": 8, "weight": 0.5}),
        ]
    )
    assert loss.names == ["soft_kl[0]", "soft_kl[2]"] and loss.weights == [1.0, 0.5]
    assert loss.needs == {"student.logits", "teacher.logits"}  # rkd is off: not needed
    b = logits_batch()
    assert loss(b).item() == pytest.approx((SoftTargetKL(2)(b) + 0.5 * SoftTargetKL(8)(b)).item())
    assert set(loss.last_terms) == {"soft_kl[0]", "soft_kl[2]"}


def test_needs_union_and_learnable_terms() -> None:
    loss = build_loss(
        [{"name": "hint", "student_key": "stage2"}, {"name": "crd", "dim": 4}, {"name": "proto"}]
    )
    assert loss.needs == {
        "student.stage2",
        "teacher.stage2",
        "student.embedding",
        "teacher.embedding",
        "labels",
        "prototypes",
    }
    assert loss.needs_setup and not list(loss.parameters())
    dims_s, dims_t = {"stage2": (3, 5), "embedding": (6,)}, {"stage2": (4, 5), "embedding": (8,)}
    loss.setup(dims_s, dims_t, seed=3)
    assert not loss.needs_setup
    again = build_loss(
        [{"name": "hint", "student_key": "stage2"}, {"name": "crd", "dim": 4}, {"name": "proto"}]
    )
    again.setup(dims_s, dims_t, seed=3)
    for p, q in zip(loss.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)  # the seed decides the initial weights
    names = {n for n, _ in loss.named_parameters()}
    assert names == {
        "losses.0.adapter.weight",
        "losses.0.adapter.bias",
        "losses.1.student_head.linear.weight",
        "losses.1.student_head.linear.bias",
        "losses.1.teacher_head.linear.weight",
        "losses.1.teacher_head.linear.bias",
    }


def test_teacher_mask_restricts_teacher_terms_to_their_rows() -> None:
    loss = build_loss([{"name": "ce"}, {"name": "mse"}])
    b = logits_batch()
    b.teacher_mask = torch.tensor([False, True])
    got = loss(b)
    only = Batch(student={"logits": t(S[1:])}, teacher={"logits": t(T[1:])})
    want = CrossEntropy()(logits_batch()) + 0.5 * LogitMSELoss()(only)
    assert got.item() == pytest.approx(want.item())
    b.teacher_mask = torch.tensor([False, False])
    assert loss(b).item() == pytest.approx(CrossEntropy()(b).item())
    assert loss.last_terms["mse"] == 0.0


def test_user_loss_by_import_path() -> None:
    loss = build_loss([{"name": "tests.test_kd_losses:MyLoss", "scale": 2.0, "weight": 0.5}])
    term = loss.losses[0]
    assert isinstance(term, MyLoss) and term.name == "tests.test_kd_losses:MyLoss"
    assert loss(logits_batch()).item() == pytest.approx(0.5 * 2 * np.mean(np.array(S) ** 2))
    with pytest.raises(ConfigError) as err:
        build_loss([{"name": "tests.test_kd_losses:MyLoss", "scale": "big"}])
    assert err.value.field == "strategy.losses[0].scale"
    with pytest.raises(ConfigError) as err:
        build_loss([{"name": "torch.nn:MSELoss"}])
    assert err.value.field == "strategy.losses[0].name" and "KDLoss" in str(err.value)


def test_builtin_names() -> None:
    assert set(LOSSES.names()) >= {
        "ce", "soft_kl", "prob_kl", "mse", "mae", "hint", "at", "rkd", "dkd", "crd", "proto"
    }  # fmt: skip
    for name in LOSSES.names():
        assert LOSSES.get(name).name == name


@pytest.mark.parametrize(
    ("specs", "field", "match"),
    [
        ([{"name": "ce"}, {"name": "sofkl"}], "strategy.losses[1].name", "unknown kd loss 'sofkl'"),
        ([{"name": "ce", "weight": -1}], "strategy.losses[0].weight", ">= 0"),
        ([{"name": "ce", "weight": float("nan")}], "strategy.losses[0].weight", "finite"),
        ([{"name": "ce", "weight": "high"}], "strategy.losses[0].weight", "number"),
        ([{"name": "ce", "weight": True}], "strategy.losses[0].weight", "number"),
        (
            [{"name": "ce", "weight": 0}, {"name": "mse", "weight": 0.0}],
            "strategy.losses",
            "every weight is 0",
        ),
        ([], "strategy.losses", "at least one"),
        ({"name": "ce"}, "strategy.losses", "list"),
        ([{"weight": 1}], "strategy.losses[0]", "'name'"),
        (
            [{"name": "ce"}, {"name": "mse"}, {"name": "soft_kl", "temperatur": 4}],
            "strategy.losses[2].temperatur",
            "unknown parameter; valid: temperature",
        ),
        ([{"name": "soft_kl", "temperature": "hot"}], "strategy.losses[0].temperature", "float"),
        ([{"name": "soft_kl", "temperature": 0}], "strategy.losses[0].temperature", "> 0"),
        ([{"name": "dkd", "beta": -1}], "strategy.losses[0].beta", ">= 0"),
        ([{"name": "hint", "regressor": "mlp"}], "strategy.losses[0].regressor", "'linear'"),
        ([{"name": "at", "student_stages": "stage1"}], "strategy.losses[0].student_stages", "list"),
        ([{"name": "mse", "temperature": 2}], "strategy.losses[0].temperature", "(none)"),
    ],
)
def test_build_loss_errors_name_the_field(specs, field: str, match: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_loss(specs)
    assert err.value.field == field
    assert match in str(err.value)


def test_build_loss_field_prefix_and_defaults() -> None:
    with pytest.raises(ConfigError) as err:
        build_loss([{"name": "rkd", "angle_weight": -2}], field="server.losses")
    assert err.value.field == "server.losses[0].angle_weight"
    loss = build_loss(["soft_kl", Spec("at")])  # bare names: weight 1, defaults
    assert loss.weights == [1.0, 1.0]
    kd, at = loss.losses
    assert kd.fn.temperature == 4.0 and at.p == 2.0 and at.beta == 1000.0
    rkd = build_loss([{"name": "rkd"}]).losses[0]
    assert (rkd.distance_weight, rkd.angle_weight) == (25.0, 50.0)
    dkd = build_loss([{"name": "dkd"}]).losses[0]
    assert (dkd.alpha, dkd.beta, dkd.temperature) == (1.0, 8.0, 4.0)


def test_every_builtin_trains_the_student() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 3, requires_grad=True)
    emb = torch.randn(4, 5, requires_grad=True)
    stage = torch.randn(4, 2, 6, requires_grad=True)
    b = Batch(
        student={"logits": logits, "embedding": emb, "stage1": stage},
        teacher={
            "logits": torch.randn(4, 3),
            "embedding": torch.randn(4, 7),
            "stage1": torch.randn(4, 3, 6),
        },
        target_probs=torch.softmax(torch.randn(4, 3), -1),
        labels=torch.tensor([0, 1, 2, 1]),
        prototypes=torch.randn(3, 5),
    )
    loss = build_loss([{"name": n} for n in LOSSES.names() if ":" not in n])
    loss.setup(*b.dims(), seed=0)
    value = loss(b)
    assert math.isfinite(value.item()) and len(loss.last_terms) == len(loss.names)
    value.backward()
    for x in (logits, emb, stage):
        assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in loss.parameters())
