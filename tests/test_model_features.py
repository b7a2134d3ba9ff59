"""Named features of every registered model: ``fedkd.models.features`` and its helpers."""

from __future__ import annotations

import copy
import functools
import hashlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedkd.config import Spec
from fedkd.models import (
    MODELS,
    FeatureError,
    FeatureModel,
    StagedSequential,
    build_model,
    embedding_dim,
    feature_names,
    feature_shapes,
    features,
)

ONE_D = ("logreg", "mlp", "cnn1d")  # built on (40,); every other model on 3x32x32
# stages per built-in model, as the fedkd.models docstring documents them
STAGES = {
    "logreg": 0,
    "mlp": 0,
    "cnn1d": 3,
    "cnn2d": 2,
    "lenet5": 2,
    "fedmd_cnn2": 2,
    "fedmd_cnn3": 3,
    "resnet8": 3,
    "resnet20": 3,
    "resnet32": 3,
    "resnet8_gn": 3,
    "resnet20_gn": 3,
    "resnet32_gn": 3,
    "vgg9": 3,
    "vgg11": 5,
    "mobilenetv2": 4,
    "shufflenetv2": 4,
}
# state_dict of each model before models exposed features (plain nn.Sequential /
# CifarResNet), 10 classes: (number of entries, sha256[:16] of "key:shape\n" lines).
# Checkpoints and saved weights of earlier versions load only while these hold.
STATE_DICT = {
    "cnn1d": (8, "2cc9ab5673d0b88f"),
    "cnn2d": (8, "90de53366de03281"),
    "fedmd_cnn2": (15, "6152dc7e5002bcbe"),
    "fedmd_cnn3": (22, "23ee5edba77ec781"),
    "lenet5": (10, "5527ca7e23df35e7"),
    "logreg": (2, "6b4f0b62ce0e1f96"),
    "mlp": (6, "734a8ee2adde7a70"),
    "mobilenetv2": (314, "3e61cfe8504003e0"),
    "resnet20": (116, "055e7714ed39d950"),
    "resnet20_gn": (59, "ce8622761b0fadb8"),
    "resnet32": (188, "795f43c0e39fb959"),
    "resnet32_gn": (95, "572ca526b8c3c570"),
    "resnet8": (44, "3e824a3f286b73c4"),
    "resnet8_gn": (23, "506bef657136c142"),
    "shufflenetv2": (338, "d5a751f5ce5ba4d8"),
    "vgg11": (58, "9c4dbf662f65acc3"),
    "vgg9": (18, "9a8970bcd4365b2b"),
}
# the models other tests index by position (e.g. node.model[1] on logreg)
KEYS = {
    "logreg": ["1.weight", "1.bias"],
    "mlp": ["1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias"],
    "cnn1d": [
        "1.weight",
        "1.bias",
        "3.weight",
        "3.bias",
        "5.weight",
        "5.bias",
        "8.weight",
        "8.bias",
    ],
    "cnn2d": [
        "0.weight",
        "0.bias",
        "3.weight",
        "3.bias",
        "7.weight",
        "7.bias",
        "9.weight",
        "9.bias",
    ],
}
NAMES = sorted(STAGES)


def _shape(name: str) -> tuple[int, ...]:
    return (40,) if name in ONE_D else (3, 32, 32)


@functools.cache
def _built(name: str) -> nn.Module:
    return build_model(Spec(name), _shape(name), 10, seed=0)


def _model(name: str) -> nn.Module:
    return copy.deepcopy(_built(name))


def _x(shape: tuple[int, ...], batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))


