"""The end-of-run summary, computed from the typed round records."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedkd.config import Config
from fedkd.results.records import (
    Architecture,
    Audit,
    Communication,
    Failures,
    Final,
    Outcome,
    RoundRecord,
    RunSummary,
    Stats,
)


def final_accuracies(records: Sequence[RoundRecord]) -> dict[int, float]:
    """Each honest client's accuracy the last time it reported."""
    out: dict[int, float] = {}
    for r in records:
        for cid, c in r.clients.items():
            if not c.byzantine:
                out[cid] = c.accuracy
    return out


def final_metric(records: Sequence[RoundRecord], key: str) -> dict[int, float]:
    """Each honest client's last reported value of metric ``key`` (where it has one)."""
    out: dict[int, float] = {}
    for r in records:
        for cid, c in r.clients.items():
            if not c.byzantine and key in c.metrics:
                out[cid] = c.metrics[key]
    return out


def to_targets(
    records: Sequence[RoundRecord], targets: Sequence[float]
) -> dict[str, dict[str, int] | None]:
    """For each target accuracy: the first round whose students' mean reached it and the
    bytes (up + down) sent until the end of that round; None if never reached."""
    out: dict[str, dict[str, int] | None] = {}
    for target in targets:
        sent, hit = 0, None
        for r in records:
            sent += r.bytes_up + r.bytes_down
            if r.students is not None and r.students.mean >= target:
                hit = {"round": r.round, "bytes": sent}
                break
        out[f"{target:g}"] = hit
    return out


def _fedavg_bytes(
    records: Sequence[RoundRecord], model_of: dict[int, str], profiles: dict[str, dict[str, Any]]
) -> int:
    """What FedAvg would have sent in the same rounds: each client that took part (replied
    or failed) gets the model and sends its update back."""
    total = 0
    for r in records:
        cids = [*r.clients, *(f.cid for f in r.failures)]
        total += sum(2 * profiles[model_of[c]]["bytes"] for c in cids)
    return int(total)


def _architectures(
    config: Config,
    model_of: dict[int, str],
    profiles: dict[str, dict[str, Any]],
    fed: dict[int, float],
    local: dict[int, float],
    teacher_acc: float | None,
) -> list[Architecture]:
    archs = []
    if teacher_acc is not None:
        name = str(config.server.teacher)
        archs.append(Architecture(name, "teacher", (), **profiles[name], accuracy=teacher_acc,
                                  pct_of_teacher=100.0))  # fmt: skip
    by_arch: dict[str, list[int]] = {}
    for cid, name in model_of.items():
        by_arch.setdefault(name, []).append(cid)
    for name, cids in by_arch.items():
        acc = Stats.of(fed[c] for c in cids if c in fed)
        loc = Stats.of(local[c] for c in cids if c in local)
        mean = acc.mean if acc else None
        share = 100 * mean / teacher_acc if mean is not None and teacher_acc else None
        archs.append(
            Architecture(
                name, "student", tuple(cids), **profiles[name], accuracy=mean,
                local_only_accuracy=loc.mean if loc else None, pct_of_teacher=share,
            )
        )  # fmt: skip
    return archs


def _audit(records: Sequence[RoundRecord]) -> Audit | None:
    if not records:
        return None
    audit = [c.metrics for c in records[-1].clients.values() if "mia_auc" in c.metrics]
    if not audit:
        return None
    return Audit(
        attack="loss threshold on each student: private samples vs test samples",
        mia_auc=sum(m["mia_auc"] for m in audit) / len(audit),
        mia_advantage=sum(m["mia_advantage"] for m in audit) / len(audit),
        clients=len(audit),
    )


def _faults(config: Config, records: Sequence[RoundRecord]) -> dict[str, Any] | None:
    rounds = [r.faults for r in records if r.faults is not None]
    if not rounds:
        return None
    f = config.faults
    dropped = sum(len(x.dropped) for x in rounds)
    late = sum(len(x.late) for x in rounds)
    byz = sorted({c for x in rounds for c in x.byzantine})
    parts = [f"dropout {f.dropout:g}: {dropped} client-rounds dropped"]
    if f.stragglers:
        parts.append(f"stragglers {f.stragglers:g} (deadline {f.deadline:g} s): {late} late")
    if byz:
        parts.append(f"Byzantine clients {byz} ({f.attack}) excluded from student accuracy")
    return {"dropped": dropped, "late": late, "byzantine": byz, "describe": "; ".join(parts)}


