"""Shape checks shared by the image models."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def image_shape(name: str, input_shape: tuple[int, ...], min_size: int) -> tuple[int, int, int]:
    """``(C, H, W)`` of ``input_shape``, or a ValueError naming ``name`` and the shape."""
    if len(input_shape) != 3 or min(input_shape) < 1 or min(input_shape[1:]) < min_size:
        raise ValueError(
            f"{name} needs (channels, height, width) images of at least {min_size}x{min_size} "
            f"pixels, got shape {tuple(input_shape)}"
        )
    c, h, w = input_shape
    return c, h, w


@torch.no_grad()
def flat_width(
    name: str, stages: Sequence[Sequence[nn.Module]], input_shape: tuple[int, ...]
) -> int:
    """Features per sample after the modules of ``stages``, found by a dry run that leaves
    no trace.

    The run is in eval mode, so BatchNorm statistics and the RNG (dropout) are untouched.
    """
    features = nn.Sequential(*(m for stage in stages for m in stage))
    features.eval()
    try:
        out = features(torch.zeros(1, *input_shape))
    except RuntimeError as err:  # a feature map shrank to nothing
        raise ValueError(f"{name} cannot take inputs of shape {tuple(input_shape)}: {err}") from err
    finally:
        features.train()
    return int(out[0].numel())
