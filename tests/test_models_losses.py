"""Model factories, seeded construction, distillation losses and model size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedkd.config import Spec
from fedkd.losses import KD_LOSSES, LogitMSE, SoftKL
from fedkd.models import MODELS, build_model
from fedkd.profiling import model_size

ONE_D_MODELS = ["logreg", "mlp", "cnn1d"]  # the image models (cnn2d, fedkd.zoo) refuse 1-D input


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


# --- models --------------------------------------------------------------------------


def test_builtin_models_are_registered():
    assert {"logreg", "mlp", "cnn1d", "cnn2d"} <= set(MODELS.names())


@pytest.mark.parametrize("name", ONE_D_MODELS)
@pytest.mark.parametrize("batch", [1, 7])
def test_1d_models_map_inputs_to_logits(name, batch):
    model = build_model(Spec(name), (40,), 10, seed=0)
    assert isinstance(model, nn.Module)
    out = model(torch.randn(batch, 40, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (batch, 10)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ONE_D_MODELS)
def test_1d_models_backpropagate_to_every_parameter(name):
    model = build_model(Spec(name), (40,), 10, seed=0)
    model(torch.randn(4, 40, generator=torch.Generator().manual_seed(1))).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname


def test_cnn2d_maps_images_to_logits():
    model = build_model(Spec("cnn2d"), (1, 28, 28), 10, seed=0)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    rgb = build_model(Spec("cnn2d", {"channels": 8}), (3, 32, 32), 5, seed=0)
    assert rgb(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_cnn2d_rejects_1d_inputs():
    with pytest.raises(ValueError, match="cnn2d needs"):
        build_model(Spec("cnn2d"), (40,), 10, seed=0)


def test_cnn1d_takes_multichannel_sequences():
    model = build_model(Spec("cnn1d", {"channels": 8}), (3, 40), 4, seed=0)
    assert model(torch.randn(2, 3, 40)).shape == (2, 4)


def test_model_params_change_the_architecture():
    small = build_model(Spec("mlp", {"hidden": 8, "layers": 1}), (40,), 10, seed=0)
    big = build_model(Spec("mlp"), (40,), 10, seed=0)
    assert model_size(small)["params"] == 40 * 8 + 8 + 8 * 10 + 10
    assert model_size(big)["params"] == 40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10
    logreg = build_model(Spec("logreg"), (40,), 10, seed=0)
    assert model_size(logreg)["params"] == 40 * 10 + 10


@pytest.mark.parametrize("name", ONE_D_MODELS)
def test_build_model_is_seeded(name):
    a = _weights(build_model(Spec(name), (40,), 10, seed=3))
    b = _weights(build_model(Spec(name), (40,), 10, seed=3))
    c = _weights(build_model(Spec(name), (40,), 10, seed=4))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_build_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model(Spec("mlp"), (40,), 10, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_build_model_from_import_path():
    model = build_model(Spec("fedkd.models:logreg"), (40,), 10, seed=0)
    assert model(torch.zeros(2, 40)).shape == (2, 10)


def test_build_model_rejects_non_modules():
    with pytest.raises(TypeError, match="not an nn.Module"):
        build_model(Spec("builtins:slice"), (40,), 10, seed=0)


# --- SoftKL --------------------------------------------------------------------------

STUDENT = np.array([[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, -3.0, 1.5], [1.0, 1.0, 1.0, -2.0]])
TEACHER = np.array([[0.5, 0.0, 3.0, -1.0], [-2.0, 1.0, 0.0, 0.5], [3.0, -1.0, 0.0, 0.0]])


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _hand_soft_kl(student: np.ndarray, teacher: np.ndarray, t: float) -> float:
    p_s, p_t = _softmax(student / t), _softmax(teacher / t)
    per_row = (p_t * (np.log(p_t) - np.log(p_s))).sum(axis=1)
    return float(t * t * per_row.mean())


@pytest.mark.parametrize("t", [1.0, 3.0])
def test_soft_kl_matches_hand_computation(t):
    loss = SoftKL(temperature=t)(
        torch.tensor(STUDENT, dtype=torch.float32), torch.tensor(TEACHER, dtype=torch.float32)
    )
    expected = _hand_soft_kl(STUDENT, TEACHER, t)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # the example is asymmetric enough that the reversed KL would be caught
    assert _hand_soft_kl(TEACHER, STUDENT, t) != pytest.approx(expected, rel=1e-2)
    # and large enough that forgetting T^2 would be caught at T=3
    if t != 1.0:
        assert expected / (t * t) != pytest.approx(expected, rel=1e-2)


def test_soft_kl_hand_values_are_pinned():
    # independent of the helper above: the value at T=1 for the first row only
    s, te = STUDENT[:1], TEACHER[:1]
    p_s = np.exp(s) / np.exp(s).sum()
    p_t = np.exp(te) / np.exp(te).sum()
    by_hand = float((p_t * np.log(p_t / p_s)).sum())
    got = SoftKL(1.0)(torch.tensor(s, dtype=torch.float32), torch.tensor(te, dtype=torch.float32))
    assert got.item() == pytest.approx(by_hand, rel=1e-5)


@pytest.mark.parametrize("t", [0.5, 1.0, 4.0])
def test_soft_kl_is_zero_for_identical_logits(t):
    logits = torch.tensor(STUDENT, dtype=torch.float32)
    assert SoftKL(t)(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)
    # softmax is shift-invariant per row
    assert SoftKL(t)(logits + 5.0, logits).item() == pytest.approx(0.0, abs=1e-5)
    # and anything else is strictly positive
    assert SoftKL(t)(logits, torch.tensor(TEACHER, dtype=torch.float32)).item() > 1e-3


@pytest.mark.parametrize("t", [0.0, -1.0])
def test_soft_kl_rejects_non_positive_temperature(t):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SoftKL(temperature=t)


def _student_grad(t: float, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    s = student.clone().requires_grad_(True)
    SoftKL(t)(s, teacher).backward()
    return s.grad


def test_t_squared_keeps_gradients_comparable_across_temperatures():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 10, generator=gen), torch.randn(8, 10, generator=gen)
    norms = {t: _student_grad(t, student, teacher).norm().item() for t in (4.0, 8.0, 16.0)}
    # without the T^2 factor the norm would shrink ~4x per doubling of T
    assert norms[8.0] == pytest.approx(norms[4.0], rel=0.15)
    assert norms[16.0] == pytest.approx(norms[8.0], rel=0.05)
    # high-temperature limit (Hinton et al.): grad -> (s - t) / (num_classes * batch),
    # for zero-mean logits
    s0 = student - student.mean(1, keepdim=True)
    t0 = teacher - teacher.mean(1, keepdim=True)
    limit = (s0 - t0) / (10 * 8)
    torch.testing.assert_close(_student_grad(64.0, s0, t0), limit, rtol=0.05, atol=2e-4)


def test_kd_loss_registry():
    assert KD_LOSSES.get("soft_kl") is SoftKL
    assert KD_LOSSES.get("mse") is LogitMSE


def test_logit_mse_matches_numpy():
    got = LogitMSE()(torch.tensor(STUDENT), torch.tensor(TEACHER)).item()
    assert got == pytest.approx(float(((STUDENT - TEACHER) ** 2).mean()), rel=1e-12)


# --- profiling -----------------------------------------------------------------------


def test_model_size_of_linear():
    assert model_size(nn.Linear(4, 3)) == {"params": 15, "bytes": 60}
    assert model_size(nn.Linear(4, 3, bias=False)) == {"params": 12, "bytes": 48}


def test_model_size_counts_buffers_in_bytes_only():
    bn = nn.BatchNorm1d(4)  # 8 params; buffers: 2 x 4 float32 + one int64 counter
    assert model_size(bn) == {"params": 8, "bytes": 8 * 4 + 8 * 4 + 8}


def test_model_size_respects_dtype():
    assert model_size(nn.Linear(4, 3).double()) == {"params": 15, "bytes": 120}
