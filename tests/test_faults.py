"""Simulated faults (fedkd.faults): seeded dropout and stragglers, Byzantine clients, attacks.

No simulation runs here: plans are pure functions of (config, round, client), and the
attacks are checked on hand-built payloads against a few independent lines of NumPy.
"""

from __future__ import annotations

import copy
import json
from dataclasses import fields
from typing import ClassVar

import numpy as np
import pytest
import torch

from fedkd.config import ClientsConfig, Config, ConfigError, FaultsConfig, load_config
from fedkd.faults import (
    ATTACKS,
    RoundFaults,
    attack_payload,
    attack_rng,
    byzantine_clients,
    byzantine_payload,
    flip_labels,
    plan_round,
)
from fedkd.payloads import (
    ClassLogits,
    Logits,
    Payload,
    QuantizedSoftLabels,
    SoftLabels,
    Votes,
    Weights,
)

C = 4  # classes


def cfg(seed: int = 0, clients: int = 20, **faults) -> Config:
    return Config(seed=seed, clients=ClientsConfig(count=clients), faults=FaultsConfig(**faults))


def plans(config: Config, rounds: int, cids=None) -> list[RoundFaults]:
    cids = range(config.clients.count) if cids is None else cids
    return [plan_round(config, r, cids) for r in range(1, rounds + 1)]


# --- plan_round ------------------------------------------------------------------------


def test_nothing_configured_gives_empty_faults():
    plan = plan_round(Config(), 1, range(10))
    assert plan == RoundFaults()
    assert not plan
    assert plan.excluded == () and plan.attackers == ()
    assert plan.to_dict() == {"dropped": [], "delays": {}, "late": [], "byzantine": []}


def test_same_config_same_plan_and_other_seed_other_plan():
    knobs = {"dropout": 0.3, "stragglers": 0.3, "deadline": 8.0, "byzantine": 0.2}
    a = [p.to_dict() for p in plans(cfg(seed=1, **knobs), 10)]
    b = [p.to_dict() for p in plans(cfg(seed=1, **knobs), 10)]
    c = [p.to_dict() for p in plans(cfg(seed=2, **knobs), 10)]
    assert a == b
    assert a != c
    assert len({json.dumps(p) for p in a}) > 1  # rounds differ from each other too


def test_a_clients_fate_does_not_depend_on_who_else_was_sampled():
    config = cfg(dropout=0.3, stragglers=0.4, deadline=5.0)
    for rnd in range(1, 30):
        full = plan_round(config, rnd, range(20))
        some = [3, 7, 11, 19]
        part = plan_round(config, rnd, some)
        assert part.dropped == tuple(c for c in full.dropped if c in some)
        assert part.delays == {c: d for c, d in full.delays.items() if c in some}
        assert part.late == tuple(c for c in full.late if c in some)


def test_raising_dropout_does_not_reshuffle_the_other_clients_delays():
    low = plans(cfg(dropout=0.1, stragglers=0.5), 20)
    high = plans(cfg(dropout=0.4, stragglers=0.5), 20)
    for a, b in zip(low, high, strict=True):
        assert set(a.dropped) <= set(b.dropped)
        for c, d in b.delays.items():
            assert a.delays[c] == d


def test_rates_match_the_configured_probabilities():
    # 20 clients x 100 rounds = 2,000 client-rounds
    config = cfg(dropout=0.3, stragglers=0.25, delay=4.0)
    all_plans = plans(config, 100)
    n = 2000
    dropped = sum(len(p.dropped) for p in all_plans)
    delays = [d for p in all_plans for d in p.delays.values()]
    assert abs(dropped / n - 0.3) < 0.03
    assert abs(len(delays) / (n - dropped) - 0.25) < 0.04  # stragglers among the rest (~1,400)
    assert abs(np.mean(delays) / 4.0 - 1) < 0.15  # Exponential(mean 4)
    assert min(delays) >= 0
    for p in all_plans:
        assert not set(p.dropped) & set(p.delays)  # a dropped client is not also a straggler
        assert p.late == ()  # no deadline: nobody is late


