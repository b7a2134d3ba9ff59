"""Model weights as :class:`~fedkd.payloads.Weights` payloads (FedAvg-style strategies)."""

from __future__ import annotations

import torch
from torch import nn

from fedkd.payloads import Weights


def model_weights(model: nn.Module) -> Weights:
    """A model's state dict as a :class:`Weights` payload (CPU NumPy copies)."""
    return Weights({k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()})


def load_weights(model: nn.Module, weights: Weights) -> None:
    """Load a :class:`Weights` payload into ``model`` (names and shapes must match)."""
    device = next(model.parameters()).device
    model.load_state_dict(
        {k: torch.as_tensor(v, device=device) for k, v in weights.tensors.items()}
    )
