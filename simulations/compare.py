"""Run every built-in algorithm on the same setting and compare them on equal footing.

    python simulations/compare.py [--algorithms fedavg,fedmd,...] [--out DIR] [field=value ...]

Each algorithm runs its own config from ``simulations/<name>.toml`` under Flower+Ray,
with the overrides applied to all (same data, partition, clients, rounds and seed).
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

ALGORITHMS = ["local", "fedavg", "fedmd", "feddf", "dsfl", "fd", "cfd", "cronus", "kd"]


def _config(name: str) -> str:
    return "simulations/quickstart.toml" if name == "kd" else f"simulations/{name}.toml"


def _row(name: str, result: fedkd.RunResult) -> dict:
    s = result.summary
    f, c, t = s.final, s.communication, s.timing
    return {
        "algorithm": name,
        "strategy": s.strategy,
        "students_mean": f.students.mean if f.students else None,
        "students_min": f.students.min if f.students else None,
        "gain_points": f.gain_points,  # vs local-only training of the same students
        "server_model": f.server_model,
        "bytes_per_round": c.bytes_per_round,
        "share_of_fedavg": c.share_of_fedavg,
        "rounds_s": t["rounds_s"],
        "total_s": t["total_s"],
        "failures": s.failures.count,
        "curve": [r.students.mean if r.students else None for r in result.rounds],
        "directory": str(result.directory),
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _size(n: float) -> str:
    return f"{n / 1024:.1f} KB" if n < 1024**2 else f"{n / 1024**2:.2f} MB"


def markdown(rows: list[dict], setting: str) -> str:
    lines = [
        f"Setting: {setting}",
        "",
        "| algorithm | students mean | students min | vs local-only | server model "
        "| bytes/round | vs FedAvg, same models | rounds time | wall time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        gain = "-" if r["gain_points"] is None else f"{r['gain_points']:+.1f}"
        share = "-" if r["share_of_fedavg"] is None else f"{100 * r['share_of_fedavg']:.1f}%"
        lines.append(
            f"| {r['algorithm']} | {_pct(r['students_mean'])} | {_pct(r['students_min'])} "
            f"| {gain} | {_pct(r['server_model'])} | {_size(r['bytes_per_round'])} | {share} "
            f"| {r['rounds_s']:.1f} s | {r['total_s']:.1f} s |"
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
        if r["bytes_per_round"] > 0:
            xy = (r["bytes_per_round"] / 1024, 100 * r["students_mean"])
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
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name} ...", flush=True)
        overrides = [*args.overrides, f"baseline={str(name != 'local').lower()}"]
        overrides.append(f"output_dir={out}")
        result = fedkd.run(_config(name), overrides, quiet=True)
        rows.append(_row(name, result))
        r = rows[-1]
        print(
            f"    students {_pct(r['students_mean'])} (min {_pct(r['students_min'])}), "
            f"server {_pct(r['server_model'])}, {_size(r['bytes_per_round'])}/round, "
            f"{r['total_s']:.1f} s",
            flush=True,
        )
        s = result.summary
        setting = f"{s.data}; {s.clients} clients; {s.rounds} rounds; seed {result.config.seed}"
        # written after every run, so an interrupted comparison keeps what it has
        (out / "comparison.json").write_text(
            json.dumps({"setting": setting, "rows": rows}, indent=2)
        )
        (out / "comparison.md").write_text(markdown(rows, setting))
    plot(rows, out / "comparison.png")
    print("\n" + markdown(rows, setting) + f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
