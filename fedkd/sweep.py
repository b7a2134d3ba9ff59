"""``fedkd.run_many``: several experiments under one Flower simulation and one Ray start.

A comparison of eight strategies over five seeds is forty federations; run one by one,
each pays Ray's start and every worker's imports (10-20 s on a small machine). Here
every experiment's config is checked and its data built first, then the federations
run one after another on the same simulated clients, and each experiment is finished
(baselines, summary, plot; for a multi-seed one the statistics across its seeds) as
:func:`fedkd.run` would. Experiments whose engine settings differ (Ray arguments,
per-client resources: :func:`fedkd.flower.engine_key`) run under one start per
consecutive stretch that shares them.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedkd.config import Config, ConfigError, load_config
from fedkd.data import FederatedData
from fedkd.federation import Federation
from fedkd.results import Outcome, RunDirectory
from fedkd.run_steps import (
    Ending,
    RunResult,
    SeedsResult,
    finish,
    header,
    prepare,
    round_writer,
    say,
    write_seeds,
)
from fedkd.vectorize import start_notes

#: one experiment: a config (TOML path, dict, Config, or None for the quick start),
#: optionally with its ``field=value`` overrides
Experiment = str | Path | Mapping[str, Any] | Config | None | tuple[Any, Sequence[str]]

#: called with an experiment's index and result as soon as it is finished
OnResult = Callable[[int, "RunResult | SeedsResult"], None]


@dataclass
class _Part:
    """One federation of an experiment (the experiment itself, or one of its seeds)."""

    config: Config
    data: FederatedData
    data_path: Path
    out: RunDirectory
    job: Any  # fedkd.flower.FlowerJob


@dataclass
class _Plan:
    """An experiment, checked and with its folders made, ready to run."""

    index: int
    config: Config
    out: RunDirectory  # its run folder (the parent of its seeds' folders)
    parts: dict[int | None, _Part] = field(default_factory=dict)  # None: a one-seed run

    @property
    def multi_seed(self) -> bool:
        return None not in self.parts


def run_many(
    experiments: Sequence[Experiment],
    *,
    quiet: bool = False,
    on_result: OnResult | None = None,
    started: float | None = None,
) -> list[RunResult | SeedsResult]:
    """Run several experiments with one Ray start, each into its own run folder.

    Args:
        experiments: configs, or ``(config, overrides)`` pairs; a config with ``seeds``
            runs each seed, as :func:`fedkd.run` does.
        quiet: print nothing (results are still written to the run folders).
        on_result: called with ``(index, result)`` as soon as an experiment is finished
            (its baselines, summary and plot written), before the next one starts; e.g.
            to update a comparison table that survives a Ctrl-C. If it raises, the sweep
            stops there (the experiment then running is written as interrupted) and the
            exception is re-raised.
        started: wall-clock time the process started, for the start-up figure (it is
            counted in the first federation's time).

    Returns:
        One result per experiment, in order: a :class:`RunResult`, or a
        :class:`SeedsResult` for a multi-seed config. A run that failed does not stop
        the others; its result's ``exit_code`` is non-zero (nothing is raised for it).
        Ray failing to start fails every experiment of its start.

    Raises:
        ConfigError: a bad setting in any experiment, naming it, before anything runs.
        KeyboardInterrupt: Ctrl-C, after the experiment then running is written as
            interrupted (those finished before stay as they ended; one not reached has
            only its config, and ``fedkd resume`` on its folder runs it).

    Every experiment's data and server state are built before Ray starts (so a sweep
    of large datasets holds them all; experiments on the same data file share it).
    """
    t0 = time.time() if started is None else started
    configs = [_load(i, e, len(experiments)) for i, e in enumerate(experiments)]
    prepared = [_prepared(i, c, len(configs)) for i, c in enumerate(configs)]
    many = len(configs) > 1
    plans = [_plan(i, c, prepared[i], quiet, many) for i, c in enumerate(configs)]
    results: dict[int, RunResult | SeedsResult] = {}
    for group in _engine_groups(plans):
        interrupted = _run_group(group, results, quiet, on_result, t0)
        t0 = time.time()  # a later group's own Ray start is its first federation's
        if interrupted:
            raise KeyboardInterrupt(f"interrupted: {len(results)} of {len(plans)} finished")
    return [results[p.index] for p in plans]


def _load(index: int, experiment: Experiment, total: int) -> Config:
    config, overrides = experiment, ()
    if isinstance(experiment, tuple | list):  # (a list: the pair, as JSON gives it back)
        if len(experiment) != 2 or isinstance(experiment[1], str):
            where = f"experiment {index + 1} of {total}"
            raise ConfigError("", f"{where}: give a config or a (config, overrides) pair")
        config, overrides = experiment
    try:
        return load_config(config, list(overrides))
    except ConfigError as err:
        raise _naming(err, index, total, config) from None


def _naming(err: ConfigError, index: int, total: int, what: Any) -> ConfigError:
    """``err`` with the experiment it is about in front of its message."""
    name = what.name if isinstance(what, Config) else what
    where = f"experiment {index + 1} of {total}" + (f" ({name})" if name is not None else "")
    return ConfigError(err.field, f"{where}: {err.reason}")


def _prepared(index: int, cfg: Config, total: int) -> dict[int | None, tuple[Config, Any]]:
    """Each seed's config, checked, and its data (the key None: a run without seeds)."""
    seeds: list[int | None] = list(cfg.seeds) if cfg.seeds else [None]
    out: dict[int | None, tuple[Config, Any]] = {}
    for seed in seeds:
        c = cfg if seed is None else dataclasses.replace(cfg, seed=seed, seeds=[])
        try:
            out[seed] = (c, prepare(c))
        except ConfigError as err:
            raise _naming(err, index, total, cfg.name) from None
    return out


