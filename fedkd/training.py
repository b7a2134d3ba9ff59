"""Training loops shared by every strategy: supervised, distillation, evaluation.

Batches are reshuffled every epoch by an explicit generator and the last partial
batch is kept, so every private sample is seen and runs are reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedkd.losses import make_kd_loss
from fedkd.payloads import EmbeddedLogits, Logits, SoftLabels
from fedkd.recipes import Recipe
from fedkd.recipes import make_optimizer as make_optimizer  # re-exported: the loops' home

if TYPE_CHECKING:
    from fedkd.kd.step import StepLoss


@dataclass
class KDTargets:
    """Soft targets on some public inputs, to distill into a model."""

    x: torch.Tensor  # public inputs for the target rows
    logits: torch.Tensor  # teacher logits, one row per input (probabilities if ``probs``)
    loss: nn.Module  # e.g. SoftKL(temperature)
    probs: bool = False  # the rows are probabilities (soft labels), not logits
    # the teacher's features per row where the targets carry them (e.g. "embedding")
    features: dict[str, torch.Tensor] | None = None

    def context(self, rows: torch.Tensor) -> dict[str, Any]:
        """The teacher's side of a :class:`fedkd.kd.Batch` for target rows ``rows``."""
        teacher = {k: v[rows] for k, v in (self.features or {}).items()}
        if self.probs:
            return {"target_probs": self.logits[rows], "teacher": teacher or None}
        return {"teacher": {"logits": self.logits[rows], **teacher}}


@dataclass
class ClassKDTargets:
    """Per-class target logits for distillation on *private* samples (FD).

    A private sample labelled ``c`` is distilled towards ``logits[c]``; samples of
    classes with ``valid[c] == False`` get no distillation term.
    """

    logits: torch.Tensor  # (classes, classes)
    valid: torch.Tensor  # (classes,) bool
    loss: nn.Module
    probs: bool = False  # the rows are mean probabilities, not mean logits

    def context(self, y: torch.Tensor) -> dict[str, Any]:
        """The teacher's side of a private :class:`fedkd.kd.Batch` with labels ``y``: each
        row's class target, and which rows have one (``teacher_mask``)."""
        values = self.logits[y]
        side = {"target_probs": values} if self.probs else {"teacher": {"logits": values}}
        return {**side, "teacher_mask": self.valid[y]}


@dataclass
class ClassMeans:
    """Per-class running sums of a model's outputs on the samples it trains on.

    FD (Jeong et al. 2018, Algorithm 1) averages, per label, the logit vectors the model
    produces *during* local training; the training loops add every batch's (detached,
    training-mode) outputs here when given one. ``softmax`` adds probability vectors
    instead of raw logits (FD's "logit vector normalized by the softmax"); ``key`` picks
    another feature than the logits (``"embedding"``: FedProto's class prototypes; only
    with a step loss, :func:`train_steps`, which computes features).
    """

    classes: int
    softmax: bool = True
    key: str = "logits"
    sums: torch.Tensor | None = None  # (classes, width) float64, sized by the first batch
    counts: torch.Tensor | None = None  # (classes,) float64

    @classmethod
    def zeros(cls, classes: int, softmax: bool = True, key: str = "logits") -> ClassMeans:
        """An empty accumulator for ``classes`` labels (on the CPU)."""
        return cls(classes, softmax and key == "logits", key)

    def add(self, out: torch.Tensor, y: torch.Tensor) -> None:
        """Add one batch's outputs ``out`` (rows, flattened) for labels ``y``."""
        v = out.detach().double().cpu().flatten(1)
        if self.softmax:
            v = torch.softmax(v, dim=-1)
        if self.sums is None or self.counts is None:
            self.sums = torch.zeros(self.classes, v.shape[1], dtype=torch.float64)
            self.counts = torch.zeros(self.classes, dtype=torch.float64)
        y = y.cpu()
        self.sums.index_add_(0, y, v)
        self.counts += torch.bincount(y, minlength=self.classes).double()

    def means(self) -> tuple[np.ndarray, np.ndarray]:
        """(per-class mean vectors, sample counts) as float32 arrays; rows of classes
        never seen are zero with count 0 (no batch at all: zero-width feature means)."""
        if self.sums is None or self.counts is None:
            width = self.classes if self.key == "logits" else 0
            return np.zeros((self.classes, width), np.float32), np.zeros(self.classes, np.float32)
        m = self.sums / self.counts.clamp(min=1).unsqueeze(1)
        return m.float().numpy(), self.counts.float().numpy()


