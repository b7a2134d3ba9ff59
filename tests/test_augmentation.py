"""Train-time augmentation is wired where the issue says: private training batches
(clients, baseline, DP-SGD), public distillation only when a strategy asks, never
evaluation, predictions or the public batches of a KD term."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedkd.config import ConfigError, DataConfig, Spec, load_config
from fedkd.data.transforms import Augment, normalized_black, train_augment
from fedkd.payloads import Logits
from fedkd.privacy.accounting import PrivacyError
from fedkd.strategy import ClientNode
from fedkd.training import make_optimizer

SHAPE = (3, 8, 8)
C = 4


class Recorder(nn.Module):
    """A tiny image classifier that keeps every input batch it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(SHAPE)), C))
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.net(x)


def _rows_of(batch: torch.Tensor, pool: torch.Tensor) -> bool:
    """Whether every row of ``batch`` is a row of ``pool`` exactly."""
    flat, ref = batch.reshape(len(batch), -1), pool.reshape(len(pool), -1)
    return bool((flat[:, None, :] == ref[None]).all(-1).any(1).all())


def _node(augment: Augment, privacy=None, **extra) -> ClientNode:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(24, *SHAPE, generator=g) + 1.0  # no zeros: padded borders show
    cfg = load_config(None, ["clients.batch_size=8", "clients.local_epochs=1"])
    model = Recorder()
    return ClientNode(
        cid=0,
        round=1,
        model=model,
        optimizer=make_optimizer("sgd", model, 0.01),
        x=x,
        y=torch.arange(24) % C,
        public_x=torch.rand(16, *SHAPE, generator=g) + 1.0,
        public_y=torch.full((16,), -1),
        test_x=torch.rand(10, *SHAPE, generator=g) + 1.0,
        test_y=torch.arange(10) % C,
        num_classes=C,
        settings=cfg.clients,
        generator=torch.Generator().manual_seed(1),
        device=torch.device("cpu"),
        augment=augment,
        augment_generator=torch.Generator().manual_seed(2),
        privacy=privacy,
        **extra,
    )


CROP_FLIP = Augment(crop=2, flip=True)


def test_private_batches_are_augmented_and_evaluation_and_predictions_are_not():
    node = _node(CROP_FLIP)
    node.train_private()
    seen = node.model.seen
    assert seen and not all(_rows_of(b, node.x) for b in seen)
    node.model.seen = []
    node.evaluate()
    node.public_logits(np.arange(16))
    node.class_mean_logits()
    assert len(node.model.seen) == 3
    assert _rows_of(node.model.seen[0], node.test_x)
    assert _rows_of(node.model.seen[1], node.public_x)
    assert _rows_of(node.model.seen[2], node.x)


def test_without_augmentation_private_batches_are_the_rows_themselves():
    node = _node(Augment())
    node.train_private()
    assert all(_rows_of(b, node.x) for b in node.model.seen)


def test_public_batches_of_a_kd_term_stay_plain():
    node = _node(CROP_FLIP)
    targets = Logits(np.arange(16), np.zeros((16, C), np.float32))
    node.train_private(kd=targets, kd_weight=0.5)
    public = [b for b in node.model.seen if _rows_of(b, node.public_x)]
    private = [b for b in node.model.seen if not _rows_of(b, node.public_x)]
    assert len(public) == len(private) == 3  # one plain public batch per augmented step


def test_public_distillation_is_augmented_only_when_the_strategy_asks():
    targets = Logits(np.arange(16), np.zeros((16, C), np.float32))
    plain = _node(CROP_FLIP)
    plain.distill_public(targets, epochs=1)
    assert all(_rows_of(b, plain.public_x) for b in plain.model.seen)
    asked = _node(CROP_FLIP)
    asked.distill_public(targets, epochs=1, augment=True)
    assert not all(_rows_of(b, asked.public_x) for b in asked.model.seen)


def test_augmentation_draws_from_its_own_generator():
    """Turning augmentation on changes the inputs, not the batch order."""
    a, b = _node(Augment()), _node(CROP_FLIP)
    a.train_private()
    b.train_private()
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


def test_augmentation_cannot_be_swapped_under_dpsgd():
    cfg = load_config(None, ["privacy.mechanism=dpsgd"])
    node = _node(CROP_FLIP, privacy=cfg.privacy)
    with pytest.raises(PrivacyError, match="node.augment"):
        node.augment = Augment()


def test_dpsgd_training_augments_the_private_batches():
    cfg = load_config(None, ["privacy.mechanism=dpsgd", "privacy.audit=false"])
    node = _node(CROP_FLIP, privacy=cfg.privacy, seed=0)
    node.train_private(epochs=1)
    private = torch.rand(24, *SHAPE, generator=torch.Generator().manual_seed(0)) + 1.0  # its x
    batches = [b for b in node.model.seen if len(b)]
    assert batches and not all(_rows_of(b, private) for b in batches)


def test_train_augment_follows_the_dataset_and_normalisation():
    cifar = train_augment(DataConfig(dataset=Spec("cifar10")))
    assert (cifar.crop, cifar.flip) == (4, True)
    assert cifar.fill == pytest.approx(normalized_black("cifar10"))  # black, normalised
    raw = train_augment(DataConfig(dataset=Spec("cifar10"), normalize=False))
    assert raw.fill == 0.0
    assert (train_augment(DataConfig(dataset=Spec("svhn"))).flip) is False
    assert not train_augment(DataConfig(dataset=Spec("mnist")))
    assert not train_augment(DataConfig())  # mnist1d: the quick-start is not augmented
    assert not train_augment(DataConfig(dataset=Spec("cifar10"), augment="none"))
    assert train_augment(DataConfig(augment="flip")) == Augment(flip=True)


def test_an_unknown_augmentation_names_the_field():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.augment=rotate"])
    assert err.value.field == "data.augment"
    assert "crop+flip" in str(err.value)
