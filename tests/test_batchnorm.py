"""BatchNorm is handled correctly everywhere, on real zoo models and real node code.

1. Shared logits (``public_logits``, ``public_probs``, every client strategy's
   ``predict``, ``ServerNode.logits``) come from eval mode (running statistics) and
   leave the running statistics and the train/eval mode of every module as they were.
2. Distillation on public inputs (client ``distill_public``, the server teacher, FedDF's
   prototypes) runs in train mode: the running statistics move to the public inputs'.
3. FedAvg / FedDF average BatchNorm buffers like parameters (weighted by private-set
   size); ``num_batches_tracked`` stays an int64 count (one client's, not a float
   average); ``weights()`` -> ``load_weights`` round-trips every buffer.
4. Evaluation (client, server, the strategies' ``evaluate``) is in eval mode and
   restores the previous mode.
5. DP-SGD with a BatchNorm student is refused before round 1, naming the _gn variant.

``tiny_bn`` normalises its *inputs* with a BatchNorm2d first (momentum 0.5), so that
layer's running mean must approach the per-channel means of whatever it was trained
on. Expected values come from independent eval-mode forward passes on copies and from
NumPy, not from the code under test. No data download, no Flower, no Ray.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from fedkd.config import ConfigError, Spec, load_config
from fedkd.data.datasets import Pool
from fedkd.models import build_model
from fedkd.payloads import Logits, SoftLabels, Weights
from fedkd.selection import client_strategy
from fedkd.strategy import ClientNode, ServerNode
from fedkd.training import make_optimizer
from strategies.fedavg import FedAvgClient, FedAvgServer
from strategies.feddf import FedDFParams, FedDFServer
from strategies.kd import KDServer

C = 4  # classes
SHAPE = (3, 16, 16)  # small images: resnet8 steps stay cheap on a CPU
TINY = "tests.test_batchnorm:tiny_bn"
PRIVATE_SHIFT = (1.0, -2.0, 0.5)  # per-channel means of the private inputs
PUBLIC_SHIFT = (-3.0, 2.0, 4.0)  # ... and of the public inputs, far from them


def tiny_bn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A small BatchNorm CNN whose first layer normalises the raw input channels."""
    c = input_shape[0]
    return nn.Sequential(
        nn.BatchNorm2d(c, momentum=0.5),  # forgets fast: a few steps show where it tracks
        nn.Conv2d(c, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, num_classes),
    )


def image_pool(num_samples: int, seed: int) -> Pool:
    """Random 3x8x8 images in 4 classes (a dataset by import path, for the DP-SGD check)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, num_samples)
    x = rng.standard_normal((num_samples, 3, 8, 8)).astype(np.float32)
    x[:, 0] += y[:, None, None].astype(np.float32)
    return Pool(x, y.astype(np.int64), C)


# --- helpers -------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread is faster, and no slower on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(*overrides: str):
    return load_config(
        None,
        [
            "clients.count=4",
            "clients.models=['resnet8']",
            "clients.batch_size=16",
            "clients.local_epochs=1",
            "server.teacher='resnet8'",
            "server.batch_size=16",
            "server.epochs=1",
            *overrides,
        ],
    )


def images(n: int, seed: int, shift=(0.0, 0.0, 0.0), scale: float = 1.0):
    """``n`` random images with per-channel means ``shift``; labels cycle over classes."""
    gen = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(n, *SHAPE, generator=gen)
    x += torch.tensor(shift).view(1, 3, 1, 1)
    return x, torch.arange(n) % C


def make_client(cfg, cid: int, spec: str, *, n: int = 48, seed: int = 0) -> ClientNode:
    x, y = images(n, 100 + cid, PRIVATE_SHIFT, scale=1.0 + 0.5 * cid)
    public_x, public_y = images(40, 7, PUBLIC_SHIFT, scale=2.0)
    test_x, test_y = images(24, 8, PRIVATE_SHIFT)
    model = build_model(Spec(spec), SHAPE, C, seed=seed)
    return ClientNode(
        cid=cid,
        round=1,
        model=model,
        optimizer=make_optimizer(cfg.clients.optimizer, model, cfg.clients.lr),
        x=x,
        y=y,
        public_x=public_x,
        public_y=public_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=C,
        settings=cfg.clients,
        generator=torch.Generator().manual_seed(cid),
        device=torch.device("cpu"),
    )


def make_server(cfg, *, teacher: str | None = None, num_examples=None) -> ServerNode:
    public_x, _ = images(40, 7, PUBLIC_SHIFT, scale=2.0)  # the clients' public inputs
    test_x, test_y = images(24, 8, PRIVATE_SHIFT)
    model = build_model(Spec(teacher), SHAPE, C, seed=5) if teacher else None
    return ServerNode(
        round=1,
        teacher=model,
        optimizer=make_optimizer(cfg.server.optimizer, model, cfg.server.lr) if model else None,
        public_x=public_x,
        test_x=test_x,
        test_y=test_y,
        num_classes=C,
        config=cfg,
        generator=torch.Generator().manual_seed(0),
        num_examples=dict(num_examples or {}),
        public_idx=np.arange(40, dtype=np.int64),
    )


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for name, value in before.items():
        assert after[name].dtype == value.dtype, name
        assert torch.equal(after[name], value), f"{name} changed"


def modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def eval_forward(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Logits by a plain eval-mode forward pass on a copy (the model is not touched)."""
    clone = copy.deepcopy(model).eval()
    with torch.no_grad():
        return clone(x).double().numpy()


