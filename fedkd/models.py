"""Model architectures by name, for students and teachers alike, and their features.

A model factory takes ``(input_shape, num_classes, **params)`` and returns an
``nn.Module`` mapping a batch of inputs to logits. Add your own with
``@MODELS.register("name")`` or name a factory / ``nn.Module`` subclass by import path.

Features (for distillation on representations, not only on logits):
:func:`features` ``(model, x)`` returns, from ONE forward pass, a dict in forward order:

- ``"stage1"``, ``"stage2"``, ...: for convolutional models, the output of each block
  group, ``[B, C, L]`` (1-D) or ``[B, C, H, W]`` (2-D). In plain CNNs (cnn1d, cnn2d,
  lenet5, fedmd_cnn*, vgg*) a stage is a block of convolutions with the pooling that
  closes it (cnn1d: each strided convolution opens one); in ResNets, MobileNetV2 and
  ShuffleNetV2 it is the blocks run at one resolution (a strided block opens the next).
  The last stage is the map that is pooled or flattened into the head. Counts: cnn1d 3,
  cnn2d 2, lenet5 2, fedmd_cnn2 2, fedmd_cnn3 3, resnet* 3, vgg9 3, vgg11 5,
  mobilenetv2 4, shufflenetv2 4; logreg and mlp have none.
- ``"embedding"``: ``[B, D]``, the input of the final linear classifier (after any
  dropout in front of it, so in train mode it is exactly what the classifier saw).
- ``"logits"``: ``[B, num_classes]``, computed from the tensors above, so a loss on any
  of them trains everything before it; in eval mode they equal ``model(x)``, and in
  train mode BatchNorm statistics move once, as in a call of ``model(x)``.

Built-in models implement :class:`FeatureModel` (``forward_features``); a user's
``nn.Sequential`` ending in ``nn.Linear`` gets ``"embedding"`` and ``"logits"``
generically; any other module raises :class:`FeatureError` from :func:`features` but
still works wherever only ``model(x)`` is used. Opacus' ``GradSampleModule`` (DP-SGD,
hooks mode) is looked through, so per-sample gradients still flow. :func:`feature_names`,
:func:`feature_shapes` and :func:`embedding_dim` size adapters from a dry run.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from fedkd.config import Spec
from fedkd.registry import Registry, bind_params

ModelFn = Callable[..., nn.Module]
MODELS: Registry[ModelFn] = Registry(
    "model", check=callable, autoload="fedkd.zoo", group="fedkd.models"
)


# --- features ------------------------------------------------------------------------------


class FeatureError(TypeError):
    """A model that cannot return named features (see :class:`FeatureModel`)."""


@runtime_checkable
class FeatureModel(Protocol):
    """A model that returns its named intermediate features from one forward pass.

    ``forward_features(x)`` returns a dict in forward order with at least ``"embedding"``
    (``[B, D]``, the classifier's input) and ``"logits"`` (``[B, classes]``, computed from
    it), plus ``"stage1"``, ``"stage2"``, ... for models with convolutional stages.

    Example:
        class MyNet(nn.Module):
            def forward_features(self, x):
                h = self.body(x)
                emb = self.pool(h).flatten(1)
                return {"stage1": h, "embedding": emb, "logits": self.head(emb)}

            def forward(self, x):
                return self.forward_features(x)["logits"]
    """

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]: ...


def _sequential_features(
    seq: nn.Sequential, x: torch.Tensor, stage_ends: Sequence[int] = ()
) -> dict[str, torch.Tensor]:
    """Run ``seq`` module by module, keeping the outputs at ``stage_ends`` and the input
    of its last module (an ``nn.Linear``) as the embedding."""
    modules = list(seq)
    ends = set(stage_ends)
    out: dict[str, torch.Tensor] = {}
    for i, module in enumerate(modules[:-1]):
        x = module(x)
        if i in ends:
            out[f"stage{len(out) + 1}"] = x
    if x.dim() != 2:
        raise FeatureError(
            f"{type(seq).__name__}: the final nn.Linear gets a {x.dim()}-D input of shape "
            f"{tuple(x.shape)}; an embedding must be [batch, features] (add nn.Flatten())"
        )
    out["embedding"] = x
    out["logits"] = modules[-1](x)
    return out


class StagedSequential(nn.Sequential):
    """An ``nn.Sequential`` ending in ``nn.Linear`` that knows where its stages end.

    Same modules, indexing and ``state_dict`` keys as the plain ``nn.Sequential`` the
    built-in factories returned before, plus :meth:`forward_features`. A slice
    (``model[:-1]``) is a StagedSequential without stages; after inserting or deleting
    modules, ``stage_ends`` must be fixed by hand.

    Args:
        *modules: the layers, in order; features need the last to be an ``nn.Linear``.
        stage_ends: index of the last module of each stage, increasing.
    """

    def __init__(self, *modules: nn.Module, stage_ends: Sequence[int] = ()) -> None:
        super().__init__(*modules)  # also called by slicing, with one OrderedDict
        ends = tuple(int(i) for i in stage_ends)
        if list(ends) != sorted(set(ends)) or any(not 0 <= i < len(self) - 1 for i in ends):
            raise ValueError(f"stage_ends must increase within 0..{len(self) - 2}, got {ends}")
        self.stage_ends = ends

    @classmethod
    def from_stages(
        cls, stages: Sequence[Sequence[nn.Module]], head: Sequence[nn.Module]
    ) -> StagedSequential:
        """Modules of each stage in turn, then the ``head`` (flatten ... classifier)."""
        ends = [n - 1 for n in accumulate(len(stage) for stage in stages)]
        return cls(*(m for stage in stages for m in stage), *head, stage_ends=ends)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stages, embedding and logits of one pass (see :func:`features`)."""
        if not len(self) or not isinstance(self[-1], nn.Linear):
            raise FeatureError(f"{type(self).__name__} features need an nn.Linear last")
        return _sequential_features(self, x, self.stage_ends)


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside Opacus' hooks-mode ``GradSampleModule``, whose hooks sit
    on the inner layers, so per-sample gradients are still recorded."""
    if "opacus" not in sys.modules:  # nothing can be wrapped; do not import it
        return model
    from opacus.grad_sample import GradSampleModule
    from opacus.grad_sample.gsm_base import AbstractGradSampleModule

    if isinstance(model, GradSampleModule):
        return model._module
    if isinstance(model, AbstractGradSampleModule):
        raise FeatureError(
            f"features() cannot look inside Opacus' {type(model).__name__}; "
            "use grad_sample_mode='hooks' (the default GradSampleModule)"
        )
    return model


def features(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Named features of ``model`` on ``x`` from one forward pass, in forward order.

    Returns at least ``"embedding"`` (``[B, D]``) and ``"logits"`` (``[B, classes]``),
    plus ``"stage1"``, ... for convolutional models (see the module docstring). Works in
    train and eval mode, under ``torch.autocast`` and through Opacus' GradSampleModule.

    Raises:
        FeatureError: ``model`` neither implements :class:`FeatureModel` nor is an
            ``nn.Sequential`` ending in ``nn.Linear``, or its features lack a key.
    """
    inner = _unwrap(model)
    if isinstance(inner, FeatureModel):
        out = inner.forward_features(x)
    elif isinstance(inner, nn.Sequential) and len(inner) and isinstance(inner[-1], nn.Linear):
        out = _sequential_features(inner, x)
    else:
        name = type(inner).__qualname__
        raise FeatureError(
            f"model {name} does not expose features: give it a method "
            f"forward_features(self, x) -> dict[str, Tensor] returning at least 'embedding' "
            f"([batch, D], the classifier's input) and 'logits' from the same pass (see "
            f"fedkd.models.FeatureModel), or build it as an nn.Sequential ending in nn.Linear; "
            f"methods that only need model(x) work without it"
        )
    if not isinstance(out, dict) or not {"embedding", "logits"} <= out.keys():
        keys = sorted(out) if isinstance(out, dict) else type(out).__name__
        raise FeatureError(
            f"{type(inner).__qualname__}.forward_features must return a dict with 'embedding' "
            f"and 'logits', got {keys}"
        )
    for key in ("embedding", "logits"):
        if out[key].dim() != 2:
            raise FeatureError(
                f"{type(inner).__qualname__}.forward_features: {key!r} must be 2-D "
                f"[batch, width], got shape {tuple(out[key].shape)}"
            )
    return out