def _classifier(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def _expected_names(name: str) -> list[str]:
    return [f"stage{i}" for i in range(1, STAGES[name] + 1)] + ["embedding", "logits"]


def test_every_builtin_model_is_covered():
    builtin = {n for n in MODELS.names() if MODELS.get(n).__module__.startswith("fedkd.")}
    assert builtin == set(STAGES) == set(STATE_DICT)


@pytest.mark.parametrize("name", NAMES)
def test_features_match_forward_in_eval_mode(name):
    model, x = _model(name).eval(), _x(_shape(name))
    with torch.no_grad():
        out = features(model, x)
        logits = model(x)
    assert list(out) == _expected_names(name)
    torch.testing.assert_close(out["logits"], logits)
    assert out["embedding"].shape == (2, _classifier(model).in_features)
    sizes = []
    for i in range(1, STAGES[name] + 1):
        stage = out[f"stage{i}"]
        assert stage.dim() == (3 if name == "cnn1d" else 4) and stage.shape[0] == 2
        sizes.append(stage.shape[2:].numel())
    assert sizes == sorted(sizes, reverse=True)  # resolution never grows along the stages


@pytest.mark.parametrize("name", NAMES)
def test_one_pass_in_train_mode_gradients_flow_through_every_feature(name):
    model = _model(name).train()
    out = features(model, _x(_shape(name)).requires_grad_())  # logreg's embedding is x
    names = list(out)
    # each feature is computed from the one before it (so from one pass, in this order):
    # autograd.grad raises if a later tensor does not depend on the earlier one
    for earlier, later in zip(names[:-1], names[1:], strict=True):
        (grad,) = torch.autograd.grad(out[later].sum(), out[earlier], retain_graph=True)
        assert grad.shape == out[earlier].shape
    first = next(model.parameters())
    if name == "logreg":  # its embedding is the flattened input: nothing to train before it
        return
    out["embedding"].pow(2).mean().backward()
    assert first.grad is not None and first.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_keys_are_those_of_earlier_versions(name):
    model = _built(name)
    text = "".join(f"{k}:{tuple(v.shape)}\n" for k, v in model.state_dict().items())
    fingerprint = (len(model.state_dict()), hashlib.sha256(text.encode()).hexdigest()[:16])
    assert fingerprint == STATE_DICT[name], list(model.state_dict())[:8]
    if name in KEYS:
        assert list(model.state_dict()) == KEYS[name]
        assert isinstance(model, nn.Sequential)
        plain = nn.Sequential(*model)  # a model as earlier versions built it
        plain.load_state_dict(model.state_dict())
        _model(name).load_state_dict(plain.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_feature_names_and_embedding_dim_leave_the_model_as_it_was(name):
    model = _model(name).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert feature_names(model, _shape(name)) == _expected_names(name)
    assert embedding_dim(model, _shape(name)) == _classifier(model).in_features
    assert all(m.training for m in model.modules())
    for k, v in model.state_dict().items():  # BatchNorm statistics untouched
        assert torch.equal(v, before[k]), k


def test_images_of_another_size_give_other_stage_shapes():
    model = build_model(Spec("resnet8"), (1, 28, 28), 10, seed=0)
    shapes = feature_shapes(model, (1, 28, 28))
    assert shapes["stage1"] == (16, 28, 28) and shapes["stage3"] == (64, 7, 7)
    assert shapes["embedding"] == (64,) and shapes["logits"] == (10,)


@pytest.mark.parametrize("name", ["cnn2d", "resnet8"])
def test_features_under_autocast(name):
    model, x = _model(name).eval(), _x(_shape(name))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = features(model, x)
        logits = model(x)
    assert out["logits"].dtype == torch.bfloat16
    torch.testing.assert_close(out["logits"], logits)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # x needs no gradient
@pytest.mark.parametrize("name", ["cnn2d", "resnet8_gn"])
def test_features_through_opacus_grad_sample_module(name):
    from opacus.grad_sample import GradSampleModule

    gsm = GradSampleModule(_model(name).train())
    x, y = _x(_shape(name), batch=3), torch.arange(3)
    first = next(gsm.parameters())
    try:
        with torch.no_grad():  # no activations recorded: Opacus pairs each forward with a backward
            logits = gsm(x)
        out = features(gsm, x)
        assert list(out) == _expected_names(name)
        torch.testing.assert_close(out["logits"], logits)  # no dropout, no BatchNorm
        F.cross_entropy(out["logits"], y).backward()
        per_sample = first.grad_sample.clone()
        gsm.zero_grad(set_to_none=True)
        F.cross_entropy(gsm(x), y).backward()
        torch.testing.assert_close(per_sample, first.grad_sample)  # same as through forward
        gsm.zero_grad(set_to_none=True)
        out = features(gsm, x)
        (out["embedding"].pow(2).mean() + F.cross_entropy(out["logits"], y)).backward()
        assert first.grad_sample is not None and first.grad_sample.shape[0] == 3
        assert embedding_dim(gsm, _shape(name)) == out["embedding"].shape[1]
    finally:
        gsm._close()


class _Opaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(40, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


class _WithFeatures(_Opaque):
    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        emb = torch.relu(self.body(x))
        return {"embedding": emb, "logits": self.head(emb)}


class _Broken(_Opaque):
    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self(x)}


def test_a_module_without_features_still_gives_logits_and_names_itself():
    model, x = _Opaque(), _x((40,))
    assert model(x).shape == (2, 3)  # logit-only use is untouched
    assert not isinstance(model, FeatureModel)
    with pytest.raises(FeatureError, match=r"_Opaque.*forward_features") as err:
        features(model, x)
    assert isinstance(err.value, TypeError)
    with pytest.raises(FeatureError, match="_Opaque"):
        feature_names(model, (40,))
    with pytest.raises(FeatureError, match="model Sequential"):  # not ending in Linear
        features(nn.Sequential(_Opaque(), nn.ReLU()), x)


def test_a_module_with_forward_features_works():
    model, x = _WithFeatures(), _x((40,))
    assert isinstance(model, FeatureModel)
    out = features(model, x)
    assert list(out) == ["embedding", "logits"]
    torch.testing.assert_close(out["logits"], model(x))
    assert embedding_dim(model, (40,)) == 16
    with pytest.raises(FeatureError, match=r"_Broken.*'embedding'"):
        features(_Broken(), x)


def test_a_plain_sequential_ending_in_linear_gives_embedding_and_logits():
    model = nn.Sequential(nn.Flatten(), nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 3))
    out = features(model, _x((40,)))
    assert list(out) == ["embedding", "logits"] and out["embedding"].shape == (2, 16)
    with pytest.raises(FeatureError, match=r"3-D input.*\[batch, features\]"):
        features(nn.Sequential(nn.Linear(40, 3)), _x((2, 40)))


def test_staged_sequential_slices_and_checks_its_stages():
    model = _model("cnn2d")
    assert model.stage_ends == (2, 5)
    trunk = model[:6]  # a plain slice still works as a feature extractor module
    assert trunk(_x((3, 32, 32))).shape == (2, 64, 8, 8)
    with pytest.raises(FeatureError, match="nn.Linear last"):
        features(trunk, _x((3, 32, 32)))
    with pytest.raises(ValueError, match="stage_ends"):
        StagedSequential(nn.ReLU(), nn.Linear(4, 2), stage_ends=(1,))