def public_kd_targets(
    public_x: torch.Tensor,
    targets: Logits | SoftLabels,
    temperature: float,
    loss: str | None = None,
) -> KDTargets:
    """Targets on public indices -> (public inputs, targets, loss) on ``public_x``'s device.

    ``loss`` defaults to ``soft_kl`` for :class:`Logits` and ``prob_kl`` for
    :class:`SoftLabels` (whose values are already probabilities).
    """
    if isinstance(targets, SoftLabels):
        values, default = targets.probs, "prob_kl"
    elif isinstance(targets, Logits):
        values, default = targets.values, "soft_kl"
    else:
        raise TypeError(f"cannot distill towards a {type(targets).__name__} payload")
    idx = torch.as_tensor(targets.idx, dtype=torch.long, device=public_x.device)
    values_t = torch.as_tensor(values, dtype=torch.float32, device=public_x.device)
    kd_loss = make_kd_loss(loss or default, temperature)
    features = None
    if isinstance(targets, EmbeddedLogits):
        emb = torch.as_tensor(targets.embedding, dtype=torch.float32, device=public_x.device)
        features = {"embedding": emb}
    probs = isinstance(targets, SoftLabels)
    return KDTargets(public_x[idx], values_t, kd_loss, probs=probs, features=features)


def softmax_rows(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise ``softmax(logits / temperature)`` (float64 inside, float32 out)."""
    z = torch.from_numpy(np.asarray(logits)).double() / temperature
    return torch.softmax(z, dim=-1).float().numpy()


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
    class_means: ClassMeans | None = None,
    step: StepLoss | None = None,
) -> dict[str, float]:
    """Cross-entropy on (x, y), optionally mixed with a distillation term.

    The loss is ``(1 - kd_weight) * CE + kd_weight * KD``. With :class:`KDTargets`
    each private batch is paired with a random public batch of the same size; with
    :class:`ClassKDTargets` the KD term is on the private batch itself, towards the
    target logits of each sample's class. ``recipe`` (:mod:`fedkd.recipes`) sets the
    rate before each step, clips gradients and smooths the CE labels; ``augment``
    (e.g. a seeded random crop and flip) transforms each batch of ``x``, never the
    public batches of the KD term. ``class_means`` collects each batch's outputs per
    label, as they are computed for the step (FD). ``step`` replaces the loss (not the
    loop): see :func:`train_steps`; ``kd_weight`` is then unused.
    """
    _check_class_means(class_means, step)
    if step is not None:
        return train_steps(
            model, optimizer, x, y, step=step, epochs=epochs, batch_size=batch_size,
            generator=generator, kd=kd, recipe=recipe, augment=augment,
            class_means=class_means,
        )  # fmt: skip
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
            loss, ce, kd_loss = _supervised_losses(
                model, x, y, rows, recipe=recipe, augment=augment, class_means=class_means,
                kd=kd, kd_weight=kd_weight, generator=generator,
            )  # fmt: skip
            if kd_loss is not None:
                totals["kd"] += kd_loss.item()
            _update(model, optimizer, loss, recipe)
            totals["loss"] += loss.item()
            totals["ce"] += ce.item()
            steps += 1
    # lr: the rate of the last step (only when a schedule is set)
    return _step_metrics(totals, steps, lr)


def _check_class_means(class_means: ClassMeans | None, step: StepLoss | None) -> None:
    """Refuse class means of features other than the logits without a step loss."""
    if class_means is not None and class_means.key != "logits" and step is None:
        raise ValueError(
            f"class means of {class_means.key!r} need a step loss that computes features "
            "(train_private(step=...) or strategy.losses)"
        )


def _supervised_losses(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    rows: torch.Tensor,
    *,
    recipe: Recipe,
    augment: Callable[[torch.Tensor], torch.Tensor] | None,
    class_means: ClassMeans | None,
    kd: KDTargets | ClassKDTargets | None,
    kd_weight: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One batch's (loss, CE, KD term or None) under the recipe's autocast."""
    with recipe.autocast(x.device):
        out = model(x[rows] if augment is None else augment(x[rows]))
        if class_means is not None:  # logits only here (features: train_steps)
            class_means.add(out, y[rows])
        ce = F.cross_entropy(out, y[rows], label_smoothing=recipe.label_smoothing)
        loss = ce
        kd_loss = _kd_term(model, out, y, rows, kd, kd_weight, generator)
        if kd_loss is not None:
            loss = (1 - kd_weight) * ce + kd_weight * kd_loss
    return loss, ce, kd_loss


def _kd_term(
    model: nn.Module,
    out: torch.Tensor,
    y: torch.Tensor,
    rows: torch.Tensor,
    kd: KDTargets | ClassKDTargets | None,
    kd_weight: float,
    generator: torch.Generator,
) -> torch.Tensor | None:
    """The distillation term of one private batch with outputs ``out`` (None: no term)."""
    if isinstance(kd, ClassKDTargets) and kd_weight > 0:
        keep = kd.valid[y[rows]]
        kd_loss = out.new_zeros(())  # same CE weight whether a batch has targets
        if bool(keep.any()):  # batch mean over all samples, zero where no target
            share = keep.float().mean()
            kd_loss = share * kd.loss(out[keep], kd.logits[y[rows][keep]])
        return kd_loss
    if kd is not None and kd_weight > 0:
        pick = torch.randint(len(kd.logits), (len(rows),), generator=generator)
        return kd.loss(model(kd.x[pick]), kd.logits[pick])
    return None


def _update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    recipe: Recipe,
    step: StepLoss | None = None,
) -> None:
    """One optimizer step on ``loss`` (gradients cleared, back-propagated, clipped by the
    recipe), for the student and for the learnable parts of ``step`` if any (adapters:
    their own optimizer, :meth:`StepLoss.optimizer_like`)."""
    own = None if step is None else step.optimizer_like(optimizer)
    optimizer.zero_grad(set_to_none=True)
    if own is not None:
        own.zero_grad(set_to_none=True)
    loss.backward()
    recipe.clip(model)
    optimizer.step()
    if own is not None:
        own.step()


