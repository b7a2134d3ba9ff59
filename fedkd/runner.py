"""``fedkd.run`` and ``fedkd.resume``: validate, build data, simulate under Flower+Ray,
compare, report.

Order of work: every config check (names, parameters, sizes, the privacy preflight)
runs before Ray starts; the federation runs next (each round's record and a
checkpoint written to disk as it ends); then the local-only baseline and the
summary, whose status says how the run ended (:class:`fedkd.results.Outcome`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedkd.config import Config, ConfigError, load_config
from fedkd.data import FederatedData
from fedkd.federation import Federation
from fedkd.privacy.mechanism import mechanism_of
from fedkd.results import (
    Outcome,
    RunDirectory,
    read_rounds,
    read_summary,
)
from fedkd.results.records import write_jsonl
from fedkd.results.seeds import seed_folders
from fedkd.run_steps import (
    Ending,
    RunError,
    RunResult,
    SeedsResult,
    check_config,
    check_privacy_config,
    finish,
    header,
    prepare,
    round_writer,
    say,
    write_seeds,
)
from fedkd.vectorize import start_notes

__all__ = [
    "RunError",
    "RunResult",
    "SeedsResult",
    "check_config",
    "check_privacy_config",
    "resume",
    "run",
    "run_seeds",
]


def run(
    config: str | Path | Mapping[str, Any] | Config | None = None,
    overrides: Sequence[str] = (),
    *,
    quiet: bool = False,
    started: float | None = None,
) -> RunResult:
    """Run one experiment end to end and return its results.

    Args:
        config: a TOML path, a dict, a :class:`Config`, or None for the quick-start defaults.
        overrides: dotted ``field=value`` strings applied on top (``"rounds=3"``).
        quiet: print nothing (results are still written to the run directory).
        started: wall-clock time the process started, for the start-up figure.

    Returns:
        The run's records and summary, whose ``outcome`` is completed, completed with
        failures or stopped early.

    Raises:
        ConfigError: a bad setting, before anything runs (no run folder is made).
        RunError: the run failed; finished rounds and the summary are on disk, and
            the exception's ``result`` holds them.
        KeyboardInterrupt: Ctrl-C; the summary says interrupted, ``fedkd resume`` continues.

    Example:
        >>> result = fedkd.run("simulations/quickstart.toml", ["rounds=3"])
        >>> result.summary.final.gain_points
    """
    t0 = started if started is not None else time.time()
    cfg = load_config(config, overrides)
    if cfg.seeds:
        return run_seeds(cfg, quiet=quiet, t0=t0)  # type: ignore[return-value]
    data, data_path = prepare(cfg)
    out = RunDirectory.create(cfg)
    say(quiet, header(cfg, out.path))
    for note in start_notes(cfg, str(data_path)):
        say(quiet, f"simulation.vectorize: {note}")
    return _execute(cfg, data, data_path, out, Federation(cfg, data), quiet=quiet, t0=t0)


def run_seeds(cfg: Config, *, quiet: bool = False, t0: float | None = None) -> SeedsResult:
    """Run ``cfg`` once per seed of ``cfg.seeds``, under one Flower simulation and one Ray
    start, each seed in its own ``seed-<n>/`` run folder inside one run folder, whose
    ``summary.json`` holds each metric's mean, std and 95% CI over the seeds (plus
    ``seeds.csv`` and ``accuracy.png``). Every seed's config and data are checked and
    built before Ray starts; a seed that fails does not stop the others; Ctrl-C stops
    all (the seeds not reached are "not run"). See :func:`fedkd.sweep.run_many`."""
    from fedkd.sweep import run_many

    (result,) = run_many([cfg], quiet=quiet, started=t0)
    assert isinstance(result, SeedsResult)
    return result


def resume(run_dir: str | Path, *, quiet: bool = False, started: float | None = None) -> RunResult:
    """Continue a run that was killed or interrupted, from its last finished round.

    The run folder's config, checkpoint and client states are used as they are; the
    records of rounds after the checkpoint (a round cut short) are dropped and those
    rounds run again, so the finished run equals one that was never interrupted.
    """
    from fedkd.baselines import LOCAL, baseline_file
    from fedkd.checkpoint import restore_checkpoint
    from fedkd.state_store import DiskStateStore

    t0 = started if started is not None else time.time()
    out = RunDirectory(Path(run_dir))
    if not (out.path / "config.toml").is_file():
        raise ConfigError("run_dir", f"{out.path} is not a fedkd run folder (no config.toml)")
    if seed_folders(out.path):
        return _resume_seeds(out, quiet=quiet, t0=t0)  # type: ignore[return-value]
    cfg = load_config(out.path / "config.toml")
    data, data_path = prepare(cfg)
    federation = Federation(cfg, data)
    if cfg.privacy.secure_noise and mechanism_of(cfg).active:
        raise ConfigError(
            "privacy.secure_noise",
            "a resumed run re-runs the round that was cut short, with fresh OS noise, so that "
            "round's release would be charged once but made twice; start the run again instead",
        )
    try:
        done = restore_checkpoint(out.path, federation)
        previous = read_summary(out.path) if (out.path / "summary.json").is_file() else None
    except ValueError as err:  # another schema, or not a fedkd checkpoint
        raise ConfigError("run_dir", str(err)) from None
    if previous is not None and previous.outcome not in (Outcome.INTERRUPTED, Outcome.FAILED):
        raise ConfigError("run_dir", f"{out.path} has ended ({previous.status})")
    write_jsonl(out.path / "metrics.jsonl", federation.records)
    DiskStateStore(out.clients_dir).discard_after(done)
    for name in {LOCAL, *cfg.baseline}:  # every baseline runs again, after the federation
        (out.path / baseline_file(name)).unlink(missing_ok=True)
    out.log_error("resume", f"resumed after round {done}", None)
    say(quiet, f"fedkd: resuming {out.path} after round {done} of {cfg.rounds}")
    return _execute(cfg, data, data_path, out, federation, quiet=quiet, t0=t0, resumed_from=done)


def _resume_seeds(parent: RunDirectory, *, quiet: bool, t0: float) -> SeedsResult:
    """Resume every seed of a multi-seed run that has not ended (each in turn, each its
    own Flower start), then write the statistics across seeds again."""
    from fedkd.baselines import LOCAL, baseline_file

    cfg = load_config(parent.path / "config.toml")
    results: dict[int, RunResult] = {}
    for seed, folder in seed_folders(parent.path).items():
        previous = read_summary(folder) if (folder / "summary.json").is_file() else None
        if previous is not None and previous.outcome not in (Outcome.INTERRUPTED, Outcome.FAILED):
            say(quiet, f"seed {seed}: ended ({previous.status})")
            child = load_config(folder / "config.toml")
            records = read_rounds(folder / "metrics.jsonl")
            local_file = folder / baseline_file(LOCAL)
            baseline = read_rounds(local_file) if local_file.is_file() else []
            results[seed] = RunResult(child, folder, records, previous, baseline)
            continue
        try:
            results[seed] = resume(folder, quiet=quiet, started=t0)
        except RunError as err:
            results[seed] = err.result
    return write_seeds(cfg, parent, results, {s: None for s in cfg.seeds}, quiet)


def _execute(
    cfg: Config,
    data: FederatedData,
    data_path: Path,
    out: RunDirectory,
    federation: Federation,
    *,
    quiet: bool,
    t0: float,
    resumed_from: int | None = None,
) -> RunResult:
    """Run the federation's remaining rounds, then the baseline; always write the summary."""
    from fedkd.flower import FlowerJob, ctrl_c_stops, run_flower_jobs

    job = FlowerJob(
        federation,
        str(data_path),
        str(out.clients_dir),
        round_writer(cfg, out, federation, quiet),
        out.log_error,
    )
    stop = threading.Event()
    ended = Ending()
    with ctrl_c_stops(stop):
        try:
            if federation.next_round <= cfg.rounds:  # (a resumed run may only lack its baseline)
                run_flower_jobs([job], stop=stop)
        except BaseException as err:
            ended.note(err, out)
        result, ended = finish(cfg, data, data_path, out, job, ended, stop, quiet, t0, resumed_from)
    if ended.interrupted:
        raise KeyboardInterrupt(result.summary.status)
    if ended.error is not None:
        raise RunError(result)
    return result
