"""Vectorised local training (fedkd/vectorize.py) against ``node.train_private``.

Every test trains deep copies of the same nodes both ways and compares students,
optimizer state dicts, generator states and metrics. In float64 the two paths agree to
rounding (atol 1e-9); in float32 Adam divides by the square root of tiny second moments,
which magnifies the rounding of differently ordered sums (vmap's batched matmul and
grouped convolution) to ~3e-5 in six steps, so float32 checks use atol 1e-4.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedkd.config import Spec, load_config
from fedkd.data.transforms import Augment
from fedkd.kd.step import StepLoss
from fedkd.models import build_model
from fedkd.payloads import ClassLogits, Logits, SoftLabels
from fedkd.seeding import seed_client_round
from fedkd.strategy import ClientNode
from fedkd.training import make_optimizer
from fedkd.vectorize import train_private_group, why_not

D, C, N = 12, 4, 37  # input features, classes, private samples (batches 16, 16, 5)
ADAM = "adam"
SGD = '{name="sgd", momentum=0.9, weight_decay=0.0005}'
LOGITS = Logits(np.arange(10), np.random.default_rng(0).normal(size=(10, C)).astype(np.float32))
SOFT = SoftLabels(np.arange(3, 13), np.full((10, C), 1 / C, np.float32))
PUBLIC = torch.randn(20, D, generator=torch.Generator().manual_seed(5))


def config(optimizer: str = ADAM, *overrides: str):
    return load_config(
        None,
        ["clients.batch_size=16", "clients.local_epochs=2", f"clients.optimizer={optimizer}",
         *overrides],
    )  # fmt: skip


def make_node(
    cfg,
    cid: int,
    arch: str = "mlp",
    n: int = N,
    *,
    model: nn.Module | None = None,
    dtype: torch.dtype = torch.float32,
    rnd: int = 1,
    public: torch.Tensor = PUBLIC,
    **kwargs,
) -> ClientNode:
    """A client with its own student seed, data and generator (``cid``) on shared public
    inputs; ``model`` replaces the built student."""
    gen = torch.Generator().manual_seed(100 + cid)
    model = (model or build_model(Spec(arch), (D,), C, seed=cid)).to(dtype)
    return ClientNode(
        cid=cid,
        round=rnd,
        model=model,
        optimizer=make_optimizer(cfg.clients.optimizer, model, cfg.clients.lr),
        x=torch.randn(n, D, generator=gen, dtype=dtype),
        y=torch.randint(C, (n,), generator=gen),
        public_x=public.to(dtype),
        public_y=torch.arange(20) % C,
        test_x=torch.zeros(2, D, dtype=dtype),
        test_y=torch.arange(2),
        num_classes=C,
        settings=cfg.clients,
        generator=torch.Generator().manual_seed(1000 * rnd + cid),
        device=torch.device("cpu"),
        rounds=3,
        **kwargs,
    )


def _close(a, b, atol: float, where: str) -> None:
    """Nested state dicts equal: tensors within ``atol``, everything else exactly."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _close(a[k], b[k], atol, f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, atol, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=where)
    else:
        assert a == b, where


def both_ways(
    nodes: Sequence[ClientNode], atol: float, **train
) -> tuple[list[dict[str, float]], list[ClientNode]]:
    """Train ``nodes`` vectorised and deep copies of them one by one; assert the two
    agree and return the vectorised metrics and the sequentially trained copies."""
    ref = copy.deepcopy(list(nodes))
    torch.manual_seed(0)  # fallbacks with dropout draw from the global generator...
    got = train_private_group(nodes, **train)
    expected = []
    for node in ref:  # ... seeded for each client's round, as the runtime seeds it
        seed_client_round(node.seed, node.round, node.cid)
        expected.append(node.train_private(**train))
    assert len(got) == len(nodes)
    for i, (node, other, m, e) in enumerate(zip(nodes, ref, got, expected, strict=True)):
        _close(node.model.state_dict(), other.model.state_dict(), atol, f"node {i} model")
        _close(node.optimizer.state_dict(), other.optimizer.state_dict(), atol, f"node {i} opt")
        assert torch.equal(node.generator.get_state(), other.generator.get_state()), i
        assert set(m) == {*e, "vectorized"}, i
        for k, v in e.items():
            assert m[k] == pytest.approx(v, abs=atol), (i, k)
    return got, ref