def test_deadline_drops_exactly_the_stragglers_later_than_it():
    config = cfg(stragglers=0.5, delay=10.0, deadline=7.5)
    seen_late = seen_in_time = 0
    for p in plans(config, 30):
        assert p.late == tuple(sorted(c for c, d in p.delays.items() if d > 7.5))
        assert p.excluded == tuple(sorted({*p.dropped, *p.late}))
        seen_late += len(p.late)
        seen_in_time += sum(d <= 7.5 for d in p.delays.values())
    assert seen_late > 0 and seen_in_time > 0


def test_only_sampled_clients_get_faults():
    config = cfg(dropout=0.5, stragglers=0.9, deadline=1.0, byzantine=5)
    some = [2, 4, 6, 8]
    for p in plans(config, 20, some):
        assert set(p.dropped) | set(p.delays) | set(p.byzantine) <= set(some)
        assert p.byzantine == tuple(c for c in some if c in byzantine_clients(config))


def test_round_faults_round_trip_through_json():
    plan = RoundFaults(dropped=(1, 4), delays={2: 3.5, 7: 12.25}, late=(7,), byzantine=(4, 7))
    data = plan.to_dict()
    again = json.loads(json.dumps(data))
    assert again == data
    assert RoundFaults.from_dict(again) == plan
    assert plan.excluded == (1, 4, 7)
    assert plan.attackers == ()  # both Byzantine clients are dropped or late
    assert RoundFaults(byzantine=(3,)).attackers == (3,)
    for p in plans(cfg(seed=5, dropout=0.2, stragglers=0.5, deadline=3.0, byzantine=0.3), 5):
        d = p.to_dict()
        assert all(type(c) is int for c in [*d["dropped"], *d["late"], *d["byzantine"]])
        assert all(type(v) is float for v in d["delays"].values())
        assert RoundFaults.from_dict(json.loads(json.dumps(d))) == p


# --- Byzantine clients -----------------------------------------------------------------


def test_byzantine_count_from_a_fraction_and_from_a_count():
    assert len(byzantine_clients(cfg(clients=10, byzantine=0.3))) == 3
    assert len(byzantine_clients(cfg(clients=10, byzantine=0.25))) == 3  # 2.5 rounds up
    assert len(byzantine_clients(cfg(clients=10, byzantine=0.05))) == 1  # never silently none
    assert len(byzantine_clients(cfg(clients=10, byzantine=0.35))) == 4  # 3.5 rounds up
    assert len(byzantine_clients(cfg(clients=10, byzantine=4))) == 4
    assert len(byzantine_clients(cfg(clients=10, byzantine=10))) == 10
    assert byzantine_clients(cfg(clients=10)) == ()
    chosen = byzantine_clients(cfg(clients=10, byzantine=4))
    assert list(chosen) == sorted(set(chosen)) and all(0 <= c < 10 for c in chosen)
    assert all(type(c) is int for c in chosen)
    with pytest.raises(ConfigError, match="faults.byzantine"):
        load_config(None, ["clients.count=4", "faults.byzantine=5"])


def test_byzantine_clients_are_seeded_and_not_just_the_first_ids():
    picks = {byzantine_clients(cfg(seed=s, clients=10, byzantine=3)) for s in range(10)}
    assert len(picks) > 1
    assert picks != {(0, 1, 2)}
    assert byzantine_clients(cfg(seed=3, byzantine=3)) == byzantine_clients(
        cfg(seed=3, byzantine=3)
    )


def test_byzantine_clients_may_drop_out():
    config = cfg(dropout=0.5, byzantine=0.5)
    bad = set(byzantine_clients(config))
    all_plans = plans(config, 20)
    assert all(set(p.byzantine) == bad for p in all_plans)
    assert any(set(p.dropped) & bad for p in all_plans)
    assert all(set(p.attackers) == bad - set(p.dropped) for p in all_plans)


# --- attacks: fixtures -----------------------------------------------------------------


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


