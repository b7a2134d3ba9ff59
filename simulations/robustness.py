"""Robust aggregation benchmark: student accuracy vs the share of Byzantine clients.

For each server aggregator (mean, coordinate-wise median, trimmed mean) and each
Byzantine fraction, runs the quick-start (``kd`` strategy, 10 MNIST-1D clients) over
several seeds, with the Byzantine clients sending their logits scaled by
``faults.scale`` (default x100; ``--attack`` picks another attack). Reports the final
mean accuracy of the *honest* students, mean +- std over seeds, and the change from
the fault-free run of the same aggregator and seed (paired), as a table (markdown +
CSV) and a plot.

Runs use the in-process runner (the same round loop and client code as Flower+Ray,
one process, no Ray start-up per run), without the local-only baseline and the
membership audit, which do not affect the federated numbers.

Usage::

    python simulations/robustness.py                   # 5 seeds, fractions 0-0.4
    python simulations/robustness.py --seeds 2 --fractions 0 0.3 --out /tmp/rob
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

AGGREGATORS = {
    "mean": "mean",
    "median": "median",
    "trimmed mean (beta 0.3)": "{name='trimmed_mean', beta=0.3}",
}


def final_honest_accuracy(overrides: list[str]) -> tuple[float, float | None]:
    """(mean accuracy of the honest students, server model accuracy) after the last round."""
    from fedkd.config import load_config
    from fedkd.data import prepare_federated_data
    from fedkd.federation import Federation
    from fedkd.inline import InlineTransport

    cfg = load_config(None, overrides)
    data, path = prepare_federated_data(cfg)
    records = Federation(cfg, data).run(InlineTransport(cfg, str(path)))
    last = records[-1]
    assert last.students is not None
    return last.students.mean, last.server_accuracy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.4])
    parser.add_argument("--attack", default="scale", help="faults.attack (default scale)")
    parser.add_argument("--scale", type=float, default=100.0, help="faults.scale (default 100)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default="runs/robustness", help="output folder")
    parser.add_argument("overrides", nargs="*", help="extra config overrides (field=value)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    acc: dict[tuple[str, float], list[float]] = {}
    total = len(AGGREGATORS) * len(args.fractions) * args.seeds
    done, t0 = 0, time.time()
    for label, agg in AGGREGATORS.items():
        for frac in args.fractions:
            for seed in range(args.seeds):
                overrides = [
                    f"seed={seed}",
                    f"rounds={args.rounds}",
                    f"server.aggregator={agg}",
                    f"faults.byzantine={frac}",
                    f"faults.attack={args.attack}",
                    f"faults.scale={args.scale}",
                    "privacy.audit=false",
                    "baseline=false",
                    *args.overrides,
                ]
                students, server = final_honest_accuracy(overrides)
                acc.setdefault((label, frac), []).append(students)
                rows.append([label, frac, seed, students, server])
                done += 1
                eta = (time.time() - t0) / done * (total - done)
                print(
                    f"[{done}/{total}] {label:24} byzantine {frac:.1f} seed {seed}: "
                    f"students {100 * students:.1f}% (eta {eta / 60:.1f} min)",
                    flush=True,
                )
    with open(out / "robustness.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["aggregator", "byzantine_fraction", "seed", "students", "server"])
        w.writerows(rows)
    table = _table(acc, args)
    (out / "robustness.md").write_text(table)
    print("\n" + table)
    _plot(acc, args, out / "robustness.png")
    print(f"written: {out}/robustness.md, .csv, .png")
    return 0


def _stats(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} +- {100 * sd:.1f}"


def _table(acc: dict[tuple[str, float], list[float]], args: argparse.Namespace) -> str:
    head = (
        f"Honest students' final accuracy (%), mean +- std over {args.seeds} seeds; "
        f"Byzantine clients send `{args.attack}`"
        + (f" x{args.scale:g}" if args.attack == "scale" else "")
        + f" logits; {args.rounds} rounds. In brackets: paired change from the same "
        "aggregator's fault-free run, in points (mean +- std over seeds).\n\n"
    )
    fracs = args.fractions
    lines = ["| aggregator | " + " | ".join(f"{f:.0%} Byzantine" for f in fracs) + " |"]
    lines.append("|---|" + "---:|" * len(fracs))
    for label in AGGREGATORS:
        cells = []
        base = acc.get((label, 0.0))
        for frac in fracs:
            v = acc[(label, frac)]
            cell = _stats(v)
            if base is not None and frac > 0:
                diff = [100 * (a - b) for a, b in zip(v, base, strict=True)]
                sd = statistics.stdev(diff) if len(diff) > 1 else 0.0
                cell += f" ({statistics.mean(diff):+.1f} +- {sd:.1f})"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def _plot(acc: dict[tuple[str, float], list[float]], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label in AGGREGATORS:
        means = [100 * statistics.mean(acc[(label, f)]) for f in args.fractions]
        sds = [
            100 * (statistics.stdev(acc[(label, f)]) if args.seeds > 1 else 0.0)
            for f in args.fractions
        ]
        x = [100 * f for f in args.fractions]
        ax.errorbar(x, means, yerr=sds, marker="o", capsize=3, label=label)
    ax.set_xlabel("Byzantine clients (%)")
    ax.set_ylabel("honest students' accuracy (%)")
    ax.set_title(f"kd on MNIST-1D, {args.attack} attack, {args.seeds} seeds (mean +- std)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
