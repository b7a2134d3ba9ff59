"""The steps every way of running an experiment shares.

:func:`fedkd.run`, :func:`fedkd.run_many`, ``fedkd resume`` and the Flower app
(``flwr run .``) all go the same way: every check before Ray starts (:func:`prepare`),
a run folder written round by round (:func:`round_writer`), then, however the
federated part ended (:class:`Ending`), the baselines, the summary, its table and the
plot (:func:`finish`); for a multi-seed run, the statistics across seeds
(:func:`write_seeds`). What they return: :class:`RunResult`, :class:`SeedsResult`,
and :class:`RunError` for a run that failed.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedkd.assignment import resolve_device, sample_clients, student_spec
from fedkd.config import Config, ConfigError, Spec
from fedkd.contracts import one_line
from fedkd.data import FederatedData, prepare_federated_data
from fedkd.data.prepare import check_data_config
from fedkd.federation import Federation, Interrupted, RunFailed
from fedkd.models import build_model, check_model_spec
from fedkd.privacy.accounting import PrivacyLedger
from fedkd.privacy.mechanism import mechanism_of
from fedkd.profiling import profile_model
from fedkd.recipes import check_recipes
from fedkd.results import (
    RoundRecord,
    RunDirectory,
    RunSummary,
    plot_accuracy,
    progress_line,
    summary_table,
)
from fedkd.results.rundir import atomic_write_text
from fedkd.results.seeds import SeedsSummary, plot_seeds, write_csv
from fedkd.results.summary import outcome_of, summarize
from fedkd.selection import client_strategy, server_strategy

log = logging.getLogger("fedkd")


@dataclass
class RunResult:
    """What :func:`run` returns: the run directory, every round, and the summary."""

    config: Config
    directory: Path
    rounds: list[RoundRecord]
    summary: RunSummary
    baseline: list[RoundRecord] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return self.summary.exit_code


class RunError(RuntimeError):
    """The run failed; ``result`` holds what it wrote (finished rounds, the summary)."""

    def __init__(self, result: RunResult) -> None:
        super().__init__(result.summary.status)
        self.result = result


def check_config(config: Config) -> None:
    """Resolve every plug-in name and parameter; raises ConfigError naming the field."""
    check_data_config(config)
    for i, spec in enumerate(config.clients.models):
        check_model_spec(spec, f"clients.models[{i}]")
    for key, spec in config.clients.model_groups.items():
        check_model_spec(spec, f"clients.model_groups.{key}")
    check_model_spec(config.server.teacher, "server.teacher")
    check_recipes(config)
    _check_baselines(config)
    strategy = server_strategy(config)
    for cid in range(config.clients.count):
        client_strategy(config, cid)
    from fedkd.aggregators import make_aggregator

    make_aggregator(config.server.aggregator)
    if config.server.aggregator.name != "mean" and not strategy.uses_aggregator:
        raise ConfigError(
            "server.aggregator",
            f"strategy {config.strategy.name!r} does not combine logits or soft labels "
            f"through server.aggregator, so {config.server.aggregator.name!r} would not apply; "
            "use a strategy that does (kd, fedmd, feddf, dsfl, cfd) or aggregator = 'mean'",
        )
    if config.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device", "'cuda' but this machine has no usable GPU; use 'auto'")
    check_privacy_config(config, strategy)


def check_privacy_config(config: Config, strategy: Any) -> None:
    """Mechanism and strategy must fit together; raises ConfigError naming the field."""
    mechanism = mechanism_of(config)
    if not mechanism.active:
        return
    if strategy.own_mechanism is not None:
        raise ConfigError(
            "privacy.mechanism",
            f"strategy {config.strategy.name!r} is its own DP mechanism; set mechanism = none",
        )
    mechanism.check_config(config, strategy)


def say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, flush=True)


def _profiles(config: Config, data: FederatedData, uses_teacher: bool) -> dict[str, dict[str, Any]]:
    """Size and cost of every model the run built (the teacher only where the strategy
    has one: an unused ``server.teacher`` need not fit the data)."""
    specs: dict[str, Spec] = {}
    if uses_teacher:
        specs[str(config.server.teacher)] = config.server.teacher
    for cid in range(config.clients.count):
        spec = student_spec(config, cid)
        specs.setdefault(str(spec), spec)
    return {
        name: profile_model(
            build_model(spec, data.input_shape, data.num_classes, 0), data.input_shape
        )
        for name, spec in specs.items()
    }


def prepare(cfg: Config) -> tuple[FederatedData, Path]:
    """Every check that can run before Ray starts, and the data."""
    check_config(cfg)
    data, data_path = prepare_federated_data(cfg)
    PrivacyLedger(cfg, data.part_sizes).check_start(sample_clients(cfg, 1))
    from fedkd.privacy.preflight import preflight

    mechanism_of(cfg).check_data(cfg, data)  # e.g. students DP-SGD cannot train
    preflight(cfg, data)  # no client strategy may train in the clear under DP-SGD
    return data, data_path


def header(cfg: Config, path: Path) -> str:
    """The run's first line: what runs, on what, and where the results go."""
    seeds = f", seeds {list(cfg.seeds)}" if cfg.seeds else ""
    return (
        f"fedkd: {cfg.name}: {cfg.clients.count} clients, {cfg.rounds} rounds, strategy "
        f"{cfg.strategy}{seeds}{_device_note(cfg)}; results in {path}"
    )