def outcome_of(
    config: Config,
    records: Sequence[RoundRecord],
    baseline: Sequence[RoundRecord],
    error: str | None,
    interrupted: bool,
    stopped: str | None,
) -> tuple[Outcome, str]:
    """The run's outcome and status line (see :class:`fedkd.results.records.Outcome`)."""
    if interrupted:
        done = len(records)
        return Outcome.INTERRUPTED, f"interrupted after round {done} (`fedkd resume` continues)"
    if error is not None:
        return Outcome.FAILED, f"failed: {error}"
    if stopped is not None:
        return Outcome.STOPPED_EARLY, f"stopped early: {stopped}"
    if len(records) < config.rounds:  # e.g. a server hook called sys.exit: never "completed"
        why = f"the federation ended after {len(records)} of {config.rounds} rounds, no reason"
        return Outcome.FAILED, f"failed: {why}"
    parts = []
    failures = Failures.of(records)
    if failures.count:
        parts.append(failures.describe())
    local = Failures.of(baseline)
    if local.count:
        parts.append(f"baseline: {local.describe()}")
    if parts:
        return Outcome.COMPLETED_WITH_FAILURES, "completed with failures: " + " ".join(parts)
    return Outcome.COMPLETED, "completed"


def summarize(
    config: Config,
    records: Sequence[RoundRecord],
    baseline: Sequence[RoundRecord],
    profiles: dict[str, dict[str, Any]],
    timing: dict[str, float],
    outcome: tuple[Outcome, str],
    *,
    test_size: int,
    uses_teacher: bool,
    aggregations: int = 0,
    resumed_from: int | None = None,
    baselines: Mapping[str, Sequence[RoundRecord]] | None = None,
) -> RunSummary:
    """The end-of-run summary (written to summary.json and printed as a table)."""
    from fedkd.assignment import student_spec

    model_of = {cid: str(student_spec(config, cid)) for cid in range(config.clients.count)}
    fed, local = final_accuracies(records), _local_accuracies(config, baseline)
    server_acc = next(
        (r.server_accuracy for r in reversed(records) if r.server_accuracy is not None), None
    )
    # the architecture table compares students with the teacher only where there is one
    teacher_acc = server_acc if uses_teacher else None
    students, local_stats = Stats.of(fed.values()), Stats.of(local.values())
    others = _baseline_stats(baselines or {})
    gain = 100 * (students.mean - local_stats.mean) if students and local_stats else None
    d = config.data
    return RunSummary(
        name=config.name,
        outcome=outcome[0],
        status=outcome[1],
        rounds=config.rounds,
        rounds_completed=len(records),
        strategy=str(config.strategy),
        clients=config.clients.count,
        data=f"{d.dataset} ({d.private} private / {d.public} public / {test_size} test), "
        f"partition {config.partition}",
        evaluation=f"the global held-out test set ({test_size} samples)",
        final=Final(
            students,
            local_stats,
            gain,
            teacher_acc,
            server_acc,
            others,
            Stats.of(final_metric(records, "own_accuracy").values()),
        ),
        architectures=tuple(_architectures(config, model_of, profiles, fed, local, teacher_acc)),
        communication=_communication(config, records, model_of, profiles),
        timing=timing,
        failures=Failures.of(records),
        privacy=records[-1].privacy if records else None,
        audit=_audit(records),
        aggregator=str(config.server.aggregator),
        aggregations=aggregations,
        faults=_faults(config, records),
        resumed_from=resumed_from,
    )


def _local_accuracies(config: Config, baseline: Sequence[RoundRecord]) -> dict[int, float]:
    """The local-only baseline's final accuracies, without the run's Byzantine clients."""
    from fedkd.faults import byzantine_clients

    local = final_accuracies(baseline)
    for cid in byzantine_clients(config):  # the baseline runs them honestly: compare like for like
        local.pop(cid, None)
    return local


def _baseline_stats(baselines: Mapping[str, Sequence[RoundRecord]]) -> dict[str, Stats]:
    """Each other baseline's final accuracies across clients (those with any)."""
    others: dict[str, Stats] = {}
    for name, runs in baselines.items():
        stats = Stats.of(final_accuracies(runs).values())
        if stats is not None:
            others[name] = stats
    return others


def _communication(
    config: Config,
    records: Sequence[RoundRecord],
    model_of: dict[int, str],
    profiles: dict[str, dict[str, Any]],
) -> Communication:
    """Bytes sent in all and per round, against FedAvg's, and until each target."""
    up = sum(r.bytes_up for r in records)
    down = sum(r.bytes_down for r in records)
    fedavg = _fedavg_bytes(records, model_of, profiles)
    n = max(len(records), 1)
    return Communication(
        bytes_up=up,
        bytes_down=down,
        bytes_per_round=(up + down) / n,
        fedavg_bytes=fedavg,
        fedavg_bytes_per_round=fedavg / n,
        share_of_fedavg=(up + down) / fedavg if fedavg else None,
        to_target=to_targets(records, config.targets),
    )
