"""Benchmark: fedkd (Flower + Ray) against a plain single-process PyTorch loop.

Both sides do the same work: the same data, student and teacher models, seeds,
epochs and batches of the ``kd`` strategy. The plain loop keeps every model in
memory and calls the training functions directly: no Flower, no Ray, no
serialisation. Each side runs in a fresh process, one after the other
(interleaved when repeated), and we report start-up (process start to the first
round), the median seconds per round, and their ratio. The plain loop also checks
that it reproduces fedkd's accuracies exactly.

Run: ``fedkd bench [--repeats N] [field=value ...]`` or ``python simulations/benchmark.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def plain_loop(overrides: list[str], started: float) -> dict[str, Any]:
    """The reference: the kd strategy's rounds written as one plain PyTorch loop."""
    import numpy as np
    import torch

    from fedkd.assignment import student_spec
    from fedkd.config import load_config
    from fedkd.data import prepare_federated_data
    from fedkd.losses import SoftKL
    from fedkd.models import build_model
    from fedkd.seeding import derive_seed, torch_generator
    from fedkd.training import (
        KDTargets,
        distill,
        evaluate,
        make_optimizer,
        predict_logits,
        to_tensor,
        train_supervised,
    )

    cfg = load_config(None, overrides)
    if cfg.strategy.name != "kd" or cfg.server.public_subset or cfg.clients.fraction < 1:
        raise SystemExit("the plain loop mirrors strategy 'kd' on the full public set only")
    p = cfg.strategy.params
    temperature, kd_weight = p.get("temperature", 3.0), p.get("kd_weight", 0.5)
    torch.set_num_threads(cfg.simulation.threads)
    data, _ = prepare_federated_data(cfg)
    shape, classes = data.input_shape, data.num_classes
    public_x, test_x, test_y = (to_tensor(a) for a in (data.public_x, data.test_x, data.test_y))
    clients = []
    for cid in range(cfg.clients.count):
        model = build_model(
            student_spec(cfg, cid), shape, classes, derive_seed(cfg.seed, "student", cid)
        )
        part = data.client(cid)
        opt = make_optimizer(cfg.clients.optimizer, model, cfg.clients.lr)
        clients.append((model, opt, to_tensor(part.x), to_tensor(part.y)))
    teacher = build_model(cfg.server.teacher, shape, classes, derive_seed(cfg.seed, "teacher"))
    teacher_opt = make_optimizer(cfg.server.optimizer, teacher, cfg.server.lr)
    loss = SoftKL(temperature)
    targets = None
    seconds, accuracies = [], []
    first_round_at = time.time()
    for rnd in range(1, cfg.rounds + 1):
        start = time.perf_counter()
        logits, accs = [], []
        for cid, (model, opt, x, y) in enumerate(clients):
            torch.manual_seed(derive_seed(cfg.seed, "client-global", rnd, cid))
            train_supervised(
                model,
                opt,
                x,
                y,
                epochs=cfg.clients.local_epochs,
                batch_size=cfg.clients.batch_size,
                generator=torch_generator(cfg.seed, "client", rnd, cid),
                kd=None if targets is None else KDTargets(public_x, targets, loss),
                kd_weight=kd_weight,
            )
            logits.append(predict_logits(model, public_x))
            accs.append(evaluate(model, test_x, test_y)["accuracy"])
        torch.manual_seed(derive_seed(cfg.seed, "server-global", rnd))
        stacked = np.stack([t.numpy() for t in logits]).astype(np.float64)
        weights = np.full(len(logits), 1.0 / len(logits))  # the same float maths as Logits.mean
        mean = torch.from_numpy(np.tensordot(weights, stacked, axes=1).astype(np.float32))
        distill(
            teacher,
            teacher_opt,
            KDTargets(public_x, mean, loss),
            epochs=cfg.server.epochs,
            batch_size=cfg.server.batch_size,
            generator=torch_generator(cfg.seed, "server", rnd),
        )
        targets = predict_logits(teacher, public_x)
        seconds.append(time.perf_counter() - start)
        accuracies.append(accs)
    return {
        "startup_s": first_round_at - started,
        "round_s": seconds,
        "accuracies": accuracies,
    }


def _fedkd_side(overrides: list[str]) -> dict[str, Any]:
    from fedkd.results import read_rounds, read_summary

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fedkd.cli", "run", "-q", *overrides]
        cmd += ["baseline=false", f"output_dir={tmp}"]
        spawned = time.time()
        subprocess.run(cmd, check=True)
        (run_dir,) = Path(tmp).iterdir()
        summary = read_summary(run_dir)
        rounds = read_rounds(run_dir / "metrics.jsonl")
    return {
        "startup_s": summary.timing["rounds_started_at"] - spawned,
        "round_s": [r.seconds for r in rounds],
        "accuracies": [[r.clients[c].accuracy for c in sorted(r.clients)] for r in rounds],
    }


def _plain_side(overrides: list[str]) -> dict[str, Any]:
    code = (
        "import time; t = time.time(); import json, sys; from fedkd.bench import plain_loop; "
        "print(json.dumps(plain_loop(sys.argv[1:], t)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *overrides], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedkd bench", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs of each side")
    parser.add_argument("overrides", nargs="*", help="field=value, applied to both sides")
    args = parser.parse_args(argv)
    from fedkd.config import load_config
    from fedkd.data import prepare_federated_data

    prepare_federated_data(load_config(None, args.overrides))  # both sides start with data cached
    fed: list[dict[str, Any]] = []
    plain: list[dict[str, Any]] = []
    for i in range(args.repeats):
        print(f"[{i + 1}/{args.repeats}] fedkd (Flower + Ray)...", flush=True)
        fed.append(_fedkd_side(args.overrides))
        print(f"[{i + 1}/{args.repeats}] plain PyTorch loop...", flush=True)
        plain.append(_plain_side(args.overrides))

    def med(runs: list[dict[str, Any]], key: str) -> float:
        if key == "round_s":
            return statistics.median(s for r in runs for s in r["round_s"])
        return statistics.median(r[key] for r in runs)

    same = all(f["accuracies"] == p["accuracies"] for f, p in zip(fed, plain, strict=True))
    rows = [
        ("start-up (process start to round 1), s", med(fed, "startup_s"), med(plain, "startup_s")),
        ("median seconds per round", med(fed, "round_s"), med(plain, "round_s")),
    ]
    print(f"\n{'':42}{'fedkd':>10}{'plain':>10}{'ratio':>10}")
    for label, a, b in rows:
        print(f"{label:42}{a:>10.2f}{b:>10.2f}{a / b:>10.2f}")
    print(f"same per-round accuracies on both sides: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
