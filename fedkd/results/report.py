"""What people read: the per-round progress line, the summary table, the accuracy plot."""

from __future__ import annotations

from pathlib import Path

from fedkd.results.records import RoundRecord, RunSummary


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:5.1f}%"


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def progress_line(record: RoundRecord, rounds: int) -> str:
    """One line per finished round, for the terminal."""
    parts = [f"round {record.round:>3}/{rounds}"]
    if record.server_accuracy is not None:
        parts.append(f"server {_pct(record.server_accuracy)}")
    s = record.students
    if s is not None:
        lo, hi = _pct(s.min).strip(), _pct(s.max).strip()
        parts.append(f"students {_pct(s.mean)} (min {lo}, max {hi})")
    parts.append(f"up {_bytes(record.bytes_up)} down {_bytes(record.bytes_down)}")
    if record.privacy is not None:
        p = record.privacy
        dep = p.epsilon_data_dependent
        more = "" if dep is None else f"; data-dependent {dep:.3g}, not itself DP"
        parts.append(f"eps {p.epsilon:.3g} (delta {p.delta:g}{more})")
    parts.append(f"{record.seconds:.2f} s")
    if record.faults:
        f = record.faults
        missing = len(f.dropped) + len(f.late)
        if missing:
            parts.append(f"{missing} dropped/late (simulated)")
    if record.failures:
        who = ", ".join(str(f.cid) for f in record.failures)
        parts.append(f"{len(record.failures)} client(s) failed: {who}")
    if record.failed:
        parts.append(f"ROUND FAILED ({record.usable}/{len(record.sampled)} usable replies)")
    return " | ".join(parts)


def summary_table(summary: RunSummary) -> str:
    """The end-of-run comparison as plain text; the last line is the outcome."""
    lines = [
        f"fedkd run {summary.name!r}: {summary.rounds_completed}/{summary.rounds} rounds, "
        f"strategy {summary.strategy}, {summary.clients} clients, {summary.data}",
        f"Evaluated on {summary.evaluation}.",
        "",
        f"{'':28}{'mean':>8}{'min':>8}{'max':>8}",
    ]
    lines += _accuracy_lines(summary)
    lines += _architecture_lines(summary)
    lines += _cost_lines(summary)
    if summary.aggregator != "mean":
        lines.append(
            f"aggregator: {summary.aggregator}, applied in {summary.aggregations} aggregation(s)"
        )
    if summary.faults:
        lines.append(f"simulated faults: {summary.faults['describe']}")
    lines += _privacy_lines(summary)
    if summary.audit is not None:
        a = summary.audit
        lines.append(
            f"membership audit ({a.attack}): AUC {a.mia_auc:.3f}, "
            f"advantage {a.mia_advantage:.3f} (mean of {a.clients} clients; 0.5 / 0 = chance)"
        )
    if summary.resumed_from is not None:
        lines.append(f"resumed after round {summary.resumed_from}")
    if summary.failures.count:
        lines.append(summary.failures.describe() + " (full tracebacks in errors.log)")
    lines.append(f"status: {summary.status}")
    return "\n".join(lines) + "\n"


def _accuracy_lines(summary: RunSummary) -> list[str]:
    """The final accuracies: students, baselines, gain, teacher or server model."""
    f = summary.final
    lines: list[str] = []
    rows = (
        ("students, federated", f.students),
        ("  on own distribution", f.students_own),
        ("students, local-only", f.local_only),
    )
    for label, row in rows:
        if row is not None:
            lines.append(f"{label:28}{_pct(row.mean):>8}{_pct(row.min):>8}{_pct(row.max):>8}")
    from fedkd.baselines import LABELS

    for name, row in f.baselines.items():
        label = f"{LABELS.get(name, name)} (baseline)"
        lines.append(f"{label:28}{_pct(row.mean):>8}{_pct(row.min):>8}{_pct(row.max):>8}")
    if f.gain_points is not None:
        lines.append(f"{'gain over local-only':28}{f.gain_points:>+7.1f} points (mean)")
    if f.teacher is not None:
        lines.append(f"{'teacher':28}{_pct(f.teacher):>8}")
    elif f.server_model is not None:
        lines.append(f"{'server model(s)':28}{_pct(f.server_model):>8}")
    return lines


