"""The strategies a config selects, built and checked against it: the server
strategy, each client's strategy (``clients.strategies`` ranges) and the teacher
features the clients' configured losses read. The runtime calls these; a strategy
author does not need them."""

from __future__ import annotations

from dataclasses import fields

from fedkd.assignment import client_losses
from fedkd.config import Config, ConfigError, parse_id_range
from fedkd.kd import build_loss
from fedkd.strategy import (
    CLIENT_STRATEGIES,
    SERVER_STRATEGIES,
    ClientStrategy,
    ServerStrategy,
    make_params,
)


def server_strategy(config: Config) -> ServerStrategy:
    """The configured server strategy, with its params and config requirements validated."""
    cls = SERVER_STRATEGIES.get(config.strategy.name)
    strategy = cls(make_params(cls.Params, config.strategy.params, "strategy"))
    cls.check_config(config)
    _refuse_own_loss_lists(config)
    _check_teacher_reads(config, strategy)
    return strategy


def _refuse_own_loss_lists(config: Config) -> None:
    """Refuse, before the run, a configured ``strategy.losses`` for a client whose strategy
    trains with a step loss of its own (``ClientStrategy.own_loss``; the node would refuse
    it in the first round), naming the list's config path."""
    for cid in range(config.clients.count):
        configured = client_losses(config, cid)
        if configured is None:
            continue
        cls = _client_choice(config, cid)[0]  # the class only: no params built
        if cls.own_loss is not None:
            raise ConfigError(
                configured[1],
                f"{cls.__name__} trains with its own loss ({cls.own_loss}) and would ignore "
                "a configured loss list; remove it",
            )


def _loss_needs(config: Config) -> dict[str, frozenset[str]]:
    """Every configured loss list's needs, by its config path."""
    out: dict[str, frozenset[str]] = {}
    for cid in range(config.clients.count):
        configured = client_losses(config, cid)
        if configured is not None and configured[1] not in out:
            out[configured[1]] = build_loss(*configured).needs
    return out


def teacher_reads(config: Config) -> frozenset[str]:
    """The ``teacher.<feature>`` keys any client's configured loss reads."""
    return frozenset(
        need.split(".", 1)[1]
        for needs in _loss_needs(config).values()
        for need in needs
        if need.startswith("teacher.")
    )


def _check_teacher_reads(config: Config, strategy: ServerStrategy) -> None:
    """Refuse, before the run, a configured loss that reads a teacher feature the
    strategy's targets never carry (it would fail in round 2)."""
    offered = strategy.target_features()
    for path, needs in _loss_needs(config).items():
        for need in sorted(needs):
            if need.startswith("teacher.") and need.split(".", 1)[1] not in offered:
                raise ConfigError(
                    path,
                    f"a loss reads {need}, which {config.strategy.name}'s targets do not "
                    f"carry (they carry: {', '.join(sorted(offered))})",
                )


def client_strategy(config: Config, cid: int) -> ClientStrategy:
    """Client ``cid``'s strategy: an explicit ``clients.strategies`` range, else the default.

    An explicit entry whose ``Params`` class is the server strategy's takes the
    ``[strategy]`` parameters as defaults for the ones it does not set.
    """
    cls, params, path = _client_choice(config, cid)
    return cls(make_params(cls.Params, params, path))


def _client_choice(config: Config, cid: int) -> tuple[type[ClientStrategy], dict, str]:
    """Client ``cid``'s strategy class, its params (not yet validated) and their path."""
    server_cls = SERVER_STRATEGIES.get(config.strategy.name)
    for key, spec in config.clients.strategies.items():
        if cid in parse_id_range(key, config.clients.count, "clients.strategies"):
            cls = CLIENT_STRATEGIES.get(spec.name)
            params = spec.params
            if cls.Params is server_cls.Params:  # same family: [strategy] params are defaults
                params = {**config.strategy.params, **spec.params}
            return cls, params, f"clients.strategies.{key}"
    cls = server_cls.client_strategy
    params = config.strategy.params
    if cls.Params is not server_cls.Params:  # e.g. feddf's clients run fedavg's client side
        names = {f.name for f in fields(cls.Params)}
        params = {k: v for k, v in params.items() if k in names}
    return cls, params, "strategy"