IDX = np.array([3, 5, 8, 13, 21, 34], np.int64)
LOGITS = (2.0 * np.random.default_rng(123).standard_normal((6, C))).astype(np.float32)
PROBS = softmax(LOGITS.astype(np.float64)).astype(np.float32)
PROBS[0] = [1.0, 0.0, 0.0, 0.0]  # exact zeros must survive log()
PROBS[1] = [0.0, 0.5, 0.5, 0.0]


def payloads() -> dict[str, Payload]:
    """One honest payload of each built-in type (fresh arrays each call)."""
    soft = SoftLabels(IDX.copy(), PROBS.copy())
    rng = np.random.default_rng(9)
    return {
        "logits": Logits(IDX.copy(), LOGITS.copy()),
        "soft_labels": soft,
        "class_logits": ClassLogits(LOGITS[:C].copy(), np.array([5, 0, 2, 9], np.float32)),
        "quantized_8": QuantizedSoftLabels.quantize(soft, 8),
        "quantized_1": QuantizedSoftLabels.quantize(soft, 1),
        "weights": Weights(
            {
                "fc.weight": (0.3 * rng.standard_normal((C, 5))).astype(np.float32),
                "fc.bias": np.zeros(C, np.float32),
                "bn.running_var": np.ones(C, np.float64),
                "bn.num_batches_tracked": np.array(7, np.int64),
            }
        ),
        "votes": Votes(IDX.copy(), np.array([0, 1, 2, 3, 3, 1], np.int16)),
    }


def arrays(p: Payload) -> dict[str, np.ndarray]:
    return p.arrays()


def attacked(name: str, attack: str, scale: float = 10.0, seed: int = 0):
    honest = payloads()[name]
    before = copy.deepcopy(arrays(honest))
    out = attack_payload(honest, attack, scale, C, np.random.default_rng(seed))
    for key, a in arrays(honest).items():  # the input is never changed
        np.testing.assert_array_equal(a, before[key])
        assert a.dtype == before[key].dtype
    return honest, out


CASES = [(name, attack) for name in payloads() for attack in ATTACKS]


@pytest.mark.parametrize(("name", "attack"), CASES)
def test_every_attack_keeps_type_idx_shapes_and_dtypes_and_validates(name, attack):
    honest, out = attacked(name, attack)
    assert type(out) is type(honest) and out is not honest
    a, b = arrays(honest), arrays(out)
    assert list(a) == list(b)
    for key in a:
        assert b[key].shape == a[key].shape, key
        assert b[key].dtype == a[key].dtype, key
        assert not np.shares_memory(a[key], b[key]), key  # a new payload, not a view
    if hasattr(honest, "idx"):
        np.testing.assert_array_equal(out.idx, honest.idx)
    out.validate(num_classes=C, public_idx=getattr(honest, "idx", None))
    if attack == "labelflip":  # acts on training, not on the payload
        for key in a:
            np.testing.assert_array_equal(b[key], a[key])


def test_attacks_are_reproducible_from_the_rng():
    for name in payloads():
        for attack in ATTACKS:
            _, x = attacked(name, attack, seed=7)
            _, y = attacked(name, attack, seed=7)
            for key, v in arrays(x).items():
                np.testing.assert_array_equal(v, arrays(y)[key])


