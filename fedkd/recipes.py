"""Training recipes: the optimizer and its settings, learning-rate schedules, gradient
clipping and label smoothing, for the clients, the server's teacher and the baseline.

``[clients]`` and ``[server]`` each carry one recipe (the local-only baseline trains
as the clients do)::

    optimizer = { name = "sgd", momentum = 0.9, nesterov = true, weight_decay = 5e-4 }
    lr = 0.1
    schedule = { name = "cosine", clock = "round", warmup = 5 }
    grad_clip = 5.0          # max global L2 norm of the gradient per step; 0 = off
    label_smoothing = 0.1    # clients only: on the cross-entropy term, never on distillation

**Schedules** multiply each parameter group's initial rate by a factor of a clock
``t`` out of ``total`` (``t`` from 0):

- ``clock = "round"`` (the default): ``t = round - 1`` of ``rounds``: the rate is
  constant within a round and changes across rounds (federated time);
- ``clock = "epoch"``: ``t`` = the epoch within one training call (one client's local
  training in a round, one distillation of the teacher) of that call's epochs;
- ``clock = "step"``: ``t`` = the optimizer step within one training call, of its steps.

The epoch and step clocks restart with every call, e.g. FedDF's cosine annealing over
each round's server distillation. ``warmup = w`` ramps the rate linearly over the first
``w`` clock units (factors ``1/(w+1), ..., w/(w+1)``), then the schedule runs over the
remaining ``total - w``. Schedules: ``constant``, ``step`` (``step_size``, ``gamma``),
``multistep`` (``milestones``, ``gamma``), ``exponential`` (``gamma``), ``cosine``
(``min_factor``), ``linear`` (``end_factor``); register more with
``@SCHEDULES.register(name)`` (a function ``(t, total, **params) -> factor``).

The rate is recomputed from the clock before every step, so a schedule holds no state
of its own: a resumed run (and a client that skipped rounds) gets exactly the rate
its round calls for. A constant schedule never touches the optimizer's rates, so
strategies that build optimizers with rates of their own keep them. (We do not use
``torch.optim.lr_scheduler``: its schedulers count their own ``step()`` calls, which
would have to be saved beside each optimizer and would drift for clients that sit
out rounds; the closed forms here are what those schedulers compute.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedkd.config import ConfigError, Spec, check_plugin_params
from fedkd.registry import Registry, UnknownNameError, bind_params

if TYPE_CHECKING:
    from fedkd.config import ClientsConfig, Config, ServerConfig

ScheduleFn = Callable[..., float]
SCHEDULES: Registry[ScheduleFn] = Registry("schedule", check=callable, group="fedkd.schedules")

#: what a schedule's ``t`` counts (see the module doc)
CLOCKS = ("round", "epoch", "step")
#: keys of a schedule spec that fedkd handles for every schedule
COMMON_KEYS = ("clock", "warmup")
_RUNTIME = ("t", "total")


OPTIMIZERS: Registry[type[torch.optim.Optimizer]] = Registry(
    "optimizer",
    check=lambda c: isinstance(c, type) and issubclass(c, torch.optim.Optimizer),
    group="fedkd.optimizers",
)
OPTIMIZERS.register("adam")(torch.optim.Adam)
OPTIMIZERS.register("adamw")(torch.optim.AdamW)
OPTIMIZERS.register("sgd")(torch.optim.SGD)


def make_optimizer(spec: str | Spec, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Optimizer ``spec`` (a registered name, or a :class:`Spec` with its settings such as
    ``momentum``, ``nesterov``, ``weight_decay``, ``betas``) over ``model``, at rate ``lr``."""
    spec = Spec.parse(spec)
    return OPTIMIZERS.get(spec.name)(model.parameters(), lr=lr, **spec.params)


@SCHEDULES.register("constant")
def constant(t: float, total: float) -> float:
    """The initial rate throughout."""
    return 1.0


