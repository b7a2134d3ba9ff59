"""Per-client accuracy on the client's own test distribution (FedMD and DS-FL report it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedkd.client import own_accuracy
from tests.test_strategies import config, make_client


class Constant(nn.Module):
    """Always predicts class ``c``."""

    def __init__(self, c: int, classes: int) -> None:
        super().__init__()
        self.c, self.classes = c, classes
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(x), self.classes) + 0 * self.w
        out[:, self.c] = 1.0
        return out


def test_a_client_of_one_class_is_judged_on_that_class():
    node = make_client(config(), 0, classes=[2])  # every private sample is class 2
    node.model = Constant(2, node.num_classes)
    assert own_accuracy(node) == pytest.approx(1.0)
    share = float((node.test_y == 2).float().mean())
    assert node.evaluate()["accuracy"] == pytest.approx(share)  # the global view
    node.model = Constant(1, node.num_classes)
    assert own_accuracy(node) == 0.0


def test_label_shares_weigh_the_per_class_accuracies():
    node = make_client(config(), 0, n=40, classes=[0, 0, 0, 1])  # 3/4 class 0, 1/4 class 1
    node.model = Constant(0, node.num_classes)
    assert own_accuracy(node) == pytest.approx(0.75)


def test_rounds_and_bytes_to_a_target_accuracy():
    from fedkd.config import ConfigError, load_config
    from fedkd.results.summary import to_targets

    records = [_record(1, 0.2), _record(2, 0.31), _record(3, 0.36)]
    assert to_targets(records, [0.3, 0.35, 0.9]) == {
        "0.3": {"round": 2, "bytes": 300},
        "0.35": {"round": 3, "bytes": 450},
        "0.9": None,
    }
    with pytest.raises(ConfigError) as err:
        load_config(None, ["targets=[35]"])
    assert err.value.field == "targets"


def _record(rnd: int, mean: float):
    """A round whose students' mean is ``mean`` and that sent 150 bytes."""
    from fedkd.results.records import ClientRecord, RoundRecord

    client = ClientRecord(0, "mlp", mean, 1.0, 10, bytes_up=100, bytes_down=50)
    return RoundRecord(rnd, 1.0, (0,), {0: client}, (), None, 100, 50)
