"""Training recipes: optimizer settings, schedules and their clocks, clipping, label
smoothing, their config errors, and that a resumed run gets the same rates."""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedkd.checkpoint import restore_checkpoint, save_checkpoint
from fedkd.config import ConfigError, Spec, load_config
from fedkd.data import prepare_federated_data
from fedkd.federation import Federation, Interrupted
from fedkd.inline import InlineTransport
from fedkd.recipes import Recipe, check_recipes, schedule_factor
from fedkd.state_store import DiskStateStore
from fedkd.training import KDTargets, distill, make_optimizer, train_supervised
from tests.test_resume import _numbers


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- schedules ---------------------------------------------------------------------------


def test_schedule_factors_follow_their_closed_forms():
    f = lambda name, t, total, **p: schedule_factor(Spec(name, p), t, total)  # noqa: E731
    assert [f("constant", t, 5) for t in range(5)] == [1.0] * 5
    assert [f("step", t, 9, step_size=3, gamma=0.5) for t in (0, 2, 3, 6, 8)] == [
        1,
        1,
        0.5,
        0.25,
        0.25,
    ]
    assert [f("multistep", t, 10, milestones=[2, 5]) for t in (1, 2, 4, 5)] == pytest.approx(
        [1, 0.1, 0.1, 0.01]
    )
    assert f("cosine", 0, 10) == 1.0
    assert f("cosine", 5, 10) == pytest.approx(0.5)
    assert f("cosine", 10, 10, min_factor=0.1) == pytest.approx(0.1)
    assert f("linear", 5, 10, end_factor=0.5) == pytest.approx(0.75)
    assert f("exponential", 2, 10, gamma=0.5) == pytest.approx(0.25)


def test_warmup_ramps_linearly_then_the_schedule_runs_over_the_rest():
    spec = Spec("cosine", {"warmup": 3})
    factors = [schedule_factor(spec, t, 7) for t in range(7)]
    assert factors[:3] == pytest.approx([0.25, 0.5, 0.75])
    # after warm-up: cosine over the remaining 4 units, starting at 1
    assert factors[3:] == pytest.approx([(1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)])


def test_each_clock_counts_what_it_says():
    spec = lambda clock: Spec("linear", {"clock": clock})  # noqa: E731
    at = {"epoch": 1, "epochs": 4, "step": 6, "steps": 8}
    assert Recipe(spec("round"), round=3, rounds=4).factor(**at) == pytest.approx(0.5)
    assert Recipe(spec("epoch"), round=3, rounds=4).factor(**at) == pytest.approx(0.75)
    assert Recipe(spec("step"), round=3, rounds=4).factor(**at) == pytest.approx(0.25)


def test_a_constant_rate_is_never_touched_and_a_schedule_scales_each_groups_own_rate():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(
        [{"params": [model.weight], "lr": 0.1}, {"params": [model.bias], "lr": 0.02}]
    )
    assert Recipe().set_lr(opt, epoch=0, epochs=1, step=0, steps=1) is None
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.02]
    assert "initial_lr" not in opt.param_groups[0]
    half = Recipe(Spec("linear"), round=2, rounds=2)  # round clock: t=1 of 2 -> 0.5
    assert half.set_lr(opt) == pytest.approx(0.05)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.01])
    half.set_lr(opt)  # idempotent: scales the initial rate, not the current one
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.01])


# --- the training loops ------------------------------------------------------------------


def _data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(1)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_train_supervised_follows_a_step_clock_and_reports_the_last_rate():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    opt = make_optimizer("sgd", model, 0.1)
    x, y = _data(40)
    recipe = Recipe(Spec("linear", {"clock": "step"}))
    seen: list[float] = []
    opt.register_step_pre_hook(lambda o, *_: seen.append(o.param_groups[0]["lr"]))
    out = train_supervised(
        model, opt, x, y, epochs=2, batch_size=10, generator=_gen(), recipe=recipe
    )
    assert seen == pytest.approx([0.1 * (1 - k / 8) for k in range(8)])
    assert out["lr"] == pytest.approx(seen[-1])
    plain = train_supervised(model, opt, x, y, epochs=1, batch_size=10, generator=_gen())
    assert "lr" not in plain  # no schedule, no rate in the metrics


