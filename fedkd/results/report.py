"""The run directory: resolved config, per-round JSON lines, summary, table and plot.

Each round is appended (and flushed) to ``metrics.jsonl`` the moment it finishes,
so an interrupted or crashed run keeps every finished round on disk.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fedkd.config import Config, save_config


class RunDirectory:
    """``<output_dir>/<name>-<YYYYmmdd-HHMMSS>[-k]/`` with the run's files."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, config: Config) -> RunDirectory:
        root = Path(config.output_dir)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path, k = root / f"{config.name}-{stamp}", 1
        while path.exists():
            k += 1
            path = root / f"{config.name}-{stamp}-{k}"
        path.mkdir(parents=True)
        save_config(config, path / "config.toml")
        return cls(path)

    def append(self, name: str, record: dict[str, Any]) -> None:
        with open(self.path / name, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        (self.path / name).write_text(json.dumps(data, indent=2) + "\n")

    def write_text(self, name: str, text: str) -> None:
        (self.path / name).write_text(text)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Per-round records written by :meth:`RunDirectory.append`."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:5.1f}%"


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def progress_line(record: dict[str, Any], rounds: int) -> str:
    """One line per finished round, for the terminal."""
    s, t = record["students"], record["teacher"]
    parts = [f"round {record['round']:>3}/{rounds}"]
    if t and "accuracy" in t:
        parts.append(f"server {_pct(t['accuracy'])}")
    if s["count"]:
        lo, hi = _pct(s["min"]).strip(), _pct(s["max"]).strip()
        parts.append(f"students {_pct(s['mean'])} (min {lo}, max {hi})")
    parts.append(f"up {_bytes(record['bytes_up'])} down {_bytes(record['bytes_down'])}")
    if record.get("privacy"):
        p = record["privacy"]
        parts.append(f"eps {p['epsilon']:.3g} (delta {p['delta']:g})")
    parts.append(f"{record['seconds']:.2f} s")
    if record["failures"]:
        parts.append(f"{len(record['failures'])} client(s) failed")
    return " | ".join(parts)


def summary_table(summary: dict[str, Any]) -> str:
    """The end-of-run comparison as plain text."""
    f = summary["final"]
    lines = [
        f"fedkd run {summary['name']!r}: {summary['rounds_completed']}/{summary['rounds']} rounds, "
        f"strategy {summary['strategy']}, {summary['clients']} clients, {summary['data']}",
        f"status: {summary['status']}. Evaluated on {summary['evaluation']}.",
        "",
        f"{'':28}{'mean':>8}{'min':>8}{'max':>8}",
    ]
    for label, key in (("students, federated", "students"), ("students, local-only", "local_only")):
        row = f.get(key)
        if row:
            lines.append(
                f"{label:28}{_pct(row['mean']):>8}{_pct(row['min']):>8}{_pct(row['max']):>8}"
            )
    if f.get("gain_points") is not None:
        lines.append(f"{'gain over local-only':28}{f['gain_points']:>+7.1f} points (mean)")
    if f.get("teacher") is not None:
        lines.append(f"{'teacher':28}{_pct(f['teacher']):>8}")
    elif f.get("server_model") is not None:
        lines.append(f"{'server model(s)':28}{_pct(f['server_model']):>8}")
    lines += ["", "per architecture (accuracy: final round, mean over its clients)"]
    header = (
        f"{'model':24}{'role':9}{'clients':>8}{'params':>9}{'size':>10}"
        f"{'ms/sample':>11}{'accuracy':>10}{'local':>8}{'% teacher':>11}"
    )
    lines.append(header)
    for a in summary["architectures"]:
        share = a.get("pct_of_teacher")
        share_text = "-" if share is None else f"{share:.1f}%"
        lines.append(
            f"{a['model']:24}{a['role']:9}{len(a['clients']) or '-':>8}{a['params']:>9}"
            f"{_bytes(a['bytes']):>10}{a['latency_ms']:>11.3f}{_pct(a['accuracy']):>10}"
            f"{_pct(a.get('local_only_accuracy')):>8}"
            f"{share_text:>11}"
        )
    c, t = summary["communication"], summary["timing"]
    lines += [
        "",
        f"communication: {_bytes(c['bytes_up'])} up, {_bytes(c['bytes_down'])} down in all "
        f"({_bytes(c['bytes_per_round'])} per round)"
        + (
            f"; FedAvg with the same models would send {_bytes(c['fedavg_bytes_per_round'])} "
            f"per round (this run: {100 * c['share_of_fedavg']:.1f}% of that)"
            if c.get("share_of_fedavg") is not None
            else ""
        ),
        f"time: start-up {t['startup_s']:.1f} s, rounds {t['rounds_s']:.1f} s "
        f"(median {t['median_round_s']:.2f} s/round), baseline {t['baseline_s']:.1f} s, "
        f"total {t['total_s']:.1f} s",
    ]
    if summary["failures"]:
        lines.append(f"client failures: {summary['failures']} (see metrics.jsonl)")
    priv = summary.get("privacy") or {}
    if "epsilon" in priv:
        eps = list(priv["clients"].values())
        lines.append(
            f"privacy: {priv['mechanism']}, {priv['unit']}: epsilon {priv['epsilon']:.3g} at "
            f"delta {priv['delta']:g} ({priv['accountant']} accountant; per client "
            f"{min(eps):.3g}-{max(eps):.3g})"
        )
    if "audit" in priv:
        a = priv["audit"]
        lines.append(
            f"membership audit ({a['attack']}): AUC {a['mia_auc']:.3f}, "
            f"advantage {a['mia_advantage']:.3f} (mean of {a['clients']} clients; 0.5 / 0 = chance)"
        )
    return "\n".join(lines) + "\n"


def plot_accuracy(
    rounds: list[dict[str, Any]], baseline: list[dict[str, Any]], path: Path, title: str
) -> None:
    """Accuracy per round: teacher, student mean with min-max band, local-only mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    x = [r["round"] for r in rounds if r["students"]["count"]]
    s = [r["students"] for r in rounds if r["students"]["count"]]
    if x:
        ax.plot(x, [100 * v["mean"] for v in s], "o-", label="students (federated, mean)")
        ax.fill_between(
            x, [100 * v["min"] for v in s], [100 * v["max"] for v in s], alpha=0.2, label="min-max"
        )
    teacher = [
        (r["round"], r["teacher"]["accuracy"])
        for r in rounds
        if r["teacher"] and "accuracy" in r["teacher"]
    ]
    if teacher:
        ax.plot([a for a, _ in teacher], [100 * b for _, b in teacher], "s-", label="server model")
    bx = [r["round"] for r in baseline if r["students"]["count"]]
    if bx:
        by = [100 * r["students"]["mean"] for r in baseline if r["students"]["count"]]
        ax.plot(bx, by, "--", color="gray", label="students (local-only, mean)")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
