"""Privacy-utility sweep: accuracy and membership-inference advantage against epsilon.

    python simulations/privacy_sweep.py [--out DIR] [--sigmas-dpsgd 0.5,1,2] ... [field=value ...]

Runs the default MNIST-1D setting without DP, then with each mechanism at each
noise level: DP-SGD (record-level) with ``--strategy`` (default ``dsfl``, which
keeps learning under DP-SGD where ``kd``'s logit-averaged teacher does not), the
client-level Gaussian mechanism with central noise with ``--central-strategy``
(default ``kd``: its logits survive clipping and noise better than DS-FL's
ERA-sharpened soft labels), and PATE (client-level;
``strategy = pate``, 200 queries, threshold-check noise equal to sigma; PATE's own
default mode, one-shot: teachers trained over the rounds, queried once at the end).
Every setting runs over ``--seeds`` seeds (default 5: seeds 0..4; all settings under
one Ray start, ``fedkd.run_many``) and every figure is the mean +- std over them.
Writes ``privacy_utility.md``, ``privacy_utility.json`` and ``privacy_utility.png``
(student and server-model accuracy against epsilon; audit advantage against epsilon)
to ``--out`` (default ``runs/privacy-<timestamp>``); every run's own directory is kept.
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


def _spread(result: fedkd.SeedsResult, key: str) -> tuple[float, float] | None:
    spread = result.summary.metrics.get(key)
    return None if spread is None else (spread.mean, spread.std)


def _row(mechanism: str, sigma: float | None, result: fedkd.SeedsResult) -> dict:
    runs = [r.summary for r in result.runs.values()]
    priv = next((r.privacy for r in runs if r.privacy is not None), None)
    return {
        "mechanism": mechanism,
        "strategy": result.config.strategy.name,
        "sigma": sigma,
        "seeds": list(result.summary.seeds),
        "unit": priv.unit if priv else "-",
        # the largest epsilon any seed spent (equal across seeds for data-independent bounds)
        "epsilon": max((r.privacy.epsilon for r in runs if r.privacy), default=math.inf),
        "epsilon_data_dependent": _spread(result, "epsilon_data_dependent"),
        "delta": priv.delta if priv else None,
        "rounds": max((r.rounds_completed for r in runs), default=0),
        "students": _spread(result, "students"),
        "server_model": _spread(result, "server_model"),
        "mia_auc": _spread(result, "mia_auc"),
        "mia_advantage": _spread(result, "mia_advantage"),
        "status": result.summary.status,
        "total_s": sum(r.timing["total_s"] for r in runs),
        "directory": str(result.directory),
    }


def _pct(x: tuple[float, float] | None) -> str:
    return "-" if x is None else f"{100 * x[0]:.1f} +- {100 * x[1]:.1f}%"


def _num(x: tuple[float, float] | None) -> str:
    return "-" if x is None else f"{x[0]:.3f} +- {x[1]:.3f}"


def _eps(r: dict) -> str:
    if math.isinf(r["epsilon"]):
        return "inf (no DP)"
    dd = r["epsilon_data_dependent"]
    extra = "" if dd is None else f" (data-dependent {dd[0]:.3g} +- {dd[1]:.2g})"
    return f"{r['epsilon']:.3g}{extra}"


def markdown(rows: list[dict], setting: str) -> str:
    lines = [
        f"Setting: {setting}",
        "",
        "| mechanism | strategy | sigma | privacy unit | epsilon | rounds | students "
        "| server model | MIA AUC | MIA advantage | wall time |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        unit = r["unit"].split(" (")[0]
        sigma = "-" if r["sigma"] is None else format(r["sigma"], "g")
        lines.append(
            f"| {r['mechanism']} | {r['strategy']} | {sigma} | {unit} | {_eps(r)} "
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
    base = next((r for r in rows if r["sigma"] is None), None)  # no noise: the reference
    curves: dict[str, list[dict]] = {}  # one curve per mechanism label, in sweep order
    for r in rows:
        if r["sigma"] is not None:
            curves.setdefault(r["mechanism"], []).append(r)
    for i, (mech, points) in enumerate(curves.items()):
        pts = sorted(points, key=lambda r: r["epsilon"])
        eps = [r["epsilon"] for r in pts]
        color = f"C{i}"
        acc.plot(
            eps,
            [100 * (r["students"] or (0, 0))[0] for r in pts],
            "o-",
            color=color,
            label=f"{mech} ({pts[0]['strategy']}): students",
        )
        if any(r["server_model"] is not None for r in pts):
            acc.plot(
                eps,
                [100 * (r["server_model"] or (0, 0))[0] for r in pts],
                "s--",
                color=color,
                label=f"{mech}: server model",
            )
        adv = [(r["mia_advantage"] or (0, 0))[0] for r in pts]
        mia.plot(eps, adv, "o-", color=color, label=mech)
    if base is not None:
        label = f"no DP ({base['strategy']})"
        students = (base["students"] or (0, 0))[0]
        acc.axhline(100 * students, color="gray", ls=":", label=f"{label}: students")
        mia.axhline((base["mia_advantage"] or (0, 0))[0], color="gray", ls=":", label=label)
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
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per setting")
    parser.add_argument("overrides", nargs="*", help="field=value, applied to every run")
    args = parser.parse_args(argv)
    out = Path(args.out or f"runs/privacy-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    runs = settings(args)
    rows: list[dict] = []
    setting = ""
    common = [*args.overrides, "baseline=false", f"seeds={args.seeds}", f"output_dir={out}"]
    print(f"{len(runs)} settings x {args.seeds} seeds under one Ray start ...", flush=True)

    def done(i: int, result: fedkd.SeedsResult) -> None:
        nonlocal setting
        if not isinstance(result, fedkd.SeedsResult):
            raise SystemExit("privacy_sweep: expected a multi-seed run (seeds=...)")
        mech, sigma, _ = runs[i]
        rows.append(_row(mech, sigma, result))
        r = rows[-1]
        print(
            f"[{i + 1}/{len(runs)}] {mech} sigma={sigma}: epsilon {_eps(r)}, students "
            f"{_pct(r['students'])}, server {_pct(r['server_model'])}, MIA advantage "
            f"{_num(r['mia_advantage'])}; {r['status']}",
            flush=True,
        )
        first = next(iter(result.runs.values())).summary
        setting = (
            f"{first.data}; {first.clients} clients; up to {first.rounds} rounds; "
            f"strategies as in the table; mean +- std over seeds {r['seeds']}"
        )
        # written after every setting, so an interrupted sweep keeps what it has
        (out / "privacy_utility.json").write_text(
            json.dumps({"setting": setting, "rows": rows}, indent=2, default=str)
        )
        (out / "privacy_utility.md").write_text(markdown(rows, setting))

    experiments = [("simulations/quickstart.toml", [*common, *extra]) for _, _, extra in runs]
    fedkd.run_many(experiments, quiet=True, on_result=done)
    plot(rows, out / "privacy_utility.png")
    print("\n" + markdown(rows, setting) + f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