def test_distill_follows_an_epoch_clock_within_its_max_steps():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    opt = make_optimizer("adam", model, 0.01)
    x, _ = _data(30)
    kd = KDTargets(x, torch.randn(30, 3, generator=_gen(2)), nn.MSELoss())
    seen: list[float] = []
    opt.register_step_pre_hook(lambda o, *_: seen.append(o.param_groups[0]["lr"]))
    recipe = Recipe(Spec("step", {"clock": "epoch", "step_size": 1, "gamma": 0.5}))
    distill(model, opt, kd, epochs=3, batch_size=10, generator=_gen(), recipe=recipe)
    assert seen == pytest.approx([0.01] * 3 + [0.005] * 3 + [0.0025] * 3)


def test_gradient_clipping_bounds_each_step():
    torch.manual_seed(0)
    x, y = _data(20)
    x = x * 1000  # huge gradients
    for clip, bound in ((0.0, None), (0.01, 0.01)):
        model = nn.Linear(5, 3)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        opt = make_optimizer("sgd", model, 1.0)
        recipe = Recipe(grad_clip=clip)
        train_supervised(model, opt, x, y, epochs=1, batch_size=20, generator=_gen(), recipe=recipe)
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        step = float((after - before).norm())
        if bound is None:
            assert step > 1.0
        else:
            assert step <= bound * (1 + 1e-5)  # plain SGD at rate 1: the step is the gradient


def test_label_smoothing_is_in_the_cross_entropy_term():
    torch.manual_seed(0)
    x, y = _data(20)
    model = nn.Linear(5, 3)
    opt = make_optimizer("sgd", model, 0.0)  # rate 0: the loss is that of the same model
    plain = train_supervised(model, opt, x, y, epochs=1, batch_size=20, generator=_gen())
    smooth = train_supervised(
        model,
        opt,
        x,
        y,
        epochs=1,
        batch_size=20,
        generator=_gen(),
        recipe=Recipe(label_smoothing=0.2),
    )
    with torch.no_grad():
        want = F.cross_entropy(model(x), y, label_smoothing=0.2).item()
    assert smooth["ce"] == pytest.approx(want, rel=1e-5)
    assert smooth["ce"] != pytest.approx(plain["ce"])