def _plan(
    index: int, cfg: Config, prepared: Mapping[int | None, Any], quiet: bool, many: bool
) -> _Plan:
    """Make the experiment's run folder(s) and its federations' jobs; print its header.
    ``many``: progress lines name the experiment."""
    from fedkd.flower import FlowerJob

    out = RunDirectory.create(cfg)
    plan = _Plan(index, cfg, out)
    say(quiet, header(cfg, out.path))
    for seed, (c, (data, data_path)) in prepared.items():
        part_out = out if seed is None else out.child(f"seed-{seed}", c)
        if seed is None or seed == cfg.seeds[0]:
            for note in start_notes(c, str(data_path)):
                say(quiet, f"simulation.vectorize: {note}")
        federation = Federation(c, data)
        names = [f"[{index + 1}] {cfg.name}"] if many else []
        names += [f"seed {seed}"] if seed is not None else []
        prefix = " ".join(names) + ": " if names else ""
        writer = round_writer(c, part_out, federation, quiet, prefix)
        job = FlowerJob(
            federation, str(data_path), str(part_out.clients_dir), writer, part_out.log_error
        )
        plan.parts[seed] = _Part(c, data, data_path, part_out, job)
    return plan


def _engine_groups(plans: Sequence[_Plan]) -> list[list[_Plan]]:
    """Consecutive experiments that share the engine (one Ray start each stretch)."""
    from fedkd.flower import engine_key

    groups: list[list[_Plan]] = []
    last = None
    for plan in plans:
        key = engine_key(plan.config)
        if key != last:
            groups.append([])
            last = key
        groups[-1].append(plan)
    return groups


def _run_group(
    plans: Sequence[_Plan],
    results: dict[int, RunResult | SeedsResult],
    quiet: bool,
    on_result: OnResult | None,
    t0: float,
) -> bool:
    """Run ``plans``' federations under one simulation, finishing each experiment as
    soon as its federations have ended (in the server loop's thread, before the next
    one starts); the rest (Ctrl-C, Ray failing) after the simulation. True when an
    experiment was interrupted or not reached."""
    from fedkd.flower import ctrl_c_stops, run_flower_jobs

    jobs = [part.job for plan in plans for part in plan.parts.values()]
    stop = threading.Event()
    shared = Ending()  # an ending of the whole simulation (Ctrl-C, Ray failing to start)
    raised: list[BaseException] = []  # what on_result raised: no more runs, re-raised below
    finished: set[int] = set()

    def finish_plan(plan: _Plan) -> None:
        finished.add(plan.index)
        runs: dict[int | None, RunResult] = {}
        for seed, part in plan.parts.items():
            box = part.job.box
            if "rounds_started" not in box:
                continue  # never reached: "not run"
            ended = Ending()
            ended.interrupted, ended.error = shared.interrupted, shared.error
            start = t0 if part.job is jobs[0] else box["rounds_started"]  # shared start-up
            runs[seed], _ = finish(
                part.config, part.data, part.data_path, part.out, part.job, ended, stop,
                quiet, start, one_of_seeds=plan.multi_seed,
            )  # fmt: skip
        if not runs:
            return  # no federation of it started
        if plan.multi_seed:
            seeds = {s: r for s, r in runs.items() if s is not None}
            every = {s: None for s in plan.config.seeds}
            result: RunResult | SeedsResult = write_seeds(
                plan.config, plan.out, seeds, every, quiet
            )
        else:
            result = runs[None]
        results[plan.index] = result
        if on_result is not None and not raised:
            try:
                on_result(plan.index, result)
            except BaseException as err:  # (e.g. SystemExit) ends the sweep, finished as is
                raised.append(err)
                stop.set()

    def when_ended(plan: _Plan) -> Callable[[], None]:
        def end() -> None:
            if all("rounds_ended" in part.job.box for part in plan.parts.values()):
                finish_plan(plan)

        return end

    for plan in plans:
        for part in plan.parts.values():
            part.job.on_end = when_ended(plan)
    with ctrl_c_stops(stop):
        try:
            run_flower_jobs(jobs, stop=stop, keep_going=True)
        except BaseException as err:
            for plan in plans:
                if plan.index not in finished:
                    shared.note(err, plan.out)
        for plan in plans:
            if plan.index not in finished:
                finish_plan(plan)
    if raised:
        raise raised[0]
    return any(
        p.index not in results or results[p.index].summary.outcome is Outcome.INTERRUPTED
        for p in plans
    )