def _step_metrics(totals: dict[str, float], steps: int, lr: float | None) -> dict[str, float]:
    out = {k: v / max(steps, 1) for k, v in totals.items()}
    if lr is not None:
        out["lr"] = lr
    return out


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    step: StepLoss,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    kd: KDTargets | ClassKDTargets | None = None,
    recipe: Recipe | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    class_means: ClassMeans | None = None,
) -> dict[str, float]:
    """Epochs over the labelled (x, y), each step's loss computed by ``step`` from batch
    contexts (:mod:`fedkd.kd.step`): the batch with its labels (and, with
    :class:`ClassKDTargets`, each row's class target), and, with :class:`KDTargets`, a
    random public batch of the same size with its targets. Same loop as
    :func:`train_supervised` (shuffling, recipe, augmentation, ``class_means``); metrics:
    ``loss`` and each of the step's named terms, averaged over the steps that had them."""
    from fedkd.kd import Batch
    from fedkd.kd.step import student_outputs

    recipe = recipe or Recipe()
    model.train()
    wide = class_means is not None and class_means.key != "logits"  # features for the means
    totals: dict[str, float] = {"loss": 0.0}
    counts: dict[str, int] = {}
    steps, lr = 0, None
    per_epoch = -(-len(y) // batch_size)
    for epoch in range(epochs):
        for rows in _batches(len(y), batch_size, generator):
            lr = recipe.set_lr(
                optimizer, epoch=epoch, epochs=epochs, step=steps, steps=epochs * per_epoch
            )
            with recipe.autocast(x.device):
                inputs = x[rows] if augment is None else augment(x[rows])
                out = student_outputs(model, inputs, step, wide)
                main = Batch(out, labels=y[rows], rows=rows)
                if class_means is not None:
                    class_means.add(main.student[class_means.key], y[rows])
                paired = None
                if isinstance(kd, ClassKDTargets):
                    main = Batch(main.student, labels=y[rows], rows=rows, **kd.context(y[rows]))
                elif kd is not None:
                    pick = torch.randint(len(kd.logits), (len(rows),), generator=generator)
                    paired = Batch(student_outputs(model, kd.x[pick], step), **kd.context(pick))
                loss = step(main, paired)
            _update(model, optimizer, loss, recipe, step)
            totals["loss"] += loss.item()
            for k, v in step.terms.items():
                totals[k] = totals.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
            steps += 1
    out = _step_metrics({"loss": totals.pop("loss")}, steps, lr)
    out.update({k: v / counts[k] for k, v in totals.items()})
    return out


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
    step: StepLoss | None = None,
) -> dict[str, float]:
    """Fit ``model`` to the soft targets alone (no labels): ``epochs`` passes over them
    (stopping early after ``max_steps`` batches, if given). ``recipe`` sets the rate
    before each step and clips gradients (:mod:`fedkd.recipes`); ``augment`` transforms
    each batch of inputs (the targets stay those of the plain inputs). ``step``, if
    given, computes each step's loss from the public batch's context (no ``paired``
    batch) instead of ``kd.loss``; its named terms join the metrics."""
    recipe = recipe or Recipe()
    model.train()
    total, steps = 0.0, 0
    terms: dict[str, float] = {}
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
                if step is None:
                    loss = kd.loss(model(inputs), kd.logits[rows])
                else:
                    loss = step(_public_batch(model, inputs, kd, rows, step), None)
            _update(model, optimizer, loss, recipe, step)
            if step is not None:
                for k, v in step.terms.items():
                    terms[k] = terms.get(k, 0.0) + v
            total += loss.item()
            steps += 1
    out = _step_metrics({"kd": total}, steps, lr)
    out.update({k: v / max(steps, 1) for k, v in terms.items()})
    return out


def _public_batch(
    model: nn.Module, inputs: torch.Tensor, kd: KDTargets, rows: torch.Tensor, step: StepLoss
) -> Any:
    from fedkd.kd import Batch
    from fedkd.kd.step import student_outputs

    return Batch(student_outputs(model, inputs, step), **kd.context(rows))


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