def test_optimizer_settings_reach_the_optimizer():
    model = nn.Linear(3, 2)
    spec = Spec("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 5e-4})
    opt = make_optimizer(spec, model, 0.1)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (
        0.1,
        0.9,
        True,
        5e-4,
    )
    adamw = make_optimizer(Spec("adamw", {"betas": [0.9, 0.99]}), model, 1e-3)
    assert tuple(adamw.param_groups[0]["betas"]) == (0.9, 0.99)


# --- config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field", "says"),
    [
        (["clients.optimizer.momentun=0.9"], "clients.optimizer.momentun", "unknown parameter"),
        (["clients.optimizer=sgd", "clients.optimizer.nesterov=true"], "clients.optimizer", "Nes"),
        (["server.optimizer=lbfgs"], "server.optimizer", "unknown optimizer"),
        (["clients.optimizer.lr=0.1"], "clients.optimizer.lr", "clients.lr"),
        (["clients.schedule=cosine", "clients.schedule.clock=day"], "clients.schedule.clock", ""),
        (["server.schedule=step", "server.schedule.step_size=0"], "server.schedule.step_size", ""),
        (["clients.schedule=step", "clients.schedule.gama=0.5"], "clients.schedule.gama", "warmup"),
        (["clients.schedule.warmup=-1"], "clients.schedule.warmup", ">= 0"),
        (["clients.schedule=cosine", 'clients.schedule.min_factor="x"'], "", "float"),
        (["clients.schedule=sawtooth"], "", "sawtooth"),
        (["privacy.mechanism=dpsgd", "clients.grad_clip=1"], "clients.grad_clip", "max_grad_norm"),
    ],
)
def test_recipe_errors_name_the_field(overrides, field, says):
    with pytest.raises(ConfigError) as err:
        check_recipes(load_config(None, overrides))
    if field:
        assert err.value.field == field
    assert says in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["clients.label_smoothing=1.0"], "clients.label_smoothing"),
        (["clients.grad_clip=-1"], "clients.grad_clip"),
        (["server.grad_clip=-1"], "server.grad_clip"),
        (["server.label_smoothing=0.1"], "server.label_smoothing"),  # the server only distills
    ],
)
def test_recipe_numbers_are_checked_when_the_config_loads(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert err.value.field == field


def test_a_plain_optimizer_name_still_loads_and_round_trips():
    cfg = load_config(None, ["clients.optimizer=sgd"])
    assert cfg.clients.optimizer == Spec("sgd")
    assert load_config(cfg.to_dict()) == cfg


# --- resume --------------------------------------------------------------------------------

RECIPE = [
    "rounds=4",
    "privacy.audit=false",
    'clients.optimizer={name="sgd", momentum=0.9, nesterov=true, weight_decay=0.0005}',
    "clients.lr=0.05",
    'clients.schedule={name="cosine", clock="round", warmup=1}',
    "clients.grad_clip=5.0",
    "clients.label_smoothing=0.1",
    'server.schedule={name="cosine", clock="step"}',
]


def test_a_resumed_run_gets_the_same_rates_as_the_straight_one(small_config, tmp_path):
    cfg = load_config(small_config, RECIPE)
    data, path = prepare_federated_data(cfg)
    straight = Federation(cfg, data).run(InlineTransport(cfg, str(path)))
    rates = [r.clients[0].metrics["train_lr"] for r in straight]
    base = 0.05
    assert rates == pytest.approx(
        [base * 0.5] + [base * (1 + math.cos(math.pi * k / 3)) / 2 for k in range(3)]
    )

    store = DiskStateStore(tmp_path / "clients")
    stop = threading.Event()
    first = Federation(cfg, data)  # the same config, stopped after round 2 (as if killed)
    with pytest.raises(Interrupted):
        first.run(
            InlineTransport(cfg, str(path), store),
            lambda r: stop.set() if r.round == 2 else None,
            stop=stop,
        )
    save_checkpoint(tmp_path, first)
    resumed = Federation(cfg, data)
    assert restore_checkpoint(tmp_path, resumed) == 2
    records = resumed.run(InlineTransport(cfg, str(path), store))
    assert _numbers(records) == _numbers(straight)
    assert [r.clients[0].metrics["train_lr"] for r in records] == rates


# --- mixed precision ---------------------------------------------------------------------


def test_amp_runs_training_forward_passes_in_bfloat16_and_keeps_float32_weights():
    torch.manual_seed(0)
    dtypes: list[torch.dtype] = []
    model = nn.Linear(5, 3)
    model.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    opt = make_optimizer("sgd", model, 0.1)
    x, y = _data(20)
    kd = KDTargets(x, torch.randn(20, 3, generator=_gen(3)), nn.MSELoss())
    out = train_supervised(
        model, opt, x, y, epochs=1, batch_size=10, generator=_gen(), recipe=Recipe(amp=True)
    )
    distill(model, opt, kd, epochs=1, batch_size=10, generator=_gen(), recipe=Recipe(amp=True))
    assert dtypes == [torch.bfloat16] * 4
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert math.isfinite(out["loss"])
    train_supervised(model, opt, x, y, epochs=1, batch_size=10, generator=_gen())
    assert dtypes[-1] == torch.float32  # off by default


def test_optimizer_settings_are_type_checked_against_torchs_own_hints():
    """torch annotates e.g. weight_decay as float | Tensor: a float passes, a string not."""
    ok = 'clients.optimizer={name="sgd", momentum=0.9, weight_decay=0.0005, nesterov=true}'
    check_recipes(load_config(None, [ok]))
    with pytest.raises(ConfigError) as err:
        check_recipes(load_config(None, ['clients.optimizer={name="sgd", weight_decay="x"}']))
    assert err.value.field == "clients.optimizer.weight_decay"
