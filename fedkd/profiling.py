"""Size and speed of each architecture: what distillation buys at deployment time."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn


def model_size(model: nn.Module) -> dict[str, int]:
    """Parameter count and bytes of parameters plus buffers."""
    params = sum(p.numel() for p in model.parameters())
    nbytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return {"params": int(params), "bytes": int(nbytes)}


@torch.no_grad()
def cpu_latency_ms(
    model: nn.Module, input_shape: tuple[int, ...], *, repeats: int = 200, batch: int = 1
) -> float:
    """Median CPU latency of one forward pass per sample, in milliseconds, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = model.eval().cpu()
        x = torch.zeros(batch, *input_shape)
        for _ in range(20):  # warm-up
            model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times) / batch
    finally:
        torch.set_num_threads(threads)


def profile_model(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, Any]:
    return {**model_size(model), "latency_ms": cpu_latency_ms(model, input_shape)}
