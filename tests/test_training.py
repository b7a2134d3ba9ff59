"""Training loops (supervised, distillation, evaluation) and derived seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedkd.losses import SoftKL
from fedkd.registry import UnknownNameError
from fedkd.seeding import derive_seed, torch_generator
from fedkd.training import (
    KDTargets,
    distill,
    evaluate,
    make_optimizer,
    predict_logits,
    to_tensor,
    train_supervised,
)


def blobs(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two well-separated Gaussian blobs in 2-D (linearly separable)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    centers = torch.tensor([[-2.0, -2.0], [2.0, 2.0]])
    x = centers[y] + 0.5 * torch.randn(n, 2, generator=gen)
    return x, y


def linear(seed: int, d_in: int = 2, d_out: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- supervised ----------------------------------------------------------------------


def test_train_supervised_learns_separable_problem():
    x, y = blobs()
    model = linear(0)
    before = evaluate(model, x, y)
    first = train_supervised(
        model, make_optimizer("sgd", model, 0.1), x, y, epochs=1, batch_size=16, generator=gen(0)
    )
    later = train_supervised(
        model, make_optimizer("sgd", model, 0.1), x, y, epochs=5, batch_size=16, generator=gen(1)
    )
    after = evaluate(model, x, y)
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] > 0.9
    assert later["loss"] < first["loss"]
    assert later["ce"] == later["loss"] and later["kd"] == 0.0
    # and it generalises to fresh samples of the same problem
    x_test, y_test = blobs(200, seed=1)
    assert evaluate(model, x_test, y_test)["accuracy"] > 0.9


def _train(seed: int, gen_seed: int) -> nn.Module:
    x, y = blobs()
    model = nn.Sequential(linear(seed, 2, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = make_optimizer("adam", model, 0.01)
    train_supervised(model, opt, x, y, epochs=2, batch_size=16, generator=gen(gen_seed))
    return model


def test_train_supervised_is_reproducible():
    a, b, c = _train(0, 5), _train(0, 5), _train(0, 6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # the generator, not the global RNG, decides the batch order
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


class Recorder(nn.Module):
    """Logs which sample ids (stored in feature 0) each forward pass sees."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 2)
        self.calls: list[list[int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x[:, 0].long().tolist())
        return self.lin(x)


@pytest.mark.parametrize(("n", "batch_size"), [(10, 3), (10, 5), (7, 32), (1, 1)])
def test_every_sample_seen_once_per_epoch(n, batch_size):
    x = torch.arange(n, dtype=torch.float32)[:, None]
    y = torch.zeros(n, dtype=torch.long)
    model = Recorder()
    epochs = 3
    metrics = train_supervised(
        model,
        make_optimizer("sgd", model, 0.0001),
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        generator=gen(0),
    )
    per_epoch = math.ceil(n / batch_size)
    assert len(model.calls) == epochs * per_epoch  # the last partial batch is kept
    expected_sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    for e in range(epochs):
        calls = model.calls[e * per_epoch : (e + 1) * per_epoch]
        assert [len(c) for c in calls] == expected_sizes
        assert sorted(i for c in calls for i in c) == list(range(n))
    assert set(metrics) == {"loss", "ce", "kd"}


def test_batches_are_reshuffled_every_epoch():
    n = 20
    model = Recorder()
    train_supervised(
        model,
        make_optimizer("sgd", model, 0.0001),
        torch.arange(n, dtype=torch.float32)[:, None],
        torch.zeros(n, dtype=torch.long),
        epochs=2,
        batch_size=n,
        generator=gen(0),
    )
    first, second = model.calls
    assert sorted(first) == sorted(second) == list(range(n))
    assert first != second
    assert first != list(range(n))


def test_zero_epochs_changes_nothing():
    x, y = blobs(20)
    model = linear(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = train_supervised(
        model, make_optimizer("adam", model, 0.1), x, y, epochs=0, batch_size=4, generator=gen(0)
    )
    assert metrics == {"loss": 0.0, "ce": 0.0, "kd": 0.0}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_train_supervised_mixes_in_the_kd_term():
    x, y = blobs(64)
    public = torch.randn(32, 2, generator=gen(3))
    kd = KDTargets(public, torch.randn(32, 2, generator=gen(4)), SoftKL(2.0))
    model = linear(0)
    metrics = train_supervised(
        model,
        make_optimizer("sgd", model, 0.01),
        x,
        y,
        epochs=2,
        batch_size=16,
        generator=gen(0),
        kd=kd,
        kd_weight=0.25,
    )
    assert metrics["kd"] > 0
    assert metrics["loss"] == pytest.approx(0.75 * metrics["ce"] + 0.25 * metrics["kd"], rel=1e-5)


def test_kd_targets_are_ignored_with_zero_weight():
    x, y = blobs(32)
    kd = KDTargets(torch.randn(8, 2), torch.randn(8, 2), SoftKL(1.0))
    a, b = linear(0), linear(0)
    ma = train_supervised(
        a, make_optimizer("sgd", a, 0.1), x, y, epochs=1, batch_size=8, generator=gen(0)
    )
    mb = train_supervised(
        b,
        make_optimizer("sgd", b, 0.1),
        x,
        y,
        epochs=1,
        batch_size=8,
        generator=gen(0),
        kd=kd,
        kd_weight=0.0,
    )
    assert ma == mb
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


# --- distillation --------------------------------------------------------------------


def test_distill_moves_logits_toward_targets():
    public = torch.randn(128, 5, generator=gen(0))
    teacher = linear(1, 5, 4)
    with torch.no_grad():
        targets = teacher(public)
    student = linear(2, 5, 4)
    kd = KDTargets(public, targets, SoftKL(2.0))

    def divergence() -> float:
        return SoftKL(2.0)(predict_logits(student, public), targets).item()

    before = divergence()
    metrics = distill(
        student,
        make_optimizer("adam", student, 0.05),
        kd,
        epochs=30,
        batch_size=32,
        generator=gen(0),
    )
    after = divergence()
    assert after < 0.1 * before
    assert metrics["kd"] > after  # the average over training includes the early, worse steps
    agree = (predict_logits(student, public).argmax(1) == targets.argmax(1)).float().mean()
    assert agree > 0.9


def test_distill_is_reproducible_and_uses_every_target():
    public = torch.arange(10, dtype=torch.float32)[:, None]
    recorder = Recorder()
    kd = KDTargets(public, torch.zeros(10, 2), SoftKL(1.0))
    distill(
        recorder,
        make_optimizer("sgd", recorder, 0.001),
        kd,
        epochs=2,
        batch_size=4,
        generator=gen(0),
    )
    assert [len(c) for c in recorder.calls] == [4, 4, 2] * 2
    for e in range(2):
        assert sorted(i for c in recorder.calls[3 * e : 3 * e + 3] for i in c) == list(range(10))


# --- prediction and evaluation -------------------------------------------------------


class Fixed(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x[:, 0].long()] + 0 * self.dummy


def test_evaluate_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 0.5]])
    y = torch.tensor([0, 1, 1, 1])
    x = torch.arange(4, dtype=torch.float32)[:, None]
    metrics = evaluate(Fixed(logits), x, y)
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, y).item())


