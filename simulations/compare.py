"""Run every built-in algorithm on the same setting and compare them on equal footing.

    python simulations/compare.py [--algorithms fedavg,fedmd,...] [--seeds 5] [--out DIR]
                                  [field=value ...]

Each algorithm runs its own config from ``simulations/<name>.toml`` under Flower+Ray,
over the same seeds (``--seeds N``: 0..N-1, default 5), all under one Ray start
(``fedkd.run_many``), with the overrides applied to all (same data, partition,
clients, rounds and seeds).
Every figure is the mean +- std over the seeds; ``fedkd compare RUN_A RUN_B`` gives
the paired difference of two of the runs with its 95% CI.
FedAvg runs with the CNN student only (it cannot mix architectures); the others use
the default MLP/CNN mix. Writes ``comparison.md``, ``comparison.json`` and
``comparison.png`` (accuracy per round, and accuracy against bytes sent) to
``--out`` (default ``runs/compare-<timestamp>``); each run's own directory is kept.
"vs local-only" is each run's own baseline: the same students trained on their
private data alone (for FedAvg, CNN students only).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import fedkd

ALGORITHMS = [
    "local", "fedavg", "fedmd", "feddf", "dsfl", "fd", "cfd", "cronus", "kd", "dml", "fedproto",
    "fedgkt",
]  # fmt: skip


#: each algorithm's config (kd's is the quick start)
CONFIGS = {**{n: f"simulations/{n}.toml" for n in ALGORITHMS}, "kd": "simulations/quickstart.toml"}


def _config(name: str) -> str:
    return CONFIGS[name]


def _row(name: str, result: fedkd.SeedsResult) -> dict:
    m = result.summary.metrics
    runs = list(result.runs.values())

    def spread(key: str) -> tuple[float | None, float | None]:
        return (m[key].mean, m[key].std) if key in m else (None, None)

    by_round: dict[int, list[float]] = {}
    for run in runs:
        for r in run.rounds:
            if r.students is not None:
                by_round.setdefault(r.round, []).append(r.students.mean)
    last = runs[0].summary if runs else None
    return {
        "algorithm": name,
        "strategy": result.summary.strategy,
        "seeds": list(result.summary.seeds),
        "students": spread("students"),  # (mean, std) over seeds
        "gain_points": spread("gain_points"),  # vs local-only of the same students
        "server_model": spread("server_model"),
        "bytes_per_round": spread("bytes_per_round")[0] or 0.0,
        "share_of_fedavg": last.communication.share_of_fedavg if last else None,
        "rounds_s": spread("rounds_s")[0] or 0.0,
        "status": result.summary.status,
        "curve": [sum(v) / len(v) for _, v in sorted(by_round.items())],
        "directory": str(result.directory),
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _pm(pair: tuple[float | None, float | None], points: bool = False) -> str:
    """``35.8 +- 2.7`` (percent or points) from a (mean, std) pair."""
    mean, std = pair
    if mean is None or std is None:
        return "-"
    sign = "+" if points and mean >= 0 else ""
    return f"{sign}{100 * mean:.1f} +- {100 * std:.1f}"


def _size(n: float) -> str:
    return f"{n / 1024:.1f} KB" if n < 1024**2 else f"{n / 1024**2:.2f} MB"


def markdown(rows: list[dict], setting: str) -> str:
    seeds = rows[0]["seeds"] if rows else []
    lines = [
        f"Setting: {setting}; mean +- std over seeds {seeds}",
        "",
        "| algorithm | students, mean (%) | vs local-only (points) | server model (%) "
        "| bytes/round | vs FedAvg, same models | rounds time (mean) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        share = "-" if r["share_of_fedavg"] is None else f"{100 * r['share_of_fedavg']:.1f}%"
        lines.append(
            f"| {r['algorithm']} | {_pm(r['students'])} | {_pm(r['gain_points'], True)} "
            f"| {_pm(r['server_model'])} | {_size(r['bytes_per_round'])} | {share} "
            f"| {r['rounds_s']:.1f} s |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate(rows):
        color = f"C{i % 10}"  # one colour per algorithm in both panels
        curve = [math.nan if v is None else 100 * v for v in r["curve"]]  # None: no student
        left.plot(range(1, len(curve) + 1), curve, "o-", ms=3, color=color, label=r["algorithm"])
        if r["bytes_per_round"] > 0 and r["students"][0] is not None:
            xy = (r["bytes_per_round"] / 1024, 100 * r["students"][0])
            right.scatter(*xy, color=color)
            right.annotate(
                r["algorithm"], xy, textcoords="offset points", xytext=(4, 4), fontsize=8
            )
    left.set(xlabel="round", ylabel="student test accuracy, mean (%)", title="accuracy per round")
    left.legend(fontsize=8)
    right.set(
        xscale="log",
        xlabel="KB per round (up + down, all clients)",
        ylabel="final student accuracy, mean (%)",
        title="accuracy vs communication",
    )
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--out", default=None)
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    parser.add_argument("overrides", nargs="*", help="field=value, applied to every run")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.algorithms.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ALGORITHMS))
    if unknown:
        parser.error(f"unknown algorithms {unknown}; known: {', '.join(ALGORITHMS)}")
    out = Path(args.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    setting = ""
    overrides = [*args.overrides, "baseline=true"]  # local-only: fedkd skips its own
    overrides += [f"output_dir={out}", f"seeds={args.seeds}"]
    print(f"{len(names)} algorithms x {args.seeds} seeds under one Ray start ...", flush=True)

    def done(i: int, result: fedkd.SeedsResult) -> None:
        nonlocal setting
        rows.append(_row(names[i], result))
        r = rows[-1]
        print(
            f"[{i + 1}/{len(names)}] {names[i]}: students {_pm(r['students'])}%, vs local-only "
            f"{_pm(r['gain_points'], True)} points, server {_pm(r['server_model'])}%, "
            f"{_size(r['bytes_per_round'])}/round; {r['status']}",
            flush=True,
        )
        s, c = result.summary, result.config
        setting = f"{s.data}; {c.clients.count} clients; {c.rounds} rounds"
        # written after every algorithm, so an interrupted comparison keeps what it has
        (out / "comparison.json").write_text(
            json.dumps({"setting": setting, "rows": rows}, indent=2)
        )
        (out / "comparison.md").write_text(markdown(rows, setting))

    fedkd.run_many([(_config(n), overrides) for n in names], quiet=True, on_result=done)
    plot(rows, out / "comparison.png")
    print("\n" + markdown(rows, setting) + f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
