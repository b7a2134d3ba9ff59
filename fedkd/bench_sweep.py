"""``fedkd bench --sweep``: a sweep run one experiment at a time against the same sweep
under :func:`fedkd.run_many`.

One side calls :func:`fedkd.run` once per experiment, as separate ``fedkd run`` calls
(or the sweep scripts before ``run_many``) did: each pays Ray's start and the workers'
imports. The other runs them all under one Ray start. Each side runs in a fresh
process, interleaved with the other when repeated, on data cached beforehand; we
report the wall time from process start to the last summary, and check that both sides
produce the same accuracies, experiment by experiment and round by round.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: the strategies swept by default (each with its config in simulations/)
STRATEGIES = ("kd", "fedmd", "dsfl", "fd")

SIMULATIONS = Path(__file__).resolve().parent.parent / "simulations"

#: the two sides, by name: what each does
SIDES = {
    "one-by-one": "fedkd.run per experiment (a Ray start each)",
    "run_many": "fedkd.run_many (one Ray start)",
}


def experiments(
    strategies: list[str], seeds: int, overrides: list[str], out: str
) -> list[tuple[str, list[str]]]:
    """Each strategy's config (kd's is the quick start) with the shared overrides."""
    specs = []
    for name in strategies:
        config = SIMULATIONS / ("quickstart.toml" if name == "kd" else f"{name}.toml")
        if not config.is_file():
            raise SystemExit(f"fedkd bench --sweep: no config for strategy {name} ({config})")
        extra = [f"seeds={seeds}"] if seeds > 1 else []
        specs.append((str(config), [*overrides, *extra, "baseline=false", f"output_dir={out}"]))
    return specs


def side(mode: str, specs: list[tuple[str, list[str]]], started: float) -> dict[str, Any]:
    """Run the sweep one way (in this process): wall seconds and every accuracy."""
    import fedkd

    if mode == "one-by-one":
        results = [fedkd.run(config, overrides, quiet=True) for config, overrides in specs]
    else:
        results = fedkd.run_many(specs, quiet=True)
    return {"wall_s": time.time() - started, "accuracies": [_accuracies(r) for r in results]}


def _accuracies(result: Any) -> list[list[list[float]]]:
    """Per seed (one for a one-seed run), per round, each client's test accuracy."""
    runs = result.runs.values() if hasattr(result, "runs") else [result]
    return [
        [[r.clients[c].accuracy for c in sorted(r.clients)] for r in run.rounds] for run in runs
    ]


def _run_side(mode: str, specs: list[tuple[str, list[str]]]) -> dict[str, Any]:
    code = (
        "import time; t = time.time(); import json, sys; from fedkd.bench_sweep import side; "
        "print(json.dumps(side(sys.argv[1], json.loads(sys.argv[2]), t)))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, mode, json.dumps(specs)], capture_output=True, text=True
    )
    if proc.returncode:
        raise SystemExit(f"fedkd bench --sweep: the {mode} side failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sweep_bench(strategies: list[str], seeds: int, overrides: list[str], repeats: int) -> int:
    """Time both sides ``repeats`` times, interleaved; print the medians. 1 if the
    accuracies differ."""
    from fedkd.config import load_config
    from fedkd.data import prepare_federated_data

    with tempfile.TemporaryDirectory() as tmp:
        specs = experiments(strategies, seeds, overrides, tmp)
        for config, extra in specs:  # cache the data: neither side's time includes it
            cfg = load_config(config, extra)
            for seed in cfg.seeds or [cfg.seed]:
                prepare_federated_data(load_config(config, [*extra, "seeds=[]", f"seed={seed}"]))
        runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in SIDES}
        for i in range(repeats):
            for mode in SIDES:
                print(f"[{i + 1}/{repeats}] {SIDES[mode]}...", flush=True)
                runs[mode].append(_run_side(mode, specs))
    accuracies = [r["accuracies"] for rs in runs.values() for r in rs]
    same = all(a == accuracies[0] for a in accuracies)
    n = len(specs)
    print(
        f"\n{n} experiments (strategies {', '.join(strategies)}; "
        f"{seeds} seed{'s' if seeds > 1 else ''} each; overrides {' '.join(overrides) or 'none'}); "
        f"medians over {repeats} interleaved runs of each side, process start to last summary"
    )
    walls = {mode: statistics.median(r["wall_s"] for r in rs) for mode, rs in runs.items()}
    print(f"\n{'':44}{'one by one':>12}{'run_many':>12}{'ratio':>10}")
    a, b = walls["one-by-one"], walls["run_many"]
    print(f"{'wall time, s':44}{a:>12.2f}{b:>12.2f}{b / a:>10.2f}")
    print(f"{'per experiment, s':44}{a / n:>12.2f}{b / n:>12.2f}")
    print(f"same accuracies on both sides: {'yes' if same else 'NO'}")
    return 0 if same else 1