@torch.no_grad()
def feature_shapes(model: nn.Module, input_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Per-sample shape of each feature (batch dimension dropped), in forward order.

    A dry run on a zero batch of 2 in eval mode: BatchNorm statistics, the RNG and each
    module's train / eval mode are left as they were.
    """
    modes = [(m, m.training) for m in model.modules()]
    ref = next(iter(model.parameters()), None)
    if ref is None:
        ref = next(iter(model.buffers()), torch.zeros(()))
    dtype = ref.dtype if ref.is_floating_point() else torch.get_default_dtype()
    model.eval()
    try:
        out = features(model, torch.zeros(2, *input_shape, dtype=dtype, device=ref.device))
    finally:
        for m, training in modes:
            m.training = training
    return {name: tuple(t.shape[1:]) for name, t in out.items()}


def feature_names(model: nn.Module, input_shape: Sequence[int]) -> list[str]:
    """Names of :func:`features` for inputs of ``input_shape``, in forward order."""
    return list(feature_shapes(model, input_shape))


def embedding_dim(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Width D of the ``"embedding"`` feature for inputs of ``input_shape``."""
    return feature_shapes(model, input_shape)["embedding"][0]


# --- built-in models ------------------------------------------------------------------------


@MODELS.register("logreg")
def logreg(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multinomial logistic regression on flattened inputs (embedding: the inputs)."""
    return StagedSequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


@MODELS.register("mlp")
def mlp(
    input_shape: tuple[int, ...], num_classes: int, hidden: int = 100, layers: int = 2
) -> nn.Module:
    """Fully connected ReLU network (MNIST-1D paper: 2 hidden layers of 100)."""
    dims = [math.prod(input_shape)] + [hidden] * layers
    blocks: list[nn.Module] = [nn.Flatten()]
    for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
        blocks += [nn.Linear(d_in, d_out), nn.ReLU()]
    blocks.append(nn.Linear(dims[-1], num_classes))
    return StagedSequential(*blocks)


class _AddChannel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1) if x.dim() == 2 else x


_WIDTHS: dict[tuple[Any, ...], int] = {}


@torch.no_grad()
def _flat_width(
    stages: Sequence[Sequence[nn.Module]], input_shape: tuple[int, ...], key: tuple[Any, ...]
) -> int:
    """Features per sample after ``stages`` (no BatchNorm or dropout in them here), by a
    dry run on zeros (no random numbers drawn), remembered by ``key`` (the factory and its
    arguments): a worker builds a student per client per round."""
    if key not in _WIDTHS:
        net = nn.Sequential(*(m for s in stages for m in s))
        _WIDTHS[key] = int(net(torch.zeros(1, *input_shape)).numel())
    return _WIDTHS[key]


@MODELS.register("cnn1d")
def cnn1d(
    input_shape: tuple[int, ...], num_classes: int, channels: int = 25, kernel: int = 5
) -> nn.Module:
    """1-D CNN for sequences (MNIST-1D paper's ConvBase): three strided convolutions,
    one stage each."""
    in_ch = 1 if len(input_shape) == 1 else input_shape[0]
    stages = [
        [
            _AddChannel(),
            nn.Conv1d(in_ch, channels, kernel, stride=2, padding=kernel // 2),
            nn.ReLU(),
        ],
        [nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU()],
        [nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU()],
    ]
    width = _flat_width(stages, input_shape, ("cnn1d", input_shape, channels, kernel))
    return StagedSequential.from_stages(stages, [nn.Flatten(), nn.Linear(width, num_classes)])


@MODELS.register("cnn2d")
def cnn2d(input_shape: tuple[int, ...], num_classes: int, channels: int = 32) -> nn.Module:
    """Small LeNet-style CNN for (C, H, W) images (MNIST, CIFAR-10): two conv-pool stages."""
    if len(input_shape) != 3:
        raise ValueError(f"cnn2d needs (channels, height, width) inputs, got shape {input_shape}")
    stages = [
        [nn.Conv2d(input_shape[0], channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)],
        [nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)],
    ]
    width = _flat_width(stages, input_shape, ("cnn2d", input_shape, channels))
    head = [nn.Flatten(), nn.Linear(width, 128), nn.ReLU(), nn.Linear(128, num_classes)]
    return StagedSequential.from_stages(stages, head)


def check_model_spec(spec: Spec, path: str) -> None:
    """Fail on an unknown model name or parameter, naming the config field."""
    bind_params(MODELS.get(spec.name), spec.params, path, ("input_shape", "num_classes"))


def build_model(spec: Spec, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """Instantiate ``spec`` with weights initialised from ``seed`` (not the global RNG)."""
    factory = MODELS.get(spec.name)
    with torch.random.fork_rng(devices=[]):  # the CPU generator only: models start on it
        torch.random.default_generator.manual_seed(seed)
        model = factory(tuple(input_shape), num_classes, **spec.params)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {spec.name!r} returned {type(model).__name__}, not an nn.Module")
    return model