def test_unknown_attack_and_unknown_payload_kind_are_refused():
    class Blob(Payload):
        kind: ClassVar[str] = "blob"

        def validate(self, *, num_classes, public_idx=None) -> None:
            pass

    with pytest.raises(ValueError, match="'blob'"):
        attack_payload(Blob(), "scale", 2.0, C, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown attack 'nope'"):
        attack_payload(payloads()["logits"], "nope", 2.0, C, np.random.default_rng(0))


# --- attacks: values -------------------------------------------------------------------


def test_logits_attacks():
    honest, out = attacked("logits", "signflip")
    np.testing.assert_array_equal(out.values, -honest.values)
    _, out = attacked("logits", "scale", scale=100.0)
    np.testing.assert_allclose(out.values, honest.values.astype(np.float64) * 100, rtol=1e-6)
    assert np.isfinite(out.values).all()
    _, out = attacked("logits", "random")
    assert not np.allclose(out.values, honest.values)
    # Gaussian with the honest values' std: measured on a large payload
    big = Logits(
        np.arange(5000),
        (3.0 * np.random.default_rng(10).standard_normal((5000, C))).astype(np.float32),
    )
    out = attack_payload(big, "random", 1.0, C, np.random.default_rng(1))
    assert abs(out.values.std() / big.values.std() - 1) < 0.03
    assert abs(out.values.mean()) < 0.1
    zeros = Logits(np.arange(5000), np.zeros((5000, C), np.float32))
    out = attack_payload(zeros, "random", 1.0, C, np.random.default_rng(1))
    assert abs(out.values.std() - 1) < 0.03  # std 0 -> 1


def test_soft_label_attacks_give_valid_rows():
    honest, out = attacked("soft_labels", "signflip")
    p = np.clip(honest.probs.astype(np.float64), 1e-12, None)
    expected = (1 / p) / (1 / p).sum(axis=1, keepdims=True)  # softmax(-log p) = 1/p, normalised
    np.testing.assert_allclose(out.probs, expected, atol=1e-6)
    assert (out.probs.argmax(1) == honest.probs.argmin(1)).all()
    np.testing.assert_allclose(out.probs[0], [0, 1 / 3, 1 / 3, 1 / 3], atol=1e-6)
    np.testing.assert_allclose(out.probs[1], [0.5, 0, 0, 0.5], atol=1e-6)

    _, out = attacked("soft_labels", "scale", scale=3.0)
    expected = p**3 / (p**3).sum(axis=1, keepdims=True)  # softmax(3 log p) = p^3, normalised
    np.testing.assert_allclose(out.probs, expected, atol=1e-6)
    assert (out.probs.argmax(1) == honest.probs.argmax(1)).all()
    assert (out.probs.max(1) >= honest.probs.max(1) - 1e-6).all()  # sharpened

    _, out = attacked("soft_labels", "random")
    assert not np.allclose(out.probs, honest.probs)
    for scale in (1e4, -50.0, 0.0):  # extreme factors still give valid rows
        _, out = attacked("soft_labels", "scale", scale=scale)
        out.validate(num_classes=C)
    big = SoftLabels(np.arange(4000), np.full((4000, C), 1 / C, np.float32))
    out = attack_payload(big, "random", 1.0, C, np.random.default_rng(2))
    out.validate(num_classes=C)
    np.testing.assert_allclose(out.probs.mean(axis=0), 1 / C, atol=0.01)  # Dirichlet(1) mean
    assert out.probs.std() > 0.1  # not the uniform rows it got


def test_class_logits_attacks_act_on_means_and_keep_counts():
    for attack in ATTACKS:
        honest, out = attacked("class_logits", attack, scale=5.0)
        np.testing.assert_array_equal(out.counts, honest.counts)
    _, out = attacked("class_logits", "signflip")
    np.testing.assert_array_equal(out.means, -honest.means)
    _, out = attacked("class_logits", "scale", scale=5.0)
    np.testing.assert_allclose(out.means, honest.means * 5, rtol=1e-6)
    _, out = attacked("class_logits", "random")
    assert not np.allclose(out.means, honest.means)


def test_quantized_soft_label_attacks_requantize_with_the_same_bits():
    # one bit: one-hot argmax rows. signflip moves all mass off the argmax, and the
    # largest-remainder quantizer (ties to the lower class) picks the lowest other class
    honest, out = attacked("quantized_1", "signflip")
    top = honest.soft_labels().probs.argmax(1)
    expected = np.where(top == 0, 1, 0)
    np.testing.assert_array_equal(out.soft_labels().probs.argmax(1), expected)
    np.testing.assert_array_equal(out.meta, honest.meta)
    _, out = attacked("quantized_1", "scale", scale=10.0)  # a sharpened one-hot row is itself
    np.testing.assert_array_equal(out.packed, honest.packed)
    # eight bits: the attacked dequantized rows, within one quantization step
    honest, out = attacked("quantized_8", "scale", scale=3.0)
    p = np.clip(honest.soft_labels().probs.astype(np.float64), 1e-12, None)
    np.testing.assert_allclose(out.dequantize(), p**3 / (p**3).sum(1, keepdims=True), atol=1 / 255)
    assert out.idx.dtype == honest.idx.dtype == np.int32
    _, out = attacked("quantized_8", "random")
    assert not np.array_equal(out.packed, honest.packed)


def test_weight_attacks_leave_integer_buffers_alone():
    honest, out = attacked("weights", "signflip")
    for name, a in honest.tensors.items():
        if name == "bn.num_batches_tracked":
            assert out.tensors[name] == 7
        else:
            np.testing.assert_array_equal(out.tensors[name], -a)
    _, out = attacked("weights", "scale", scale=4.0)
    np.testing.assert_allclose(out.tensors["fc.weight"], honest.tensors["fc.weight"] * 4)
    assert out.tensors["bn.num_batches_tracked"] == 7
    out.check_like(honest)
    _, out = attacked("weights", "random")
    assert out.tensors["bn.num_batches_tracked"] == 7
    assert not np.allclose(out.tensors["fc.weight"], honest.tensors["fc.weight"])
    big = Weights(
        {"w": (0.05 * np.random.default_rng(11).standard_normal(20000)).astype(np.float32)}
    )
    out = attack_payload(big, "random", 1.0, C, np.random.default_rng(3))
    assert abs(out.tensors["w"].std() / big.tensors["w"].std() - 1) < 0.03  # each tensor's std


def test_vote_attacks():
    honest, out = attacked("votes", "signflip")
    np.testing.assert_array_equal(out.labels, [3, 2, 1, 0, 0, 2])
    _, out = attacked("votes", "scale")
    np.testing.assert_array_equal(out.labels, honest.labels)  # votes have no magnitude
    big = Votes(np.arange(4000), np.zeros(4000, np.int16))
    out = attack_payload(big, "random", 1.0, C, np.random.default_rng(4))
    counts = np.bincount(out.labels, minlength=C)
    assert out.labels.dtype == np.int16 and len(counts) == C
    assert (np.abs(counts / 4000 - 1 / C) < 0.03).all()  # uniform class ids


def test_byzantine_payload_uses_the_configured_attack_and_per_client_rng():
    config = cfg(byzantine=2, attack="random", scale=3.0)
    honest = payloads()["logits"]
    a = byzantine_payload(config, 2, 5, honest, C)
    b = attack_payload(honest, "random", 3.0, C, attack_rng(config, 2, 5))
    np.testing.assert_array_equal(a.values, b.values)
    other = byzantine_payload(config, 2, 6, honest, C)
    later = byzantine_payload(config, 3, 5, honest, C)
    assert not np.array_equal(a.values, other.values)
    assert not np.array_equal(a.values, later.values)
    scaled = byzantine_payload(cfg(byzantine=2, attack="scale", scale=3.0), 1, 0, honest, C)
    np.testing.assert_allclose(scaled.values, honest.values * 3, rtol=1e-6)


# --- label flipping --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_flip_labels(dtype):
    y = torch.tensor([0, 1, 2, 3, 3, 0], dtype=dtype)
    before = y.clone()
    out = flip_labels(y, C)
    assert out.dtype == dtype and out.device == y.device
    assert out.tolist() == [3, 2, 1, 0, 0, 3]
    assert torch.equal(y, before)  # a new tensor
    assert out.data_ptr() != y.data_ptr()
    assert torch.equal(flip_labels(out, C), y)  # an involution


def test_flip_labels_stays_within_a_union_label_space_and_keeps_unlabelled():
    """Public classes 0..9, private 10..15 (FedMD): private labels flip among 10..15,
    public ones among 0..9, and an unlabelled public set's -1 stays -1."""
    private = torch.tensor([10, 11, 15, 12])
    assert flip_labels(private, 16, first=10).tolist() == [15, 14, 10, 13]
    assert flip_labels(torch.tensor([0, 9, 3]), 10).tolist() == [9, 0, 6]
    assert flip_labels(torch.tensor([-1, -1, 2]), C).tolist() == [-1, -1, 1]


def test_round_faults_fields_are_what_the_lead_records():
    assert [f.name for f in fields(RoundFaults)] == ["dropped", "delays", "late", "byzantine"]
