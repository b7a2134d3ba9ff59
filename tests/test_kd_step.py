"""The configured training loss (``strategy.losses``) in the client training loop.

The runtime keeps the loop and builds the batch contexts; a :class:`RoutedLoss` computes
each term on the context that has what it reads. A loss list equal to a strategy's own
mix (``(1 - w) * CE + w * KD``) trains exactly as the built-in loop does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedkd.assignment import client_losses
from fedkd.config import ConfigError, Spec, load_config
from fedkd.kd import Batch, MissingContextError
from fedkd.kd.step import RoutedLoss, StepLoss
from fedkd.losses import ProbKL, SoftKL
from fedkd.models import build_model
from fedkd.privacy.accounting import PrivacyError
from fedkd.privacy.preflight import preflight
from fedkd.selection import server_strategy
from fedkd.training import (
    ClassKDTargets,
    KDTargets,
    distill,
    make_optimizer,
    train_supervised,
)

D, C = 6, 3


def _data(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    return 2.0 * torch.eye(C, D)[y] + torch.randn(n, D, generator=g), y


def _model(seed: int = 0, name: str = "mlp") -> torch.nn.Module:
    return build_model(Spec(name), (D,), C, seed=seed)


def _train(step: StepLoss | None, kd, *, kd_weight: float = 0.0, epochs: int = 2):
    model = _model()
    opt = make_optimizer("adam", model, 0.01)
    x, y = _data()
    metrics = train_supervised(
        model, opt, x, y, epochs=epochs, batch_size=8, generator=torch.Generator().manual_seed(3),
        kd=kd, kd_weight=kd_weight, step=step,
    )  # fmt: skip
    return model, metrics


def _public(probs: bool = False) -> KDTargets:
    px, _ = _data(30, seed=9)
    t = torch.randn(30, C, generator=torch.Generator().manual_seed(4))
    if probs:
        return KDTargets(px, torch.softmax(t, -1), ProbKL(1.0), probs=True)
    return KDTargets(px, t, SoftKL(3.0))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, msg=k, rtol=1e-5, atol=1e-6)


def test_a_loss_list_equal_to_the_built_in_mix_trains_identically_on_public_targets():
    routed = RoutedLoss.from_config(
        [{"name": "ce", "weight": 0.6}, {"name": "soft_kl", "weight": 0.4, "temperature": 3.0}]
    )
    legacy, m_legacy = _train(None, _public(), kd_weight=0.4)
    configured, m_conf = _train(routed, _public())
    _same(legacy, configured)
    assert m_conf["ce"] == pytest.approx(m_legacy["ce"], rel=1e-5)
    assert m_conf["soft_kl"] == pytest.approx(m_legacy["kd"], rel=1e-5)
    assert m_conf["loss"] == pytest.approx(m_legacy["loss"], rel=1e-5)


def test_per_class_targets_route_to_the_private_batch_with_its_mask():
    """FD's per-class probabilities: the KD term is computed on the rows whose class has a
    target and scaled by their share, as the built-in loop does."""
    means = torch.softmax(torch.randn(C, C, generator=torch.Generator().manual_seed(5)), -1)
    valid = torch.tensor([True, False, True])
    kd = ClassKDTargets(means, valid, ProbKL(1.0), probs=True)
    routed = RoutedLoss.from_config(
        [{"name": "ce", "weight": 0.7}, {"name": "prob_kl", "weight": 0.3}]
    )
    legacy, _ = _train(None, kd, kd_weight=0.3)
    configured, metrics = _train(routed, kd)
    _same(legacy, configured)
    assert set(metrics) >= {"loss", "ce", "prob_kl"}


def test_distillation_skips_label_terms_and_matches_the_built_in_distill():
    routed = RoutedLoss.from_config(
        [{"name": "ce", "weight": 1.0}, {"name": "soft_kl", "weight": 1.0, "temperature": 3.0}]
    )
    models, outs = [], []
    for step in (None, routed):
        model = _model()
        opt = make_optimizer("adam", model, 0.01)
        outs.append(distill(model, opt, _public(), epochs=2, batch_size=8,
                            generator=torch.Generator().manual_seed(1), step=step))  # fmt: skip
        models.append(model)
    _same(*models)
    assert "ce" not in outs[1] and outs[1]["soft_kl"] == pytest.approx(outs[0]["kd"], rel=1e-5)


def test_soft_labels_reach_probability_losses_only():
    routed = RoutedLoss.from_config([{"name": "ce"}, {"name": "prob_kl", "weight": 0.5}])
    _, metrics = _train(routed, _public(probs=True))
    assert metrics["prob_kl"] > 0
    wrong = RoutedLoss.from_config([{"name": "ce"}, {"name": "soft_kl"}])  # reads logits
    with pytest.raises(MissingContextError, match="soft_kl needs .*paired public batch lacks"):
        _train(wrong, _public(probs=True))


def test_a_teacher_feature_the_targets_lack_is_an_error_naming_the_loss():
    routed = RoutedLoss.from_config([{"name": "ce"}, {"name": "rkd"}])
    with pytest.raises(MissingContextError, match="rkd needs .*teacher.embedding"):
        _train(routed, _public())


def test_without_targets_teacher_terms_wait_and_a_step_with_no_term_is_refused():
    routed = RoutedLoss.from_config([{"name": "ce", "weight": 0.5}, {"name": "soft_kl"}])
    _, metrics = _train(routed, None)  # round 1: no targets yet
    assert "soft_kl" not in metrics and metrics["ce"] > 0
    only_kd = RoutedLoss.from_config([{"name": "soft_kl"}])
    with pytest.raises(MissingContextError, match="no term applies"):
        _train(only_kd, None)


SHAPES = (  # (main, paired) contexts with the shapes of the adapter test's features
    Batch({"logits": torch.zeros(2, C), "embedding": torch.zeros(2, 100)}),
    Batch({"logits": torch.zeros(2, C)}, teacher={"embedding": torch.zeros(2, 5)}),
)


def test_learnable_adapters_train_beside_the_student_and_restore():
    """A FitNets hint towards teacher embeddings carried with the targets: the adapter is
    sized on the first step, trained with the student, and restored from saved state."""
    kd = _public()
    kd.features = {"embedding": torch.randn(30, 5, generator=torch.Generator().manual_seed(2))}
    routed = RoutedLoss.from_config([{"name": "ce"}, {"name": "hint", "weight": 0.5}], seed=7)
    model, metrics = _train(routed, kd)
    assert metrics["hint"] > 0
    adapter = {k: v.clone() for k, v in routed.state().items()}
    assert adapter and all(torch.isfinite(v).all() for v in adapter.values())
    fresh = RoutedLoss.from_config([{"name": "ce"}, {"name": "hint", "weight": 0.5}], seed=7)
    fresh._setup(*SHAPES)
    untrained = fresh.state()
    assert any(not torch.equal(untrained[k], adapter[k]) for k in adapter)  # it learned
    restored = RoutedLoss.from_config(
        [{"name": "ce"}, {"name": "hint", "weight": 0.5}], seed=7, state=adapter
    )
    restored._setup(*SHAPES)
    for k, v in restored.state().items():
        torch.testing.assert_close(v, adapter[k])


# --- the config ------------------------------------------------------------------------


def test_strategy_losses_are_validated_with_the_strategy_and_named_by_field():
    cfg = load_config(
        None, ["strategy.name=kd", 'strategy.losses=[{name="ce"}, {name="soft_kl", temprature=2}]']
    )
    with pytest.raises(ConfigError) as err:
        server_strategy(cfg)
    assert err.value.field == "strategy.losses[1].temprature"


def test_client_losses_come_from_the_strategy_or_an_explicit_client_entry():
    cfg = load_config(
        None,
        [
            "strategy.name=kd",
            'strategy.losses=[{name="ce"}]',
            'clients.strategies={"0-1" = {name="kd", losses=[{name="soft_kl"}]}}',
        ],
    )
    assert client_losses(cfg, 0) == ([{"name": "soft_kl"}], "clients.strategies.0-1.losses")
    assert client_losses(cfg, 5) == ([{"name": "ce"}], "strategy.losses")
    assert client_losses(load_config(None, []), 0) is None
    server_strategy(cfg)  # the Params of kd never see the runtime's own key


@pytest.mark.parametrize("mechanism", ["dpsgd"])
def test_a_configured_loss_is_refused_under_dp_sgd_before_the_run(mechanism, small_config):
    from fedkd.data import prepare_federated_data

    cfg = load_config(
        small_config,
        [
            "strategy.name=kd",
            'strategy.losses=[{name="ce"}, {name="soft_kl"}]',
            f"privacy.mechanism={mechanism}",
            "privacy.noise_multiplier=1.0",
        ],
    )
    with pytest.raises((ConfigError, PrivacyError), match="custom training loss"):
        preflight(cfg, prepare_federated_data(cfg)[0])


def test_a_run_with_configured_losses_completes_and_keeps_the_adapters(small_config, tmp_path):
    """In-process federation (the runtime Flower calls): kd with a loss list; per-term
    metrics reach the round records."""  # noqa: D401
    from fedkd.data import prepare_federated_data
    from fedkd.federation import Federation
    from fedkd.inline import InlineTransport

    cfg = load_config(
        small_config,
        [
            "strategy.name=kd",
            'strategy.losses=[{name="ce", weight=0.5}, {name="dkd", weight=0.5, target="teacher"}]',
            "rounds=2",
            "privacy.audit=false",
        ],
    )
    data, path = prepare_federated_data(cfg)
    records = Federation(cfg, data).run(InlineTransport(cfg, str(path)))
    assert len(records) == 2
    first, last = records[0].clients, records[-1].clients
    assert last and all(np.isfinite(r.metrics["train_dkd"]) for r in last.values())
    assert all("train_dkd" not in r.metrics for r in first.values())  # no targets in round 1
    assert all(r.metrics["train_ce"] > 0 for r in first.values())


def test_a_loss_reading_a_teacher_feature_the_strategy_never_sends_is_refused_up_front():
    cfg = load_config(None, ["strategy.name=fedmd", 'strategy.losses=[{name="ce"}, {name="rkd"}]'])
    with pytest.raises(ConfigError, match="reads teacher.embedding, which fedmd's targets") as e:
        server_strategy(cfg)
    assert e.value.field == "strategy.losses"


def test_feature_hints_from_the_kd_teacher_run_from_a_config(small_config):
    """FitNets-style hints as configured losses: the kd server sends its teacher's
    embeddings with its logits (EmbeddedLogits) because a client loss reads them; each
    client's adapter maps its own embedding width to the teacher's and is kept between
    rounds."""
    from fedkd.data import prepare_federated_data
    from fedkd.federation import Federation
    from fedkd.inline import InlineTransport

    losses = (
        '[{name="ce", weight=0.5}, {name="soft_kl", weight=0.5, temperature=3.0}, '
        '{name="hint", weight=0.1}]'
    )
    cfg = load_config(
        small_config, ["strategy.name=kd", f"strategy.losses={losses}", "rounds=3",
                       "privacy.audit=false"],
    )  # fmt: skip
    data, path = prepare_federated_data(cfg)
    records = Federation(cfg, data).run(InlineTransport(cfg, str(path)))
    assert len(records) == 3
    for rec in records[1:]:  # targets (with the teacher's embeddings) from round 2 on
        assert all(np.isfinite(r.metrics["train_hint"]) for r in rec.clients.values())
    down = [sum(r.bytes_down for r in rec.clients.values()) for rec in records]
    assert down[0] == 0 and down[1] > 0


def test_class_means_of_embeddings_collect_prototypes_during_training():
    from fedkd.training import ClassMeans

    means = ClassMeans.zeros(C, key="embedding")
    model = _model()
    x, y = _data()
    seen: list[torch.Tensor] = []
    model[-1].register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    train_supervised(
        model, make_optimizer("adam", model, 0.01), x, y, epochs=1, batch_size=8,
        generator=torch.Generator().manual_seed(3), step=RoutedLoss.from_config([{"name": "ce"}]),
        class_means=means,
    )  # fmt: skip
    protos, counts = means.means()
    assert protos.shape == (C, 100) and counts.tolist() == [14, 13, 13]
    emb = torch.cat(seen)  # the classifier's inputs, in the order the steps saw them
    order = torch.cat(list(torch.randperm(len(y), generator=torch.Generator().manual_seed(3))
                           .split(8)))  # fmt: skip
    np.testing.assert_allclose(protos[0], emb[y[order] == 0].double().mean(0).numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="need a step loss"):
        train_supervised(model, make_optimizer("adam", model, 0.01), x, y, epochs=1,
                         batch_size=8, generator=torch.Generator(), class_means=means)  # fmt: skip


def test_a_term_needing_labels_and_teacher_on_one_batch_says_which_batch_lacks_what():
    """dkd (target = labels) on public targets: labels are on the private batch, the
    teacher's logits on the paired public one; the error names both."""
    routed = RoutedLoss.from_config([{"name": "ce"}, {"name": "dkd"}])
    with pytest.raises(MissingContextError, match="paired public batch lacks labels"):
        _train(routed, _public())


def test_prototype_losses_cannot_be_configured_only_a_strategy_step_provides_them():
    cfg = load_config(None, ["strategy.name=kd", 'strategy.losses=[{name="ce"}, {name="proto"}]'])
    with pytest.raises(ConfigError, match="reads prototypes") as err:
        server_strategy(cfg)
    assert err.value.field == "strategy.losses"


def test_client_level_dp_refuses_payloads_with_arrays_it_would_not_noise():
    from fedkd.payloads import EmbeddedLogits, Logits
    from fedkd.privacy.release import values_of

    idx = np.arange(3)
    values_of(Logits(idx, np.zeros((3, C), np.float32)))
    with pytest.raises(TypeError, match="not embedded_logits"):
        values_of(EmbeddedLogits(idx, np.zeros((3, C), np.float32), np.ones((3, 4), np.float32)))
