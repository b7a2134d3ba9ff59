"""The server as a strategy sees it (:class:`ServerNode`): the global teacher, the
public set, the config, and the helpers that combine, distill and evaluate."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from fedkd.aggregators import Mean, make_aggregator
from fedkd.assignment import student_spec
from fedkd.config import Config, ServerConfig, Spec
from fedkd.contracts import Metrics
from fedkd.data.transforms import Augment
from fedkd.models import build_model, features
from fedkd.payloads import EmbeddedLogits, Logits, PayloadError, SoftLabels
from fedkd.privacy.accounting import PrivacyLedger
from fedkd.recipes import Recipe
from fedkd.seeding import derive_seed
from fedkd.training import (
    distill,
    evaluate,
    make_optimizer,
    predict_logits,
    public_kd_targets,
    softmax_rows,
)

LogitsT = TypeVar("LogitsT", Logits, SoftLabels)


@dataclass
class ServerNode:
    """The server as a strategy sees it: the global teacher (if any), the public set,
    and the experiment's config (to build and evaluate per-architecture models)."""

    round: int
    teacher: nn.Module | None
    optimizer: torch.optim.Optimizer | None
    public_x: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    config: Config
    generator: torch.Generator
    num_examples: dict[int, int] = field(default_factory=dict)  # private-set size per client
    public_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # this round
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    teacher_updates: int = 0  # rounds in which distill_teacher ran
    privacy: PrivacyLedger | None = None  # privacy spent so far (strategies may add to it)
    state: dict[str, Any] = field(default_factory=dict)
    aggregations: int = 0  # calls of combine() so far (the summary says if the aggregator ran)
    augment: Augment = field(default_factory=Augment)  # used where a strategy asks for it
    augment_generator: torch.Generator | None = None
    #: the teacher features the clients' configured losses read (``strategy.losses``:
    #: e.g. ``{"logits", "embedding"}``; :func:`fedkd.selection.teacher_reads`); targets
    #: built with :meth:`teacher_logits` carry the embedding when some client reads it
    clients_read: frozenset[str] = frozenset({"logits"})

    @property
    def settings(self) -> ServerConfig:
        return self.config.server

    @property
    def recipe(self) -> Recipe:
        """``[server]``'s schedule and clipping, at this round."""
        return Recipe.of(self.settings, self.round, self.config.rounds, self.config.amp)

    def student_spec(self, cid: int) -> Spec:
        """Client ``cid``'s student architecture."""
        return student_spec(self.config, cid)

    def build_model(self, spec: Spec, seed_key: str = "server-model") -> nn.Module:
        """A fresh model of ``spec`` for this task, seeded from the experiment seed."""
        shape = tuple(self.public_x.shape[1:])
        seed = derive_seed(self.config.seed, f"{seed_key}:{spec}")
        return build_model(spec, shape, self.num_classes, seed=seed).to(self.device)

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """``server.optimizer`` at ``server.lr`` for ``model``."""
        return make_optimizer(self.settings.optimizer, model, self.settings.lr)

    def logits(self, model: nn.Module, idx: np.ndarray, embedding: bool = False) -> Logits:
        """``model``'s logits on public samples ``idx`` (with ``embedding``, also its
        embedding of each: an :class:`EmbeddedLogits`)."""
        x = self.public_x[torch.as_tensor(idx, dtype=torch.long, device=self.device)]
        if not embedding:
            return Logits(np.asarray(idx), predict_logits(model, x).cpu().numpy())
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = [features(model, chunk) for chunk in x.split(1024)]
        finally:
            model.train(was_training)
        cat = lambda k: torch.cat([o[k] for o in out]).float().cpu().numpy()  # noqa: E731
        return EmbeddedLogits(np.asarray(idx), cat("logits"), cat("embedding"))

    def soft_labels(
        self, model: nn.Module, idx: np.ndarray, temperature: float = 1.0
    ) -> SoftLabels:
        """``model``'s softmax outputs (at ``temperature``) on public samples ``idx``."""
        logits = self.logits(model, idx)
        return SoftLabels(logits.idx, softmax_rows(logits.values, temperature))

    def combine(
        self,
        payloads: Mapping[int, LogitsT],
        weights: Sequence[float] | None = None,
    ) -> LogitsT:
        """Combine logit-type payloads (all :class:`Logits` or all :class:`SoftLabels`, on
        the same public indices) with ``server.aggregator``.

        ``weights`` (one per payload, in order) are the strategy's own weighting, used by
        the ``mean`` aggregator; robust aggregators ignore them. Soft labels come back as
        probability rows (negative values clipped, rows renormalised).
        """
        items = list(payloads.items())
        if not items:
            raise ValueError("cannot combine zero payloads")
        kind = type(items[0][1])
        if kind not in (Logits, SoftLabels) or any(type(p) is not kind for _, p in items):
            kinds = sorted({type(p).__name__ for _, p in items})
            raise TypeError(f"combine takes Logits or SoftLabels of one type, got {kinds}")
        idx = items[0][1].idx
        if any(not np.array_equal(p.idx, idx) for _, p in items):
            raise PayloadError("cannot combine payloads over different public indices")
        aggregator = make_aggregator(self.settings.aggregator)
        w = None if weights is None else np.asarray(weights, dtype=np.float64)
        if aggregator.by_size:
            w = np.asarray([self.num_examples[cid] for cid, _ in items], dtype=np.float64)
        field_name = "values" if kind is Logits else "probs"
        stacked = np.stack([getattr(p, field_name) for _, p in items]).astype(np.float64)
        out = aggregator(stacked, w)
        self.aggregations += 1
        if kind is SoftLabels:
            if not isinstance(aggregator, Mean):  # a mean of probability rows is one already
                out = np.clip(out, 0.0, None)
                total = out.sum(axis=1, keepdims=True)
                # e.g. the median of disagreeing one-hot rows is all zeros: use their mean
                empty = total[:, 0] <= 1e-12
                out[empty] = stacked.mean(axis=0)[empty]
                out = out / np.maximum(out.sum(axis=1, keepdims=True), 1e-12)
            return SoftLabels(idx.copy(), out.astype(np.float32))  # type: ignore[return-value]
        return Logits(idx.copy(), out.astype(np.float32))  # type: ignore[return-value]

    def distill_into(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        targets: Logits | SoftLabels,
        *,
        temperature: float = 1.0,
        epochs: int | None = None,
        loss: str | None = None,
        augment: bool = False,
    ) -> Metrics:
        """Distill ``model`` towards ``targets`` on the public inputs
        (``server.epochs`` passes by default, batches of ``server.batch_size``;
        augmented by the run's train-time augmentation if ``augment``)."""
        return distill(
            model,
            optimizer,
            public_kd_targets(self.public_x, targets, temperature, loss),
            epochs=self.settings.epochs if epochs is None else epochs,
            batch_size=self.settings.batch_size,
            generator=self.generator,
            recipe=self.recipe,
            augment=self.augment.bound(self.augment_generator or self.generator)
            if augment
            else None,
        )

    def distill_teacher(
        self, targets: Logits | SoftLabels, *, temperature: float, augment: bool = False
    ) -> Metrics:
        """``server.epochs`` of distillation of the teacher towards ``targets``."""
        if self.teacher is None or self.optimizer is None:
            raise RuntimeError("this strategy declared uses_teacher = False")
        self.teacher_updates += 1
        return self.distill_into(
            self.teacher, self.optimizer, targets, temperature=temperature, augment=augment
        )

    def teacher_logits(self, idx: np.ndarray) -> Logits:
        """The teacher's logits on public samples ``idx``, with its embeddings where the
        clients' losses read ``teacher.embedding`` (:meth:`clients_read`)."""
        if self.teacher is None:
            raise RuntimeError("this strategy declared uses_teacher = False")
        return self.logits(self.teacher, idx, embedding="embedding" in self.clients_read)

    def evaluate(self, model: nn.Module) -> Metrics:
        """Accuracy and loss of ``model`` on the global test set."""
        return evaluate(model, self.test_x, self.test_y)