@pytest.mark.parametrize("arch", ["mlp", "cnn1d"])
@pytest.mark.parametrize("optimizer", [ADAM, SGD])
@pytest.mark.parametrize("kd", [None, LOGITS])
def test_a_group_trains_as_each_client_would_alone(arch, optimizer, kd):
    cfg = config(optimizer, "clients.label_smoothing=0.1")
    nodes = [make_node(cfg, cid, arch, dtype=torch.float64) for cid in range(3)]
    got, _ = both_ways(nodes, 1e-9, kd=kd, kd_weight=0.5, temperature=2.0)
    assert [m["vectorized"] for m in got] == [1.0, 1.0, 1.0]
    assert (got[0]["kd"] > 0) == (kd is not None)
    assert got[0]["ce"] != got[1]["ce"]  # each client its own data and student


@pytest.mark.parametrize("loss", ["mse", "mae", "soft_kl"])
def test_each_built_in_kd_loss_trains_per_client(loss):
    nodes = [make_node(config(), cid, dtype=torch.float64) for cid in range(2)]
    got, _ = both_ways(nodes, 1e-9, kd=SOFT, kd_weight=0.7, temperature=3.0, loss=loss)
    assert [m["vectorized"] for m in got] == [1.0, 1.0]


@pytest.mark.parametrize("arch", ["mlp", "cnn1d"])
def test_float32_agrees_within_rounding(arch):
    nodes = [make_node(config(), cid, arch) for cid in range(3)]
    got, _ = both_ways(nodes, 1e-4, kd=LOGITS, kd_weight=0.5)
    assert [m["vectorized"] for m in got] == [1.0, 1.0, 1.0]


def _next_round(cfg, trained: Sequence[ClientNode]) -> list[ClientNode]:
    """Round 2 of each client as the runtime builds it: a fresh student and optimizer,
    loaded from the round-1 state dicts."""
    out = []
    for node in trained:
        new = make_node(cfg, node.cid, dtype=torch.float64, rnd=2)
        new.model.load_state_dict(node.model.state_dict())
        new.optimizer.load_state_dict(node.optimizer.state_dict())
        out.append(new)
    return out


@pytest.mark.parametrize("optimizer", [ADAM, SGD])
def test_a_second_round_continues_from_the_saved_state(optimizer):
    cfg = config(optimizer, 'clients.schedule={name="cosine", clock="step", warmup=1}')
    nodes = [make_node(cfg, cid, dtype=torch.float64) for cid in range(3)]
    got, ref = both_ways(nodes, 1e-9, kd=SOFT, kd_weight=0.3, loss="prob_kl")
    assert "lr" in got[0] and got[0]["vectorized"] == 1.0
    # both paths' saved states lead to the same second round, vectorised or not
    again, _ = both_ways(_next_round(cfg, nodes), 1e-9, kd=LOGITS, kd_weight=0.5)
    assert [m["vectorized"] for m in again] == [1.0, 1.0, 1.0]
    alone = _next_round(cfg, ref)
    for node in alone:
        node.train_private(kd=LOGITS, kd_weight=0.5)
    trained = _next_round(cfg, nodes)
    train_private_group(trained, kd=LOGITS, kd_weight=0.5)
    for a, b in zip(trained, alone, strict=True):
        _close(a.model.state_dict(), b.model.state_dict(), 1e-9, "round 2")