def _device_note(cfg: Config) -> str:
    """``, on cuda with bfloat16 autocast``: said when not the plain CPU default."""

    device = resolve_device(cfg)
    if device.type == "cpu" and not cfg.amp:
        return ""
    return f", on {device.type}" + (" with bfloat16 autocast (amp)" if cfg.amp else "")


@dataclass
class SeedsResult:
    """What :func:`run` returns for a multi-seed config: every seed's result and the
    statistics across them (also in the run folder's ``summary.json``)."""

    config: Config
    directory: Path
    runs: dict[int, RunResult]
    summary: SeedsSummary

    @property
    def exit_code(self) -> int:
        return self.summary.exit_code


def write_seeds(
    cfg: Config,
    parent: RunDirectory,
    results: dict[int, RunResult],
    seeds: Mapping[int, Any],
    quiet: bool,
) -> SeedsResult:
    """The statistics across seeds: summary.json/.txt, seeds.csv, accuracy.png."""
    summary = SeedsSummary.of(
        cfg.name, {seed: results[seed].summary if seed in results else None for seed in seeds}
    )
    atomic_write_text(parent.path / "summary.json", json.dumps(summary.to_json(), indent=2))
    table = summary.table()
    atomic_write_text(parent.path / "summary.txt", table)
    write_csv(parent.path / "seeds.csv", {s: r.summary for s, r in results.items()})
    if results:
        curves = {s: (r.rounds, r.baseline) for s, r in results.items()}
        title = f"{cfg.name}: {cfg.strategy} on {cfg.data.dataset}"
        plot_seeds(curves, parent.path / "accuracy.png", title)
    say(quiet, "\n" + table + f"results: {parent.path}")
    sys.stdout.flush()
    return SeedsResult(cfg, parent.path, results, summary)


def _run_baseline(
    cfg: Config,
    data: FederatedData,
    data_path: Path,
    out: RunDirectory,
    stop: threading.Event,
    name: str,
    on_round: Callable[[RoundRecord], None],
) -> None:
    """Baseline ``name`` (:mod:`fedkd.baselines`), each round passed to ``on_round`` and
    then appended to its file; Ctrl-C (``stop``) ends it between rounds."""
    from fedkd.baselines import LABELS, baseline_file, run_baseline

    file = baseline_file(name)

    def keep(r: RoundRecord) -> None:
        on_round(r)
        out.append_round(file, r)

    def log(where: str, message: str, trace: str | None) -> None:
        out.log_error(f"{LABELS[name]} baseline, {where}", message, trace)

    try:
        run_baseline(name, cfg, data, str(data_path), stop, keep, log)
    except RunFailed as err:
        raise RunFailed(f"{LABELS[name]} baseline: {err}") from err.__cause__


def _check_baselines(config: Config) -> None:
    """Each strategy baseline's own config checks (e.g. transfer needs public labels,
    fedavg one architecture), as errors on ``baseline``."""
    from fedkd.baselines import check_baseline

    for name in _baselines_to_run(config):
        try:
            check_baseline(config, name)
        except ConfigError as err:
            raise ConfigError("baseline", f"the {name} baseline cannot run: {err}") from None


def _baselines_to_run(cfg: Config) -> list[str]:
    """``baseline``'s names, without the run's own strategy (local-only of a local run)."""
    return [b for b in cfg.baseline if b != cfg.strategy.name]


class Ending:
    """How the federated part of a run ended: interrupted, or with an error message."""

    def __init__(self) -> None:
        self.interrupted = False
        self.error: str | None = None

    def note(self, err: BaseException, out: RunDirectory) -> None:
        """Record ``err`` (re-raised if it is not a run's ending, e.g. SystemExit)."""
        if isinstance(err, KeyboardInterrupt | Interrupted):
            self.interrupted = True
        elif isinstance(err, RunFailed):  # the server hook's traceback, if one raised
            self.error = str(err)
            cause = err.__cause__
            trace = "".join(traceback.format_exception(cause)) if cause else None
            out.log_error("run", self.error, trace)
        elif isinstance(err, Exception):
            self.error = one_line(err)
            out.log_error("run", self.error, "".join(traceback.format_exception(err)))
        else:
            raise err


