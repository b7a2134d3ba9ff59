"""A client strategy's own evaluation (``ClientStrategy.evaluate``), recorded per client
and round as ``eval_<name>`` beside the runtime's test accuracy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedkd.config import load_config
from fedkd.data import prepare_federated_data
from fedkd.federation import Federation, RunFailed
from fedkd.inline import InlineTransport
from fedkd.training import predict_logits
from strategies.kd import KDClient

HERE = "tests.test_client_evaluate_hook"


class WithMargin(KDClient):
    """kd, plus the mean top-1 minus top-2 logit margin on the test set."""

    def evaluate(self, node):
        top = predict_logits(node.model, node.test_x).topk(2, dim=1).values  # eval mode
        return {"margin": float((top[:, 0] - top[:, 1]).mean()), "round": node.round}


class NotFinite(KDClient):
    def evaluate(self, node):
        return {"bad": math.nan}


def _run(small_config, client: str, rounds: int = 2):
    cfg = load_config(
        small_config,
        [f'clients.strategies={{"0-3" = "{HERE}:{client}"}}', f"rounds={rounds}",
         "privacy.audit=false"],
    )  # fmt: skip
    data, path = prepare_federated_data(cfg)
    return Federation(cfg, data).run(InlineTransport(cfg, str(path)))


def test_client_evaluate_metrics_are_recorded_per_client_and_round(small_config):
    records = _run(small_config, "WithMargin")
    for rec in records:
        assert rec.clients
        for r in rec.clients.values():
            assert np.isfinite(r.metrics["eval_margin"]) and r.metrics["eval_margin"] >= 0
            assert r.metrics["eval_round"] == rec.round


def test_a_non_finite_client_metric_fails_the_client_with_the_hook_named(small_config):
    with pytest.raises(RunFailed, match=r"NotFinite.evaluate returned metric 'bad' = nan"):
        _run(small_config, "NotFinite", rounds=1)
