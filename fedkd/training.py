"""Training loops shared by every strategy: supervised, distillation, evaluation.

Batches are reshuffled every epoch by an explicit generator and the last partial
batch is kept, so every private sample is seen and runs are reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedkd.config import Spec
from fedkd.recipes import Recipe
from fedkd.registry import Registry

OPTIMIZERS: Registry[type[torch.optim.Optimizer]] = Registry(
    "optimizer", check=lambda c: isinstance(c, type) and issubclass(c, torch.optim.Optimizer)
)
OPTIMIZERS.register("adam")(torch.optim.Adam)
OPTIMIZERS.register("adamw")(torch.optim.AdamW)
OPTIMIZERS.register("sgd")(torch.optim.SGD)


def make_optimizer(spec: str | Spec, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Optimizer ``spec`` (a registered name, or a :class:`Spec` with its settings such as
    ``momentum``, ``nesterov``, ``weight_decay``, ``betas``) over ``model``, at rate ``lr``."""
    spec = Spec.parse(spec)
    return OPTIMIZERS.get(spec.name)(model.parameters(), lr=lr, **spec.params)


@dataclass
class KDTargets:
    """Soft targets on some public inputs, to distill into a model."""

    x: torch.Tensor  # public inputs for the target rows
    logits: torch.Tensor  # teacher logits, one row per input
    loss: nn.Module  # e.g. SoftKL(temperature)


@dataclass
class ClassKDTargets:
    """Per-class target logits for distillation on *private* samples (FD).

    A private sample labelled ``c`` is distilled towards ``logits[c]``; samples of
    classes with ``valid[c] == False`` get no distillation term.
    """

    logits: torch.Tensor  # (classes, classes)
    valid: torch.Tensor  # (classes,) bool
    loss: nn.Module


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    return list(torch.randperm(n, generator=generator).split(batch_size))


def train_supervised(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    kd: KDTargets | ClassKDTargets | None = None,
    kd_weight: float = 0.0,
    recipe: Recipe | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Cross-entropy on (x, y), optionally mixed with a distillation term.

    The loss is ``(1 - kd_weight) * CE + kd_weight * KD``. With :class:`KDTargets`
    each private batch is paired with a random public batch of the same size; with
    :class:`ClassKDTargets` the KD term is on the private batch itself, towards the
    target logits of each sample's class. ``recipe`` (:mod:`fedkd.recipes`) sets the
    rate before each step, clips gradients and smooths the CE labels; ``augment``
    (e.g. a seeded random crop and flip) transforms each batch of ``x``, never the
    public batches of the KD term.
    """
    recipe = recipe or Recipe()
    model.train()
    totals = {"loss": 0.0, "ce": 0.0, "kd": 0.0}
    steps = 0
    per_epoch = -(-len(y) // batch_size)
    lr = None
    for epoch in range(epochs):
        for rows in _batches(len(y), batch_size, generator):
            lr = recipe.set_lr(
                optimizer, epoch=epoch, epochs=epochs, step=steps, steps=epochs * per_epoch
            )
            with recipe.autocast(x.device):
                out = model(x[rows] if augment is None else augment(x[rows]))
                ce = F.cross_entropy(out, y[rows], label_smoothing=recipe.label_smoothing)
                loss = ce
                kd_loss = None
                if isinstance(kd, ClassKDTargets) and kd_weight > 0:
                    keep = kd.valid[y[rows]]
                    kd_loss = out.new_zeros(())  # same CE weight whether a batch has targets
                    if bool(keep.any()):  # batch mean over all samples, zero where no target
                        share = keep.float().mean()
                        kd_loss = share * kd.loss(out[keep], kd.logits[y[rows][keep]])
                elif kd is not None and kd_weight > 0:
                    pick = torch.randint(len(kd.logits), (len(rows),), generator=generator)
                    kd_loss = kd.loss(model(kd.x[pick]), kd.logits[pick])
                if kd_loss is not None:
                    loss = (1 - kd_weight) * ce + kd_weight * kd_loss
            if kd_loss is not None:
                totals["kd"] += kd_loss.item()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            recipe.clip(model)
            optimizer.step()
            totals["loss"] += loss.item()
            totals["ce"] += ce.item()
            steps += 1
    out_metrics = {k: v / max(steps, 1) for k, v in totals.items()}
    if lr is not None:
        out_metrics["lr"] = lr  # the rate of the last step (only when a schedule is set)
    return out_metrics


def distill(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    kd: KDTargets,
    *,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    max_steps: int | None = None,
    recipe: Recipe | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Fit ``model`` to the soft targets alone (no labels): ``epochs`` passes over them
    (stopping early after ``max_steps`` batches, if given). ``recipe`` sets the rate
    before each step and clips gradients (:mod:`fedkd.recipes`); ``augment`` transforms
    each batch of inputs (the targets stay those of the plain inputs)."""
    recipe = recipe or Recipe()
    model.train()
    total, steps = 0.0, 0
    per_epoch = -(-len(kd.logits) // batch_size)
    limit = float("inf") if max_steps is None else max_steps
    planned = int(min(epochs * per_epoch, limit))  # the step clock's length
    lr = None
    for epoch in range(epochs):
        if steps >= limit:
            break
        for rows in _batches(len(kd.logits), batch_size, generator):
            if steps >= limit:
                break
            lr = recipe.set_lr(optimizer, epoch=epoch, epochs=epochs, step=steps, steps=planned)
            inputs = kd.x[rows] if augment is None else augment(kd.x[rows])
            with recipe.autocast(inputs.device):
                loss = kd.loss(model(inputs), kd.logits[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            recipe.clip(model)
            optimizer.step()
            total += loss.item()
            steps += 1
    out = {"kd": total / max(steps, 1)}
    if lr is not None:
        out["lr"] = lr
    return out


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits of ``model`` on ``x`` in eval mode (does not change the model)."""
    was_training = model.training
    model.eval()
    try:  # an empty input still gives (0, classes): the model runs on the empty batch
        return torch.cat([model(chunk) for chunk in x.split(batch_size)]) if len(x) else model(x)
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Accuracy and mean cross-entropy on (x, y)."""
    return logit_metrics(predict_logits(model, x), y)


@torch.no_grad()
def logit_metrics(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``logits`` against labels ``y``."""
    return {
        "accuracy": float((logits.argmax(-1) == y).float().mean()),
        "loss": float(F.cross_entropy(logits, y)),
    }


def to_tensor(a: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)
