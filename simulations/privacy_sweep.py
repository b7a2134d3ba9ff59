"""Privacy-utility sweep: accuracy and membership-inference advantage against epsilon.

    python simulations/privacy_sweep.py [--out DIR] [--sigmas-dpsgd 0.5,1,2] ... [field=value ...]

Runs the default MNIST-1D setting without DP, then with each mechanism at each
noise level: DP-SGD (record-level) with ``--strategy`` (default ``dsfl``, which
keeps learning under DP-SGD where ``kd``'s logit-averaged teacher does not), the
client-level Gaussian mechanism with central noise with ``--central-strategy``
(default ``kd``: its logits survive clipping and noise better than DS-FL's
ERA-sharpened soft labels), and PATE (client-level;
``strategy = pate``, 200 queries a round, threshold-check noise equal to sigma).
Writes ``privacy_utility.md``,
``privacy_utility.json`` and ``privacy_utility.png`` (student and server-model
accuracy against epsilon; audit advantage against epsilon) to ``--out``
(default ``runs/privacy-<timestamp>``); every run's own directory is kept.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import fedkd


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def settings(args: argparse.Namespace) -> list[tuple[str, float | None, list[str]]]:
    """(mechanism, sigma, overrides) for every run of the sweep."""
    base = [f"strategy={{name='{args.strategy}'}}"]
    central = [f"strategy={{name='{args.central_strategy}'}}"]
    out: list[tuple[str, float | None, list[str]]] = [("none", None, base)]
    if args.central_strategy != args.strategy and args.sigmas_central.strip():
        out.append(("none", None, central))
    for s in _floats(args.sigmas_dpsgd):
        out.append(
            ("dpsgd", s, [*base, "privacy.mechanism=dpsgd", f"privacy.noise_multiplier={s}"])
        )
    for s in _floats(args.sigmas_central):
        out.append(
            (
                "client_gaussian",
                s,
                [
                    *central,
                    "privacy.mechanism=client_gaussian",
                    f"privacy.noise_multiplier={s}",
                    f"privacy.clip={args.clip}",
                ],
            )
        )
    for s in _floats(args.sigmas_pate):
        out.append(
            (
                "pate",
                s,
                [
                    "strategy={name='pate'}",
                    f"strategy.sigma={s}",
                    f"strategy.sigma1={s}",
                    f"server.public_subset={args.pate_queries}",
                ],
            )
        )
    return out


def _row(mechanism: str, sigma: float | None, result: fedkd.RunResult) -> dict:
    s = result.summary
    f, priv, audit = s.final, s.privacy, s.audit  # privacy: None without a DP mechanism
    return {
        "mechanism": mechanism,
        "strategy": result.config.strategy.name,
        "sigma": sigma,
        "unit": priv.unit if priv else "-",
        "epsilon": priv.epsilon if priv else math.inf,
        "delta": priv.delta if priv else None,
        "rounds": s.rounds_completed,
        "students": f.students.mean if f.students else None,
        "server_model": f.server_model,
        "mia_auc": audit.mia_auc if audit else None,
        "mia_advantage": audit.mia_advantage if audit else None,
        "status": s.status,
        "total_s": s.timing["total_s"],
        "directory": str(result.directory),
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def markdown(rows: list[dict], setting: str) -> str:
    lines = [
        f"Setting: {setting}",
        "",
        "| mechanism | strategy | sigma | privacy unit | epsilon | rounds | students "
        "| server model | MIA AUC | MIA advantage | wall time |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        eps = "inf (no DP)" if math.isinf(r["epsilon"]) else f"{r['epsilon']:.3g}"
        unit = r["unit"].split(" (")[0]
        lines.append(
            f"| {r['mechanism']} | {r['strategy']} | {_num(r['sigma'], 'g')} | {unit} | {eps} "
            f"| {r['rounds']} "
            f"| {_pct(r['students'])} | {_pct(r['server_model'])} | {_num(r['mia_auc'])} "
            f"| {_num(r['mia_advantage'])} | {r['total_s']:.0f} s |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, mia) = plt.subplots(1, 2, figsize=(12, 4.5))
    base = next((r for r in rows if r["mechanism"] == "none"), None)  # the DP-SGD strategy
    for i, mech in enumerate(m for m in ("dpsgd", "client_gaussian", "pate")):
        pts = sorted((r for r in rows if r["mechanism"] == mech), key=lambda r: r["epsilon"])
        if not pts:
            continue
        eps = [r["epsilon"] for r in pts]
        color = f"C{i}"
        acc.plot(
            eps,
            [100 * (r["students"] or 0) for r in pts],
            "o-",
            color=color,
            label=f"{mech} ({pts[0]['strategy']}): students",
        )
        if any(r["server_model"] is not None for r in pts):
            acc.plot(
                eps,
                [100 * (r["server_model"] or 0) for r in pts],
                "s--",
                color=color,
                label=f"{mech}: server model",
            )
        mia.plot(eps, [r["mia_advantage"] or 0 for r in pts], "o-", color=color, label=mech)
    if base is not None:
        label = f"no DP ({base['strategy']})"
        acc.axhline(100 * base["students"], color="gray", ls=":", label=f"{label}: students")
        mia.axhline(base["mia_advantage"] or 0, color="gray", ls=":", label=label)
    acc.set(
        xscale="log",
        xlabel="epsilon (delta 1e-5)",
        ylabel="test accuracy (%)",
        title="privacy-utility",
    )
    mia.set(
        xscale="log",
        xlabel="epsilon (delta 1e-5)",
        ylabel="loss-attack advantage (TPR - FPR)",
        title="membership-inference audit",
    )
    for ax in (acc, mia):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--sigmas-dpsgd", default="0.5,1,2,4")
    parser.add_argument("--sigmas-central", default="0.1,0.3,1")
    parser.add_argument("--sigmas-pate", default="2,5,10,20")
    parser.add_argument("--strategy", default="dsfl", help="strategy of the DP-SGD runs")
    parser.add_argument(
        "--central-strategy", default="kd", help="strategy of the client-level Gaussian runs"
    )
    parser.add_argument("--clip", type=float, default=100.0, help="client_gaussian L2 bound")
    parser.add_argument("--pate-queries", type=int, default=200)
    parser.add_argument("overrides", nargs="*", help="field=value, applied to every run")
    args = parser.parse_args(argv)
    out = Path(args.out or f"runs/privacy-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    runs = settings(args)
    rows: list[dict] = []
    setting = ""
    for i, (mech, sigma, extra) in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {mech} sigma={sigma} ...", flush=True)
        overrides = [*args.overrides, *extra, "baseline=false", f"output_dir={out}"]
        result = fedkd.run("simulations/quickstart.toml", overrides, quiet=True)
        rows.append(_row(mech, sigma, result))
        r = rows[-1]
        print(
            f"    epsilon {r['epsilon']:.3g}, students {_pct(r['students'])}, "
            f"server {_pct(r['server_model'])}, MIA advantage {_num(r['mia_advantage'])}",
            flush=True,
        )
        s = result.summary
        setting = (
            f"{s.data}; {s.clients} clients; up to {s.rounds} rounds; "
            f"strategies as in the table; seed {result.config.seed}"
        )
        (out / "privacy_utility.json").write_text(
            json.dumps({"setting": setting, "rows": rows}, indent=2, default=str)
        )
        (out / "privacy_utility.md").write_text(markdown(rows, setting))
    plot(rows, out / "privacy_utility.png")
    print("\n" + markdown(rows, setting) + f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