def train_forward(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Logits from batch statistics (train mode), on a copy."""
    clone = copy.deepcopy(model).train()
    with torch.no_grad():
        return clone(x).double().numpy()


def trained(cfg, cid: int, spec: str, **kw) -> ClientNode:
    """A client after one local epoch: its running statistics are its private data's."""
    node = make_client(cfg, cid, spec, **kw)
    node.train_private()
    return node


def channel_means(x: torch.Tensor) -> np.ndarray:
    return x.double().mean(dim=(0, 2, 3)).numpy()


# --- 1. shared logits: eval mode, nothing changes ------------------------------------


@pytest.mark.parametrize("spec", ["resnet8", TINY])
@pytest.mark.parametrize("start", ["train", "eval"])
def test_public_logits_use_running_stats_and_change_nothing(spec, start):
    cfg = config(f"clients.models=['{spec}']")
    node = trained(cfg, 0, spec)
    node.model.train(start == "train")
    before, mode = snapshot(node.model), modes(node.model)
    idx = np.array([3, 0, 17, 5, 39, 21])
    x = node.public_x[torch.as_tensor(idx)]

    got = node.public_logits(idx)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, eval_forward(node.model, x), rtol=1e-5, atol=1e-5)
    # eval mode: a sample's logits do not depend on the rest of its batch ...
    np.testing.assert_allclose(node.public_logits(idx[:1])[0], got[0], rtol=1e-4, atol=1e-4)
    # ... while batch statistics (train mode) would give other logits
    assert not np.allclose(got, train_forward(node.model, x), atol=1e-3)
    probs = node.public_probs(idx, temperature=2.0).probs
    expected = torch.softmax(torch.from_numpy(eval_forward(node.model, x)) / 2.0, -1).numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    node.class_mean_logits(softmax=True)  # FD's payload: private inputs, same path
    node.evaluate()

    assert_same_state(node.model, before)  # running_mean/var, num_batches_tracked too
    assert modes(node.model) == mode