def test_predict_logits_keeps_mode_and_batches():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5))
    x = torch.randn(10, 3, generator=gen(0))
    model.train()
    out = predict_logits(model, x, batch_size=3)
    assert model.training  # mode restored
    assert not out.requires_grad
    model.eval()
    torch.testing.assert_close(out, model(x))  # eval mode: no dropout
    model.eval()
    predict_logits(model, x)
    assert not model.training
    assert predict_logits(model, x[:0]).shape[0] == 0


def test_make_optimizer():
    model = linear(0)
    opt = make_optimizer("sgd", model, 0.125)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["lr"] == 0.125
    assert isinstance(make_optimizer("adamw", model, 0.1), torch.optim.AdamW)
    with pytest.raises(UnknownNameError, match="known: adam, adamw, sgd"):
        make_optimizer("adagrad", model, 0.1)


def test_to_tensor():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::2]
    t = to_tensor(a)
    assert t.dtype == torch.float32 and t.device.type == "cpu"
    np.testing.assert_array_equal(t.numpy(), a)


# --- seeds ---------------------------------------------------------------------------


def test_derive_seed_is_deterministic():
    assert derive_seed(0, "split") == derive_seed(0, "split")
    assert derive_seed(7, "client", 3, 2) == derive_seed(7, "client", 3, 2)
    # pinned: changing the derivation would silently change every run's data and batches
    assert derive_seed(0, "split") == 3770521055
    assert derive_seed(7, "client", 3, 2) == 2600168936


def test_derive_seed_range_and_type():
    for s in (derive_seed(0, "a"), derive_seed(2**40, "b", 1, 2), derive_seed(5, "")):
        assert type(s) is int
        assert 0 <= s < 2**32


def test_derive_seed_differs_across_inputs():
    # purposes and run seeds
    seeds = [derive_seed(0, p) for p in ("dataset", "split", "partition", "teacher")]
    seeds += [derive_seed(1, "split"), derive_seed(2, "split")]
    assert len(set(seeds)) == len(seeds)
    # keys of the same arity (as every call site uses them)
    one = [derive_seed(0, "student", cid) for cid in range(5)]
    two = [derive_seed(0, "client", *k) for k in ((1, 0), (0, 1), (1, 2), (2, 1), (2, 2))]
    assert len(set(one)) == len(one)
    assert len(set(two)) == len(two)
    assert derive_seed(0, "client", 1, 2) != derive_seed(0, "client-global", 1, 2)


def test_derive_seed_rarely_collides_over_rounds_and_clients():
    seeds = {derive_seed(0, "client", rnd, cid) for rnd in range(1, 51) for cid in range(100)}
    assert len(seeds) == 50 * 100


@pytest.mark.parametrize(("short", "long"), [((1,), (1, 0)), ((), (0,)), ((), (0, 0))])
def test_derive_seed_distinguishes_trailing_zero_keys(short, long):
    assert derive_seed(0, "client", *short) != derive_seed(0, "client", *long)


def test_torch_generator():
    a, b, c = torch_generator(0, "x", 1), torch_generator(0, "x", 1), torch_generator(0, "x", 2)
    assert isinstance(a, torch.Generator)
    assert a.initial_seed() == derive_seed(0, "x", 1)
    ra, rb, rc = (torch.randperm(50, generator=g) for g in (a, b, c))
    assert torch.equal(ra, rb)
    assert not torch.equal(ra, rc)