def test_mixed_nodes_split_into_groups_in_order():
    cfg = config()
    f64 = torch.float64
    nodes = [
        make_node(cfg, 0, dtype=f64),
        make_node(cfg, 1, "cnn1d", dtype=f64),  # alone: the only cnn1d
        make_node(cfg, 2, n=30, dtype=f64),
        make_node(cfg, 3, dtype=f64, public=PUBLIC.flip(0)),  # its own copy of the inputs
        make_node(cfg, 4, n=30, dtype=f64),
        make_node(cfg, 5, dtype=f64),  # 5-8: sampled before, 5 and 7 once, 6 and 8 twice
        make_node(cfg, 6, dtype=f64),
        make_node(cfg, 7, dtype=f64),
        make_node(cfg, 8, dtype=f64),
        make_node(cfg, 9, n=29, dtype=f64),  # alone: its size
    ]
    for node in (*nodes[5:9], nodes[6], nodes[8]):  # Adam step counts 6 and 12
        node.train_private()
    got, _ = both_ways(nodes, 1e-9, kd=LOGITS, kd_weight=0.5)
    assert [m["vectorized"] for m in got] == [1, 0, 1, 1, 1, 1, 1, 1, 1, 0]


class _CE(StepLoss):
    def forward(self, main, paired):
        return F.cross_entropy(main.student["logits"], main.labels)


def _dropout_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, C))


def test_why_not_names_what_cannot_be_vectorised():
    cfg = config()
    assert why_not(make_node(cfg, 0), LOGITS) is None
    assert why_not(make_node(cfg, 0), SOFT, loss="mse") is None
    cases = {
        "Dropout": make_node(cfg, 0, model=_dropout_mlp()),
        "buffers": make_node(cfg, 0, model=nn.Sequential(nn.Linear(D, C), nn.BatchNorm1d(C))),
        "clipping": make_node(config(ADAM, "clients.grad_clip=1.0"), 0),
        "step loss": make_node(cfg, 0, losses=_CE()),
        "augmentation": make_node(cfg, 0, augment=Augment(flip=True)),
        "DP-SGD": make_node(cfg, 0, privacy=load_config(None, ["privacy.mechanism=dpsgd"]).privacy),
    }
    for words, node in cases.items():
        reason = why_not(node, LOGITS)
        assert reason is not None and words in reason, (words, reason)
    node = make_node(cfg, 0)
    assert "ClassLogits" in why_not(node, ClassLogits(np.zeros((C, C)), np.ones(C)))
    node.optimizer = torch.optim.NAdam(node.model.parameters())
    assert "NAdam" in why_not(node, None)


def test_ineligible_nodes_train_alone_with_the_same_results():
    clip = config(ADAM, "clients.grad_clip=0.5")
    nodes = [
        make_node(config(), 0, model=_dropout_mlp()),
        make_node(clip, 1),
        make_node(config(), 2),
        make_node(config(), 3, model=_dropout_mlp()),
        make_node(clip, 4),
        make_node(config(), 5),
    ]
    got, _ = both_ways(nodes, 1e-4, kd=LOGITS, kd_weight=0.5)
    assert [m["vectorized"] for m in got] == [0.0, 0.0, 1.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize(
    ("overrides", "said"),
    [(["simulation.vectorize=false"], None),
     (["partition.name=iid"], None),
     ([], "private-set size no other of them has"),
     (["partition.name=iid", "strategy=fedmd"], "the strategy has no train_group"),
     (["partition.name=iid", "clients.grad_clip=1"], "gradient clipping (clients.grad_clip)"),
     (["partition.name=iid", "simulation.clients_per_message=1"], "each message carries one")],
)  # fmt: skip
def test_the_run_says_before_it_starts_which_clients_train_alone(overrides, said):
    from fedkd.config import load_config
    from fedkd.data import prepare_federated_data
    from fedkd.vectorize import start_notes
    from tests.conftest import SMALL

    cfg = load_config(None, [*SMALL, "clients.count=6", "simulation.vectorize=true", *overrides])
    _, path = prepare_federated_data(cfg)
    notes = start_notes(cfg, str(path))
    if said is None:
        assert notes == []
    else:
        assert notes and all(said in n for n in notes), notes