def _architecture_lines(summary: RunSummary) -> list[str]:
    """The per-architecture table: size, latency and accuracy of each model."""
    lines = ["", "per architecture (accuracy: final round, mean over its clients)"]
    lines.append(
        f"{'model':24}{'role':9}{'clients':>8}{'params':>9}{'size':>10}"
        f"{'ms/sample':>11}{'accuracy':>10}{'local':>8}{'% teacher':>11}"
    )
    for a in summary.architectures:
        share = "-" if a.pct_of_teacher is None else f"{a.pct_of_teacher:.1f}%"
        lines.append(
            f"{a.model:24}{a.role:9}{len(a.clients) or '-':>8}{a.params:>9}"
            f"{_bytes(a.bytes):>10}{a.latency_ms:>11.3f}{_pct(a.accuracy):>10}"
            f"{_pct(a.local_only_accuracy):>8}{share:>11}"
        )
    return lines


def _cost_lines(summary: RunSummary) -> list[str]:
    """Bytes sent, time taken, and the bytes until each target accuracy."""
    c, t = summary.communication, summary.timing
    lines = [
        "",
        f"communication: {_bytes(c.bytes_up)} up, {_bytes(c.bytes_down)} down in all "
        f"({_bytes(c.bytes_per_round)} per round)"
        + (
            f"; FedAvg with the same models would send {_bytes(c.fedavg_bytes_per_round)} "
            f"per round (this run: {100 * c.share_of_fedavg:.1f}% of that)"
            if c.share_of_fedavg is not None
            else ""
        ),
        f"time: start-up {_secs(t.get('startup_s'))}, rounds {_secs(t.get('rounds_s'))} "
        f"(median {_secs(t.get('median_round_s'), 2)}/round), "
        f"baseline {_secs(t.get('baseline_s'))}, total {_secs(t.get('total_s'))}",
    ]
    for target, hit in c.to_target.items():
        reached = f"round {hit['round']}, after {_bytes(hit['bytes'])}" if hit else "not reached"
        lines.append(f"students' mean at {100 * float(target):g}%: {reached}")
    return lines


def _privacy_lines(summary: RunSummary) -> list[str]:
    """The privacy guarantee spent, if the run had a mechanism; else no lines."""
    if summary.privacy is None:
        return []
    p = summary.privacy
    eps = list(p.clients.values()) or [p.epsilon]
    lines = [
        f"privacy: {p.mechanism}, {p.unit}: epsilon {p.epsilon:.3g} at "
        f"delta {p.delta:g} ({p.accountant} accountant; per client "
        f"{min(eps):.3g}-{max(eps):.3g})"
    ]
    if p.epsilon_data_dependent is not None:
        lines.append(
            f"  data-dependent RDP (Papernot et al. 2018): epsilon "
            f"{p.epsilon_data_dependent:.3g} at delta {p.delta:g}; it depends on the private "
            "data, so it is not itself DP (no smooth-sensitivity release); the budget "
            "and the epsilon above are the data-independent bound"
        )
    return lines


def _secs(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f} s"


def plot_accuracy(
    rounds: list[RoundRecord], baseline: list[RoundRecord], path: Path, title: str
) -> None:
    """Accuracy per round: server model, student mean with min-max band, local-only mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    s = [(r.round, r.students) for r in rounds if r.students is not None]
    if s:
        x = [r for r, _ in s]
        ax.plot(x, [100 * v.mean for _, v in s], "o-", label="students (federated, mean)")
        ax.fill_between(
            x, [100 * v.min for _, v in s], [100 * v.max for _, v in s], alpha=0.2, label="min-max"
        )
    server = [(r.round, r.server_accuracy) for r in rounds if r.server_accuracy is not None]
    if server:
        ax.plot([a for a, _ in server], [100 * b for _, b in server], "s-", label="server model")
    b = [(r.round, r.students) for r in baseline if r.students is not None]
    if b:
        ax.plot(
            [r for r, _ in b],
            [100 * v.mean for _, v in b],
            "--",
            color="gray",
            label="students (local-only, mean)",
        )
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