@pytest.mark.parametrize("name", ["kd", "fedmd", "dsfl", "cfd", "cronus", "pate", "fd", "fedavg"])
def test_every_client_strategys_predict_leaves_a_batchnorm_student_alone(name):
    cfg = config(f"strategy.name={name}")
    node = trained(cfg, 1, "resnet8", n=16)
    node.model.train()
    before, mode = snapshot(node.model), modes(node.model)
    strategy = client_strategy(cfg, 1)
    payload = strategy.predict(node, np.arange(12))
    assert payload is not None
    assert_same_state(node.model, before)
    assert modes(node.model) == mode
    if isinstance(payload, Logits):  # what travels are the eval-mode logits
        expected = eval_forward(node.model, node.public_x[:12])
        np.testing.assert_allclose(payload.values, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("start", ["train", "eval"])
def test_server_logits_use_running_stats_and_change_nothing(start):
    cfg = config()
    server = make_server(cfg, teacher="resnet8")
    server.distill_teacher(  # non-trivial running statistics first
        Logits(np.arange(40), np.zeros((40, C), np.float32)), temperature=1.0
    )
    teacher = server.teacher
    assert teacher is not None
    teacher.train(start == "train")
    before, mode = snapshot(teacher), modes(teacher)
    idx = np.arange(0, 40, 3)
    expected = eval_forward(teacher, server.public_x[torch.as_tensor(idx)])
    np.testing.assert_allclose(server.teacher_logits(idx).values, expected, rtol=1e-5, atol=1e-5)
    probs = server.soft_labels(teacher, idx).probs
    np.testing.assert_allclose(probs, torch.softmax(torch.tensor(expected), -1).numpy(), atol=1e-6)
    assert_same_state(teacher, before)
    assert modes(teacher) == mode


# --- 2. distillation: train mode, statistics of the data distilled on ----------------


def test_client_distillation_updates_running_stats_on_the_public_inputs():
    cfg = config(f"clients.models=['{TINY}']")
    node = trained(cfg, 0, TINY)
    first = node.model[0]
    assert isinstance(first, nn.BatchNorm2d)
    # private training (3 batches, momentum 0.5, from 0) moved it towards the private inputs
    private_means = channel_means(node.private_data()[0])
    np.testing.assert_allclose(first.running_mean.numpy(), 0.875 * private_means, atol=0.05)
    counts = [int(m.num_batches_tracked) for m in bn_layers(node.model)]
    node.model.eval()  # whatever the mode before, distillation trains
    targets = Logits(np.arange(40), np.zeros((40, C), np.float32))
    node.distill_public(targets, epochs=5)  # 3 batches (16, 16, 8) per epoch
    assert node.model.training
    # 15 steps at momentum 0.5: the public inputs' channel means, not the private ones
    public = channel_means(node.public_x)
    np.testing.assert_allclose(first.running_mean.numpy(), public, atol=0.1)
    var = node.public_x.double().var(dim=(0, 2, 3)).numpy()
    np.testing.assert_allclose(first.running_var.numpy(), var, rtol=0.1)
    assert [int(m.num_batches_tracked) for m in bn_layers(node.model)] == [c + 15 for c in counts]


def test_server_teacher_distillation_updates_running_stats():
    cfg = config("server.epochs=5")
    server = make_server(cfg, teacher=TINY)
    teacher = server.teacher
    assert teacher is not None
    teacher.eval()
    before = snapshot(teacher)
    server.distill_teacher(Logits(np.arange(40), np.zeros((40, C), np.float32)), temperature=1.0)
    assert teacher.training
    for layer in bn_layers(teacher):
        assert int(layer.num_batches_tracked) == 15
    assert not torch.equal(teacher[2].running_mean, before["2.running_mean"])
    np.testing.assert_allclose(
        teacher[0].running_mean.numpy(), channel_means(server.public_x), atol=0.1
    )


def test_kd_server_distills_its_resnet_teacher_in_train_mode():
    cfg = config("strategy.name=kd")
    server = make_server(cfg, teacher="resnet8")
    teacher = server.teacher
    assert teacher is not None
    teacher.eval()
    before = snapshot(teacher)
    KDServer().distill(server, Logits(np.arange(40), np.ones((40, C), np.float32)))
    for layer in bn_layers(teacher):
        assert int(layer.num_batches_tracked) == 3  # 40 public inputs, batches of 16
    assert not torch.equal(teacher.bn1.running_mean, before["bn1.running_mean"])


# --- 3. FedAvg / FedDF: buffers averaged, integer counters kept ------------------------


def test_weights_round_trip_carries_every_batchnorm_buffer():
    cfg = config()
    node = trained(cfg, 0, "resnet8")
    weights = node.weights()
    for name, module in node.model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                assert f"{name}.{buffer}" in weights.tensors
            count = weights.tensors[f"{name}.num_batches_tracked"]
            assert count.dtype == np.int64 and count.shape == () and int(count) == 3
    fresh = make_client(cfg, 1, "resnet8", seed=42)  # other initial weights
    fresh.load_weights(weights)
    assert_same_state(fresh.model, snapshot(node.model))
    x = node.public_x[:8]
    np.testing.assert_array_equal(eval_forward(fresh.model, x), eval_forward(node.model, x))


def _state(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _check_average(got: dict, states: list[dict], sizes: list[float]) -> None:
    """Float tensors (parameters and BN buffers) are the size-weighted mean; integer
    buffers keep their dtype and one client's count, never a float average."""
    for name, value in got.items():
        values = [s[name] for s in states]
        if np.issubdtype(values[0].dtype, np.floating):
            expected = np.average(np.stack(values).astype(np.float64), axis=0, weights=sizes)
            assert value.dtype == values[0].dtype, name
            np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6, err_msg=name)
        else:
            assert value.dtype == np.int64 and value.shape == (), name
            assert int(value) in {int(v) for v in values}, name


def test_fedavg_averages_batchnorm_buffers_weighted_by_size():
    sizes = {0: 16, 1: 32, 2: 64}
    cfg = config("strategy.name=fedavg")
    server = make_server(cfg, num_examples=sizes)
    strategy = FedAvgServer()
    strategy.setup(server)
    clients = {cid: trained(cfg, cid, "resnet8", n=n, seed=cid) for cid, n in sizes.items()}
    states = [_state(clients[c].model) for c in sizes]
    # the clients' running statistics differ (their inputs are scaled differently) ...
    assert not np.allclose(states[0]["bn1.running_var"], states[2]["bn1.running_var"])
    # ... and so do their counters: 1, 2 and 4 batches
    assert [int(s["bn1.num_batches_tracked"]) for s in states] == [1, 2, 4]
    payloads = {cid: n.weights() for cid, n in clients.items()}
    for cid, p in payloads.items():
        strategy.check_payload(server, cid, p)
    avg = strategy.aggregate(server, payloads)
    assert isinstance(avg, Weights)
    _check_average(avg.tensors, states, list(sizes.values()))
    _check_average(_state(server.state["model"]), states, list(sizes.values()))
    # the averaged running statistics are what the global model evaluates with
    x = server.test_x
    metrics = strategy.evaluate(server)
    expected = (eval_forward(server.state["model"], x).argmax(1) == server.test_y.numpy()).mean()
    assert metrics["accuracy"] == pytest.approx(expected)
    # and what a client starts its next round from
    server.round = 2
    node = make_client(config("strategy.name=fedavg", "clients.local_epochs=0"), 0, "resnet8")
    FedAvgClient().train(node, strategy.client_targets(server, 0, None))
    assert_same_state(node.model, snapshot(server.state["model"]))


def test_feddf_averages_buffers_per_architecture_and_distills_in_train_mode():
    sizes = {0: 16, 1: 32, 2: 48, 3: 64}  # clients 0, 2: resnet8; 1, 3: tiny_bn
    cfg = config("strategy.name=feddf", f"clients.models=['resnet8', '{TINY}']", "server.epochs=3")
    server = make_server(cfg, num_examples=sizes)
    strategy = FedDFServer(FedDFParams())
    arch = {0: "resnet8", 1: TINY, 2: "resnet8", 3: TINY}
    clients = {cid: trained(cfg, cid, arch[cid], n=n, seed=cid) for cid, n in sizes.items()}
    payloads = {}
    for cid, node in clients.items():
        strategy.client_targets(server, cid, None)
        payloads[cid] = node.weights()
        strategy.check_payload(server, cid, payloads[cid])
    agg = strategy.aggregate(server, payloads)
    # the ensemble: each client model's eval-mode logits (its own running statistics)
    ensemble = np.mean([eval_forward(n.model, server.public_x) for n in clients.values()], 0)
    assert isinstance(agg, Logits)
    np.testing.assert_allclose(agg.values, ensemble, rtol=1e-4, atol=1e-4)
    models = server.state["models"]
    for name, (a, b) in {"resnet8": (0, 2), TINY: (1, 3)}.items():
        states = [_state(clients[a].model), _state(clients[b].model)]
        _check_average(_state(models[name]), states, [sizes[a], sizes[b]])
    # distillation on the public set in train mode re-estimates the running statistics
    before = {name: snapshot(m) for name, m in models.items()}
    strategy.distill(server, agg)
    for name, model in models.items():
        assert model.training
        for key, value in before[name].items():
            if key.endswith("num_batches_tracked"):
                assert int(model.state_dict()[key]) == int(value) + 9, key
    np.testing.assert_allclose(
        models[TINY][0].running_mean.numpy(), channel_means(server.public_x), atol=0.1
    )
    assert not torch.equal(
        models["resnet8"].bn1.running_mean, before["resnet8"]["bn1.running_mean"]
    )


# --- 4. evaluation: eval mode, mode restored -----------------------------------------


@pytest.mark.parametrize("start", ["train", "eval"])
def test_evaluation_is_in_eval_mode_and_restores_the_mode(start):
    cfg = config("strategy.name=kd")
    node = trained(cfg, 0, "resnet8", n=16)
    server = make_server(cfg, teacher="resnet8")
    teacher = server.teacher
    assert teacher is not None
    server.distill_teacher(Logits(np.arange(40), np.zeros((40, C), np.float32)), temperature=1.0)
    for model, evaluate, x, y in (
        (node.model, node.evaluate, node.test_x, node.test_y),
        (teacher, lambda: server.evaluate(teacher), server.test_x, server.test_y),
        (teacher, lambda: KDServer().evaluate(server), server.test_x, server.test_y),
    ):
        model.train(start == "train")
        before, mode = snapshot(model), modes(model)
        logits = eval_forward(model, x)
        metrics = evaluate()
        assert metrics["accuracy"] == pytest.approx((logits.argmax(1) == y.numpy()).mean())
        ce = torch.nn.functional.cross_entropy(torch.from_numpy(logits), y).item()
        assert metrics["loss"] == pytest.approx(ce, rel=1e-4)
        assert_same_state(model, before)
        assert modes(model) == mode


def test_soft_labels_of_a_batchnorm_model_are_probabilities_in_eval_mode():
    server = make_server(config(), teacher=TINY)
    labels = server.soft_labels(server.teacher, np.arange(40))
    assert isinstance(labels, SoftLabels)
    np.testing.assert_allclose(labels.probs.sum(1), 1.0, atol=1e-5)
    # one sample alone gets the same row: eval mode, no batch statistics
    alone = server.soft_labels(server.teacher, np.array([7])).probs[0]
    np.testing.assert_allclose(alone, labels.probs[7], atol=1e-6)


# --- 5. DP-SGD: Opacus cannot train BatchNorm ----------------------------------------


def test_dpsgd_refuses_a_batchnorm_student_before_round_1():
    from fedkd.run_steps import prepare as _prepare

    cfg = load_config(
        None,
        [
            "data.dataset='tests.test_batchnorm:image_pool'",
            "data.private=200",
            "data.public=64",
            "data.test=64",
            "partition=iid",
            "clients.count=2",
            "clients.models=['resnet8']",
            "server.teacher='resnet8'",
            "privacy.mechanism=dpsgd",
            "strategy.name=fedavg",
        ],
    )
    with pytest.raises(ConfigError, match="resnet8.*resnet8_gn") as err:
        _prepare(cfg)
    assert err.value.field.startswith("clients.model")


def test_dpsgd_check_names_the_group_and_accepts_groupnorm_twins():
    from fedkd.privacy.dpsgd import check_models

    base = ["clients.count=3", "privacy.mechanism=dpsgd"]
    ok = load_config(None, [*base, "clients.models=['resnet8_gn']"])
    check_models(ok, (3, 16, 16), 10)  # GroupNorm: fine
    grouped = load_config(
        None, [*base, "clients.models=['resnet8_gn']", "clients.model_groups={'1'='resnet20'}"]
    )
    with pytest.raises(ConfigError, match="resnet20_gn") as err:
        check_models(grouped, (3, 16, 16), 10)
    assert err.value.field == "clients.model_groups.1"
    with pytest.raises(ConfigError, match="without BatchNorm") as err:
        check_models(load_config(None, [*base, "clients.models=['vgg11']"]), (3, 32, 32), 10)
    assert err.value.field == "clients.models"
