"""``fedkd.run``: validate, build data, simulate under Flower+Ray, compare, report.

Order of work: every config check (names, parameters, sizes) runs before the data
is built and before Ray starts; the federation runs next (each round written to
disk as it ends); then the local-only baseline and the summary.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedkd.client import student_spec
from fedkd.config import Config, ConfigError, Spec, load_config
from fedkd.data import FederatedData, prepare_federated_data
from fedkd.data.federation import check_data_config
from fedkd.models import build_model, check_model_spec
from fedkd.privacy.accounting import PrivacyLedger
from fedkd.profiling import profile_model
from fedkd.results import RunDirectory, plot_accuracy, progress_line, summary_table
from fedkd.rounds import sample_clients
from fedkd.strategy import SERVER_STRATEGIES, client_strategy, server_strategy
from fedkd.training import OPTIMIZERS

log = logging.getLogger("fedkd")


@dataclass
class RunResult:
    """What :func:`run` returns: the run directory, every round, and the summary."""

    config: Config
    directory: Path
    rounds: list[dict[str, Any]]
    baseline: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def check_config(config: Config) -> None:
    """Resolve every plug-in name and parameter; raises ConfigError naming the field."""
    check_data_config(config)
    for i, spec in enumerate(config.clients.models):
        check_model_spec(spec, f"clients.models[{i}]")
    for key, spec in config.clients.model_groups.items():
        check_model_spec(spec, f"clients.model_groups.{key}")
    check_model_spec(config.server.teacher, "server.teacher")
    for path, name in (
        ("clients.optimizer", config.clients.optimizer),
        ("server.optimizer", config.server.optimizer),
    ):
        if name not in OPTIMIZERS:
            raise ConfigError(path, f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    strategy = server_strategy(config)
    for cid in range(config.clients.count):
        client_strategy(config, cid)
    check_privacy_config(config, strategy)


def check_privacy_config(config: Config, strategy: Any) -> None:
    """Mechanism and strategy must fit together; raises ConfigError naming the field."""
    from fedkd.privacy.payload import FIELDS

    p = config.privacy
    if p.mechanism == "none":
        return
    if getattr(strategy, "own_privacy", False):
        raise ConfigError(
            "privacy.mechanism",
            f"strategy {config.strategy.name!r} is its own DP mechanism; set mechanism = none",
        )
    if p.mechanism == "client_gaussian":
        bad = [t for t in strategy.accepts if not issubclass(t, tuple(FIELDS))]
        if bad:
            kinds = ", ".join(getattr(t, "kind", t.__name__) for t in bad)
            raise ConfigError(
                "privacy.mechanism",
                f"client_gaussian clips and noises logits, soft labels or class logits; "
                f"strategy {config.strategy.name!r} exchanges {kinds}",
            )
        if p.mode == "central" and not strategy.aggregates_by_mean():
            raise ConfigError(
                "privacy.mode",
                f"central noise is calibrated to a plain mean, and strategy "
                f"{config.strategy.name!r} does not aggregate by one; use mode = 'local'",
            )
    if p.mechanism == "dpsgd" and p.secure_noise:
        from fedkd.privacy.dpsgd import check_secure_mode

        check_secure_mode()


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, flush=True)


def _profiles(config: Config, data: FederatedData) -> dict[str, dict[str, Any]]:
    specs: dict[str, Spec] = {str(config.server.teacher): config.server.teacher}
    for cid in range(config.clients.count):
        spec = student_spec(config, cid)
        specs.setdefault(str(spec), spec)
    return {
        name: profile_model(
            build_model(spec, data.input_shape, data.num_classes, 0), data.input_shape
        )
        for name, spec in specs.items()
    }


def _final_accuracies(records: list[dict[str, Any]]) -> dict[int, float]:
    """Each client's accuracy the last time it reported."""
    out: dict[int, float] = {}
    for r in records:
        for cid, m in r["clients"].items():
            out[int(cid)] = m["accuracy"]
    return out


def _stats(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "mean": float(np.mean(values)),
        "min": float(np.min(values)),
        "max": float(np.max(values)),
    }


def _fedavg_bytes(
    config: Config, records: list[dict[str, Any]], profiles: dict[str, dict[str, Any]]
) -> int:
    """What FedAvg would have sent in the same rounds: each sampled client's model
    (parameters and buffers) down and its update up."""
    total = 0
    for r in records:
        cids = [int(c) for c in r["clients"]] + [f["client"] for f in r["failures"]]
        total += sum(2 * profiles[str(student_spec(config, c))]["bytes"] for c in cids)
    return int(total)