@SCHEDULES.register("step")
def step(t: float, total: float, step_size: int = 30, gamma: float = 0.1) -> float:
    """Times ``gamma`` every ``step_size`` clock units."""
    return gamma ** (t // step_size)


@SCHEDULES.register("multistep")
def multistep(t: float, total: float, milestones: list[int] = (), gamma: float = 0.1) -> float:  # type: ignore[assignment]
    """Times ``gamma`` at each milestone (clock units, counted after any warm-up)."""
    return gamma ** sum(1 for m in milestones if t >= m)


@SCHEDULES.register("exponential")
def exponential(t: float, total: float, gamma: float = 0.99) -> float:
    """Times ``gamma`` every clock unit."""
    return gamma**t


@SCHEDULES.register("cosine")
def cosine(t: float, total: float, min_factor: float = 0.0) -> float:
    """Half a cosine from 1 down to ``min_factor`` over ``total`` (SGDR without restarts,
    Loshchilov & Hutter 2017; what ``CosineAnnealingLR(T_max=total)`` computes)."""
    if total <= 0:
        return 1.0
    return min_factor + (1 - min_factor) * (1 + math.cos(math.pi * min(t, total) / total)) / 2


@SCHEDULES.register("linear")
def linear(t: float, total: float, end_factor: float = 0.0) -> float:
    """Straight from 1 down to ``end_factor`` over ``total``."""
    if total <= 0:
        return 1.0
    return 1 + (end_factor - 1) * min(t, total) / total


@dataclass(frozen=True)
class Recipe:
    """How one side trains in one round: schedule, clipping, label smoothing.

    ``round`` and ``rounds`` place the round clock; the training loops supply the
    epoch and step within their call.
    """

    schedule: Spec = field(default_factory=lambda: Spec("constant"))
    grad_clip: float = 0.0
    label_smoothing: float = 0.0
    round: int = 1
    rounds: int = 1
    amp: bool = False  # training forward passes under bfloat16 autocast

    @classmethod
    def of(
        cls, settings: ClientsConfig | ServerConfig, round: int, rounds: int, amp: bool = False
    ) -> Recipe:
        """The recipe of ``[clients]`` or ``[server]`` for round ``round`` of ``rounds``."""
        smoothing = getattr(settings, "label_smoothing", 0.0)  # the server only distills
        return cls(settings.schedule, settings.grad_clip, smoothing, round, rounds, amp)

    def autocast(self, device: torch.device) -> torch.autocast:
        """The context of a training forward pass: bfloat16 autocast on ``device`` when
        ``amp`` is on (bfloat16 keeps float32's range: no loss scaler, no state)."""
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=self.amp)

    @property
    def clock(self) -> str:
        return str(self.schedule.params.get("clock", "round"))

    @property
    def scheduled(self) -> bool:
        """False for a constant rate without warm-up (then rates are never touched)."""
        return self.schedule.name != "constant" or int(self.schedule.params.get("warmup", 0)) > 0

    def factor(self, *, epoch: int = 0, epochs: int = 1, step: int = 0, steps: int = 1) -> float:
        """The rate's factor at ``epoch`` of ``epochs`` and ``step`` of ``steps`` of the
        current call (and this recipe's round)."""
        if self.clock == "round":
            t, total = self.round - 1, self.rounds
        elif self.clock == "epoch":
            t, total = epoch, epochs
        else:
            t, total = step, steps
        return schedule_factor(self.schedule, t, total)

    def set_lr(self, optimizer: torch.optim.Optimizer, **clock: int) -> float | None:
        """Set every parameter group's rate to its initial rate times :meth:`factor`;
        returns the first group's new rate (None, and nothing changed, when unscheduled)."""
        if not self.scheduled:
            return None
        f = self.factor(**clock)
        for group in optimizer.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * f
        return float(optimizer.param_groups[0]["lr"])

    def clip(self, model: nn.Module) -> None:
        """Clip the gradient's global L2 norm to ``grad_clip`` (if set)."""
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)


def schedule_factor(spec: Spec, t: float, total: float) -> float:
    """The factor of schedule ``spec`` at clock ``t`` of ``total``, warm-up included."""
    params = {k: v for k, v in spec.params.items() if k not in COMMON_KEYS}
    warmup = int(spec.params.get("warmup", 0))
    if t < warmup:
        return (t + 1) / (warmup + 1)
    return float(SCHEDULES.get(spec.name)(t - warmup, max(total - warmup, 0), **params))


def check_schedule(spec: Spec, path: str) -> None:
    """Name, clock, warm-up and parameters of a schedule; errors name ``path``."""
    try:
        fn = SCHEDULES.get(spec.name)
    except UnknownNameError as err:
        raise ConfigError(path, str(err)) from None
    clock = spec.params.get("clock", "round")
    if clock not in CLOCKS:
        raise ConfigError(f"{path}.clock", f"must be one of {', '.join(CLOCKS)}; got {clock!r}")
    warmup = spec.params.get("warmup", 0)
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ConfigError(f"{path}.warmup", f"must be a whole number >= 0, got {warmup!r}")
    params = {k: v for k, v in spec.params.items() if k not in COMMON_KEYS}
    try:
        bind_params(fn, params, path, _RUNTIME)
    except ConfigError as err:  # name the common keys among the valid ones too
        raise ConfigError(err.field, f"{err.reason}, {', '.join(COMMON_KEYS)}") from None
    check_plugin_params(fn, params, path, _RUNTIME)
    if spec.name == "step" and params.get("step_size", 1) < 1:
        raise ConfigError(f"{path}.step_size", f"must be >= 1, got {params['step_size']!r}")
    try:
        schedule_factor(spec, 0, 1)
    except (TypeError, ValueError, ZeroDivisionError) as err:
        raise ConfigError(path, f"{spec} cannot be evaluated: {err}") from None


def check_optimizer(spec: Spec, path: str) -> None:
    """The optimizer's name and its parameters (``lr`` is ``<side>.lr``)."""
    if spec.name not in OPTIMIZERS:
        raise ConfigError(path, f"unknown optimizer {spec.name!r}; known: {', '.join(OPTIMIZERS)}")
    cls = OPTIMIZERS.get(spec.name)
    if "lr" in spec.params:
        side = path.rsplit(".", 1)[0]
        raise ConfigError(f"{path}.lr", f"the rate is {side}.lr (set it there)")
    bind_params(cls, spec.params, path, ("params", "lr"))
    check_plugin_params(cls, spec.params, path, ("params",))
    try:  # the optimizer's own checks (e.g. nesterov needs momentum), on a dummy parameter
        cls([torch.nn.Parameter(torch.zeros(1))], lr=1e-3, **spec.params)
    except (ValueError, TypeError) as err:
        raise ConfigError(path, f"{spec}: {err}") from None


def check_recipes(config: Config) -> None:
    """The optimizers and schedules of ``[clients]`` and ``[server]``, before anything runs."""
    for side in ("clients", "server"):
        settings = getattr(config, side)
        check_optimizer(settings.optimizer, f"{side}.optimizer")
        check_schedule(settings.schedule, f"{side}.schedule")
    from fedkd.privacy.mechanism import mechanism_of

    mechanism_of(config).check_recipes(config)  # e.g. DP-SGD clips per sample itself