def round_writer(
    cfg: Config, out: RunDirectory, federation: Federation, quiet: bool, prefix: str = ""
) -> Any:
    """The per-round callback: append the record, checkpoint, print the progress line."""
    from fedkd.checkpoint import save_checkpoint

    def on_round(record: RoundRecord) -> None:
        out.append_round("metrics.jsonl", record)
        if not record.failed:  # a resumed run re-runs a failed round instead of going past it
            save_checkpoint(out.path, federation)
        say(quiet, prefix + progress_line(record, cfg.rounds))

    return on_round


def finish(
    cfg: Config,
    data: FederatedData,
    data_path: Path,
    out: RunDirectory,
    job: Any,
    ended: Ending,
    stop: threading.Event,
    quiet: bool,
    t0: float,
    resumed_from: int | None = None,
    one_of_seeds: bool = False,
) -> tuple[RunResult, Ending]:
    """After the federated rounds: the baseline (unless the run already ended badly),
    then the summary, its table and the plot. Never raises for a run's ending.
    ``one_of_seeds``: print one status line instead of the table (it is on disk)."""
    from fedkd.baselines import LOCAL

    federation = job.federation
    if job.error is not None and ended.error is None:  # failed, while other seeds went on
        ended.note(job.error, out)
    runs: dict[str, list[RoundRecord]] = {}
    b0 = None
    if not ended.interrupted and ended.error is None and stop.is_set():
        ended.interrupted = True
    if not ended.interrupted and ended.error is None:
        runs, b0, err = _run_baselines(cfg, data, data_path, out, stop, quiet, one_of_seeds)
        if err is not None:
            ended.note(err, out)
    baseline = runs.pop(LOCAL, [])
    every = [r for records in (baseline, *runs.values()) for r in records]
    records = federation.records
    timing = _timing(records, job.box, t0, b0)
    summary = summarize(
        cfg, records, baseline, _profiles(cfg, data, federation.strategy.uses_teacher), timing,
        outcome_of(cfg, records, every, ended.error, ended.interrupted, federation.stopped),
        test_size=len(data.test_y), uses_teacher=federation.strategy.uses_teacher,
        aggregations=federation.server.aggregations, resumed_from=resumed_from,
        baselines=runs,
    )  # fmt: skip
    _report(cfg, out, summary, records, baseline, quiet, one_of_seeds)
    return RunResult(cfg, out.path, list(records), summary, baseline), ended


def _run_baselines(
    cfg: Config,
    data: FederatedData,
    data_path: Path,
    out: RunDirectory,
    stop: threading.Event,
    quiet: bool,
    one_of_seeds: bool,
) -> tuple[dict[str, list[RoundRecord]], float | None, BaseException | None]:
    """Run every baseline in turn: the records so far, start time and what ended them."""
    from fedkd.baselines import LABELS
    from fedkd.flower import ctrl_c_stops

    runs: dict[str, list[RoundRecord]] = {}
    b0 = None
    try:
        with ctrl_c_stops(stop):
            for name in _baselines_to_run(cfg):
                what = "(same students, same budget, no federation)"
                if not one_of_seeds:
                    say(quiet, f"{LABELS[name]} baseline {what}...")
                b0 = b0 or time.time()
                records: list[RoundRecord] = []
                runs[name] = records
                _run_baseline(cfg, data, data_path, out, stop, name, records.append)
    except BaseException as err:
        return runs, b0, err
    return runs, b0, None


def _report(
    cfg: Config,
    out: RunDirectory,
    summary: RunSummary,
    records: Sequence[RoundRecord],
    baseline: list[RoundRecord],
    quiet: bool,
    one_of_seeds: bool,
) -> None:
    """Write the summary and its table, plot the accuracy, and print the table or status."""
    table = summary_table(summary)
    out.write_summary(summary, table)
    if records:
        title = f"{cfg.name}: {cfg.strategy} on {cfg.data.dataset}"
        plot_accuracy(records, baseline, out.path / "accuracy.png", title)
    if one_of_seeds:
        say(quiet, f"seed {cfg.seed}: {summary.status} ({out.path.name}/summary.txt)")
    else:
        say(quiet, "\n" + table + f"results: {out.path}")
    sys.stdout.flush()


def _timing(
    records: Sequence[RoundRecord], box: dict[str, Any], t0: float, b0: float | None
) -> dict[str, float]:
    baseline_s = time.time() - b0 if b0 is not None else 0.0
    total = time.time() - t0
    if "rounds_ended" in box:  # (seeds: the other seeds ran in between)
        total = box["rounds_ended"] - t0 + baseline_s
    timing: dict[str, float] = {
        "rounds_s": sum(r.seconds for r in records),
        "baseline_s": baseline_s,
        "total_s": total,
    }
    if "rounds_started" in box:
        timing["startup_s"] = box["rounds_started"] - t0
        timing["rounds_started_at"] = box["rounds_started"]
    if "engine_started" in box and "clients_ready" in box:  # (the first of a shared start)
        timing["engine_started_at"] = box["engine_started"]
        timing["clients_ready_at"] = box["clients_ready"]
    if records:
        timing["median_round_s"] = statistics.median(r.seconds for r in records)
    return timing