def _privacy_summary(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Epsilon spent (last round's record) and the membership-inference audit."""
    last = records[-1] if records else None
    out: dict[str, Any] = {}
    if last is not None and last.get("privacy"):
        out.update(last["privacy"])
    if last is not None:
        audit = [c for c in last["clients"].values() if "mia_auc" in c]
        if audit:
            out["audit"] = {
                "attack": "loss threshold on each student: private samples vs test samples",
                "mia_auc": float(np.mean([c["mia_auc"] for c in audit])),
                "mia_advantage": float(np.mean([c["mia_advantage"] for c in audit])),
                "clients": len(audit),
            }
    return out or None


def summarize(
    config: Config,
    data: FederatedData,
    records: list[dict[str, Any]],
    baseline: list[dict[str, Any]],
    profiles: dict[str, dict[str, Any]],
    timing: dict[str, float],
    status: str,
) -> dict[str, Any]:
    """The end-of-run summary (written to summary.json and printed as a table)."""
    fed, local = _final_accuracies(records), _final_accuracies(baseline)
    server_acc = next(
        (r["teacher"]["accuracy"] for r in reversed(records) if "accuracy" in (r["teacher"] or {})),
        None,
    )
    # the architecture table compares students with the teacher only where there is one
    teacher_acc = server_acc if SERVER_STRATEGIES.get(config.strategy.name).uses_teacher else None
    students, local_stats = _stats(list(fed.values())), _stats(list(local.values()))
    gain = None
    if students and local_stats:
        gain = 100 * (students["mean"] - local_stats["mean"])
    archs = []
    if teacher_acc is not None:
        name = str(config.server.teacher)
        archs.append(
            {
                "model": name,
                "role": "teacher",
                "clients": [],
                **profiles[name],
                "accuracy": teacher_acc,
                "pct_of_teacher": 100.0,
            }
        )
    by_arch: dict[str, list[int]] = {}
    for cid in range(config.clients.count):
        by_arch.setdefault(str(student_spec(config, cid)), []).append(cid)
    for name, cids in by_arch.items():
        acc = [fed[c] for c in cids if c in fed]
        loc = [local[c] for c in cids if c in local]
        mean = float(np.mean(acc)) if acc else None
        archs.append(
            {
                "model": name,
                "role": "student",
                "clients": cids,
                **profiles[name],
                "accuracy": mean,
                "local_only_accuracy": float(np.mean(loc)) if loc else None,
                "pct_of_teacher": 100 * mean / teacher_acc
                if mean is not None and teacher_acc
                else None,
            }
        )
    up = sum(r["bytes_up"] for r in records)
    down = sum(r["bytes_down"] for r in records)
    fedavg = _fedavg_bytes(config, records, profiles)
    d = config.data
    return {
        "name": config.name,
        "status": status,
        "rounds": config.rounds,
        "rounds_completed": len(records),
        "strategy": str(config.strategy),
        "clients": config.clients.count,
        "data": f"{d.dataset} ({d.private} private / {d.public} public / {d.test} test), "
        f"partition {config.partition}",
        "evaluation": f"the global held-out test set ({len(data.test_y)} samples)",
        "final": {
            "students": students,
            "local_only": local_stats,
            "gain_points": gain,
            "teacher": teacher_acc,
            "server_model": server_acc,
        },
        "architectures": archs,
        "communication": {
            "bytes_up": up,
            "bytes_down": down,
            "bytes_per_round": (up + down) / max(len(records), 1),
            "fedavg_bytes": fedavg,
            "fedavg_bytes_per_round": fedavg / max(len(records), 1),
            "share_of_fedavg": (up + down) / fedavg if fedavg else None,
        },
        "timing": timing,
        "failures": sum(len(r["failures"]) for r in records),
        "privacy": _privacy_summary(records),
    }


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

    Example:
        >>> result = fedkd.run("simulations/quickstart.toml", ["rounds=3"])
        >>> result.summary["final"]["gain_points"]
    """
    from fedkd.flower import run_flower
    from fedkd.inline import InlineTransport
    from fedkd.rounds import Federation

    t0 = started if started is not None else time.time()
    cfg = load_config(config, overrides)
    check_config(cfg)
    data, data_path = prepare_federated_data(cfg)
    PrivacyLedger(cfg, data.part_sizes).check_start(sample_clients(cfg, 1))  # before Ray starts
    out = RunDirectory.create(cfg)
    _say(
        quiet,
        f"fedkd: {cfg.name}: {cfg.clients.count} clients, {cfg.rounds} rounds, strategy "
        f"{cfg.strategy}; results in {out.path}",
    )
    records: list[dict[str, Any]] = []
    baseline: list[dict[str, Any]] = []
    timing = {
        "startup_s": float("nan"),
        "rounds_s": 0.0,
        "median_round_s": float("nan"),
        "baseline_s": 0.0,
        "total_s": 0.0,
    }

    def on_round(record: dict[str, Any]) -> None:
        records.append(record)
        out.append("metrics.jsonl", record)
        _say(quiet, progress_line(record, cfg.rounds))

    status = "completed"
    box: dict[str, Any] = {}
    try:
        run_flower(cfg, data, str(data_path), on_round, box)
        federation = box.get("federation")
        if federation is not None and federation.stopped:
            status = f"stopped early: {federation.stopped}"
        if cfg.baseline and cfg.strategy.name != "local":
            _say(quiet, "local-only baseline (same students, same budget, no federation)...")
            b0 = time.time()
            d = cfg.to_dict()  # every client local and honest: no per-client strategies
            d["clients"] = {**d["clients"], "strategies": {}}
            local_cfg = load_config({**d, "strategy": {"name": "local"}})
            Federation(local_cfg, data).run(
                InlineTransport(local_cfg, str(data_path)),
                lambda r: (baseline.append(r), out.append("baseline.jsonl", r)),
            )
            timing["baseline_s"] = time.time() - b0
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except Exception as err:
        status = f"failed: {type(err).__name__}: {err}"
        raise
    finally:
        if "rounds_started" in box:
            timing["startup_s"] = box["rounds_started"] - t0
            timing["rounds_started_at"] = box["rounds_started"]
        timing["rounds_s"] = sum(r["seconds"] for r in records)
        if records:
            timing["median_round_s"] = statistics.median(r["seconds"] for r in records)
        timing["total_s"] = time.time() - t0
        summary = summarize(cfg, data, records, baseline, _profiles(cfg, data), timing, status)
        out.write_json("summary.json", summary)
        table = summary_table(summary)
        out.write_text("summary.txt", table)
        if records:
            plot_accuracy(
                records,
                baseline,
                out.path / "accuracy.png",
                f"{cfg.name}: {cfg.strategy} on {cfg.data.dataset}",
            )
        _say(quiet, "\n" + table + f"\nresults: {out.path}")
        sys.stdout.flush()
    return RunResult(cfg, out.path, records, baseline, summary)
