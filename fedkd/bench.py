"""Benchmark: fedkd (Flower + Ray) against a plain single-process PyTorch loop.

Both sides do the same work: the same data, student and teacher models, seeds,
epochs and batches of the ``kd`` strategy, and the same evaluation (each student's
test accuracy and loss and own-distribution accuracy, the teacher's test accuracy;
the membership audit on both sides with ``--audit``, else on neither). The plain
loop keeps every model in memory and calls the training functions directly: no
Flower, no Ray, no serialisation. Each side runs in a fresh process, one after the other
(interleaved when repeated), and we report start-up (process start to the first
round), the median seconds per round, and their ratio. The plain loop also checks
that it reproduces fedkd's accuracies: exactly, or, where fedkd vectorises
(``simulation.vectorize``: batched kernels sum in another order), within
:data:`TOLERANCE` of each client's accuracy, with the largest difference reported.

``--scaling`` times 10, 100 and 1000 clients per round, each with the plain loop and
fedkd's ways of running a round's clients (:data:`VARIANTS`, ``--variants`` for a
subset): a Flower task per client, one long-lived task per worker carrying its
share of the round's clients, and that share trained together (vectorised).

``--sweep`` times a sweep of strategies run one by one against ``fedkd.run_many``
(:mod:`fedkd.bench_sweep`).

Run: ``fedkd bench [--repeats N] [field=value ...]``, ``fedkd bench --scaling
[--variants per-client,actor] [--clients N] [--rounds R] [--out DIR]``, ``fedkd bench
--sweep [--strategies kd,fedmd] [--seeds S] [--repeats N]``, or
``python simulations/benchmark.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedkd.config import apply_overrides, load_config
from fedkd.cpu_usage import KINDS, CPUTrace

#: the strategy the plain loop writes out by hand (both sides run it)
MIRRORED = "kd"

#: what each side does per round, printed with the figures
WORK = (
    "both sides: strategy {strategy}, the same data, models, seeds, epochs and batches; "
    "per client: local training with KD, public logits, test accuracy and loss, "
    "own-distribution accuracy{audit}; server: teacher distillation, teacher test accuracy"
)

#: where fedkd vectorises, the largest difference allowed in a round's mean client test
#: accuracy: batched kernels sum in another order, and over hundreds of local Adam steps
#: that rounding can move a single client's accuracy by a point or two (float64 agrees
#: to 1e-14: tests/test_vectorize.py), while the round's mean stays within this
TOLERANCE = 0.005

#: --scaling: fedkd's ways of running a round's clients, by name: label and overrides
#: (``{per_worker}``: the round's clients over the workers that run at once, rounded up)
VARIANTS = {
    "per-client": (
        "per-client tasks",
        ("simulation.clients_per_message=1", "simulation.vectorize=false"),
    ),
    "actor": (
        "one actor per worker",
        ("simulation.clients_per_message={per_worker}", "simulation.vectorize=false"),
    ),
    "vectorised": (
        "vectorised",
        ("simulation.clients_per_message=0", "simulation.vectorize=true"),
    ),
}

#: what --scaling sets for each variant, so the user may not
VARIANT_KEYS = ("clients_per_message", "vectorize")

#: one table of accuracies: per round, each sampled client's (in client order)
Accuracies = list[list[float]]


def plain_loop(overrides: list[str], started: float) -> dict[str, Any]:
    """The reference: the kd strategy's rounds written as one plain PyTorch loop, with
    the same evaluation as fedkd's runtime (and its membership audit where it is on)."""
    import torch

    from fedkd.data import prepare_federated_data

    cfg = load_config(None, overrides)
    if cfg.server.public_subset:
        raise SystemExit("the plain loop mirrors the full public set only")
    torch.set_num_threads(cfg.simulation.threads)
    data, _ = prepare_federated_data(cfg)
    world = _PlainWorld.build(cfg, data)
    targets = None
    seconds, accuracies = [], []
    first_round_at = time.time()
    for rnd in range(1, cfg.rounds + 1):
        start = time.perf_counter()
        targets, accs = world.round(rnd, targets)
        seconds.append(time.perf_counter() - start)
        accuracies.append(accs)
    return {
        "startup_s": first_round_at - started,
        "first_round_at": first_round_at,
        "round_s": seconds,
        "accuracies": accuracies,
    }


class _PlainWorld:
    """Every model of the plain loop in memory, and one round of the kd strategy."""

    def __init__(self, cfg: Any, data: Any, teacher: Any, teacher_opt: Any):
        from fedkd.losses import SoftKL
        from fedkd.training import to_tensor

        self.cfg, self.data = cfg, data
        self.clients: dict[int, tuple] = {}  # built when first sampled, kept in memory
        self.teacher, self.teacher_opt = teacher, teacher_opt
        self.public_x, self.test_x, self.test_y = (
            to_tensor(a) for a in (data.public_x, data.test_x, data.test_y)
        )
        p = cfg.strategy.params
        self.kd_weight = p.get("kd_weight", 0.5)
        self.loss = SoftKL(p.get("temperature", 3.0))

    @classmethod
    def build(cls, cfg: Any, data: Any) -> _PlainWorld:
        """The teacher, seeded as fedkd seeds it (students come when first sampled)."""
        from fedkd.models import build_model
        from fedkd.seeding import derive_seed
        from fedkd.training import make_optimizer

        shape, classes = data.input_shape, data.num_classes
        teacher = build_model(cfg.server.teacher, shape, classes, derive_seed(cfg.seed, "teacher"))
        teacher_opt = make_optimizer(cfg.server.optimizer, teacher, cfg.server.lr)
        return cls(cfg, data, teacher, teacher_opt)

    def client(self, cid: int) -> tuple:
        """Client ``cid``'s student, optimizer and private data, seeded as fedkd seeds them."""
        if cid not in self.clients:
            from fedkd.assignment import student_spec
            from fedkd.models import build_model
            from fedkd.seeding import derive_seed
            from fedkd.training import make_optimizer, to_tensor

            seed = derive_seed(self.cfg.seed, "student", cid)
            d = self.data
            model = build_model(student_spec(self.cfg, cid), d.input_shape, d.num_classes, seed)
            part = d.client(cid)
            opt = make_optimizer(self.cfg.clients.optimizer, model, self.cfg.clients.lr)
            self.clients[cid] = (model, opt, to_tensor(part.x), to_tensor(part.y))
        return self.clients[cid]

    def round(self, rnd: int, targets: Any) -> tuple[Any, list[float]]:
        """One round: the sampled clients train and are evaluated, the teacher distills the
        mean of their public logits; returns the next targets and their accuracies."""
        import numpy as np
        import torch

        from fedkd.assignment import sample_clients
        from fedkd.seeding import derive_seed, seed_torch, torch_generator
        from fedkd.training import KDTargets, distill, evaluate, predict_logits

        cfg = self.cfg
        logits, accs = [], []
        for cid in sample_clients(cfg, rnd):
            client = self.client(cid)
            seed_torch(derive_seed(cfg.seed, "client-global", rnd, cid))
            logits.append(self._client(rnd, cid, client, targets))
            accs.append(self._evaluate(client))
        seed_torch(derive_seed(cfg.seed, "server-global", rnd))
        stacked = np.stack([t.numpy() for t in logits]).astype(np.float64)
        weights = np.full(len(logits), 1.0 / len(logits))  # the same float maths as Logits.mean
        mean = torch.from_numpy(np.tensordot(weights, stacked, axes=1).astype(np.float32))
        distill(
            self.teacher,
            self.teacher_opt,
            KDTargets(self.public_x, mean, self.loss),
            epochs=cfg.server.epochs,
            batch_size=cfg.server.batch_size,
            generator=torch_generator(cfg.seed, "server", rnd),
        )
        evaluate(self.teacher, self.test_x, self.test_y)  # fedkd reports the teacher too
        return predict_logits(self.teacher, self.public_x), accs

    def _client(self, rnd: int, cid: int, client: tuple, targets: Any) -> Any:
        """Local training with KD towards ``targets``; the student's public logits."""
        from fedkd.seeding import torch_generator
        from fedkd.training import KDTargets, predict_logits, train_supervised

        model, opt, x, y = client
        c = self.cfg.clients
        train_supervised(
            model,
            opt,
            x,
            y,
            epochs=c.local_epochs,
            batch_size=c.batch_size,
            generator=torch_generator(self.cfg.seed, "client", rnd, cid),
            kd=None if targets is None else KDTargets(self.public_x, targets, self.loss),
            kd_weight=self.kd_weight,
        )
        return predict_logits(model, self.public_x)

    def _evaluate(self, client: tuple) -> float:
        """fedkd's per-client evaluation: test accuracy and loss, own-distribution
        accuracy and, where ``privacy.audit`` is on, the membership audit."""
        from fedkd.client import label_weighted_accuracy
        from fedkd.training import logit_metrics, predict_logits

        model, _, x, y = client
        test_logits = predict_logits(model, self.test_x)
        metrics = logit_metrics(test_logits, self.test_y)
        label_weighted_accuracy(test_logits, self.test_y, y, self.data.num_classes)
        if self.cfg.privacy.audit:
            from fedkd.privacy.audit import loss_attack

            loss_attack(model, (x, y), (self.test_x, self.test_y))
        return metrics["accuracy"]


def _fedkd_side(overrides: list[str]) -> dict[str, Any]:
    from fedkd.results import read_rounds, read_summary

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fedkd.cli", "run", "-q", *overrides]
        cmd += ["baseline=false", f"output_dir={tmp}"]
        spawned = time.time()
        # the CPU is counted up to round 1 only: stop sampling once it has ended, not
        # to take time from the rounds being timed
        peak, cpu = _run_measured(cmd, until=lambda: any(Path(tmp).glob("*/metrics.jsonl")))
        (run_dir,) = Path(tmp).iterdir()
        summary = read_summary(run_dir)
        rounds = read_rounds(run_dir / "metrics.jsonl")
    return {
        "startup_s": summary.timing["rounds_started_at"] - spawned,
        "startup_cpu": cpu.at(summary.timing["rounds_started_at"]),
        # of which: before the engine starts (imports, checks, data, models, run folder),
        # then Ray's start and every worker's imports and warm-up
        "before_engine_s": summary.timing["engine_started_at"] - spawned,
        "engine_s": summary.timing["clients_ready_at"] - summary.timing["engine_started_at"],
        "round_s": [r.seconds for r in rounds],
        "accuracies": [[r.clients[c].accuracy for c in sorted(r.clients)] for r in rounds],
        "peak_mb": peak,
    }


def _run_measured(
    cmd: list[str], stdout: Any = None, until: Callable[[], bool] | None = None
) -> tuple[float, CPUTrace]:
    """Run ``cmd`` (it must succeed); the peak PSS of it and its processes, in MB, and
    their CPU time as it grew (sampled until ``until`` returns true)."""
    from fedkd.memory import PeakPSS

    proc = subprocess.Popen(cmd, stdout=stdout, text=True)
    with PeakPSS(proc.pid) as peak, CPUTrace(proc.pid, until=until) as cpu:
        proc.wait()
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return peak.peak_mb, cpu


def _plain_side(overrides: list[str]) -> dict[str, Any]:
    code = (
        "import time; t = time.time(); import json, sys; from fedkd.bench import plain_loop; "
        "print(json.dumps(plain_loop(sys.argv[1:], t)))"
    )
    with tempfile.TemporaryFile("w+") as out:
        peak, cpu = _run_measured([sys.executable, "-c", code, *overrides], stdout=out)
        out.seek(0)
        lines = out.read().strip().splitlines()
    run = json.loads(lines[-1])
    return {**run, "startup_cpu": cpu.at(run["first_round_at"]), "peak_mb": peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedkd bench", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each side")
    parser.add_argument(
        "--audit",
        action="store_true",
        help="run the membership audit on both sides (default: neither)",
    )
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="clients per round 10/100/1000 of --clients (one run of the plain loop and of "
        "each fedkd variant each), as a table, scaling.json and scaling.png in --out",
    )
    parser.add_argument("--clients", type=int, default=10_000, help="--scaling: clients in all")
    parser.add_argument("--rounds", type=int, default=3, help="--scaling: rounds per run")
    parser.add_argument(
        "--out",
        default=None,
        help="folder for the figures: bench.json (every run's), or with --scaling "
        "scaling.json and scaling.png (default: this folder)",
    )
    parser.add_argument(
        "--variants",
        type=_variant_names,
        help=f"--scaling: the fedkd variants to run, a comma list of {', '.join(VARIANTS)} "
        "(default: all)",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="--strategies run one by one (a Ray start each) against fedkd.run_many (one "
        "Ray start), interleaved --repeats times",
    )
    parser.add_argument(
        "--strategies", default="kd,fedmd,dsfl,fd", help="--sweep: the strategies swept"
    )
    parser.add_argument("--seeds", type=int, default=1, help="--sweep: seeds per strategy")
    parser.add_argument("overrides", nargs="*", help="field=value, applied to both sides")
    args = parser.parse_args(argv)
    if args.scaling:
        return _scaling(args)
    if args.sweep:
        from fedkd.bench_sweep import sweep_bench

        if args.out is not None:
            parser.error("--out is for the plain comparison and --scaling, not --sweep")

        names = [n.strip() for n in args.strategies.split(",") if n.strip()]
        return sweep_bench(names, args.seeds, args.overrides, args.repeats)
    if args.variants is not None:
        parser.error("--variants needs --scaling")
    overrides = _both_sides(args.overrides, args.audit)
    fed, plain = _compare(overrides, args.repeats)
    code = _report(fed, plain, args.audit, _tolerance(overrides))
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        figures = {"overrides": overrides, "cores": cores(), "fedkd": fed, "plain": plain}
        (out / "bench.json").write_text(json.dumps(figures, indent=1))
        print(f"every run's figures: {out / 'bench.json'}")
    return code


def _variant_names(text: str) -> list[str]:
    """``--variants``: known variant names, in the order given, each once."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"{', '.join(unknown) or 'none given'}: choose from {', '.join(VARIANTS)}"
        )
    return names


def _tolerance(fedkd_overrides: list[str]) -> float:
    """The accuracy tolerance for a fedkd run with these overrides: :data:`TOLERANCE`
    where they turn ``simulation.vectorize`` on (sums in another order), else 0 (exact)."""
    return TOLERANCE if load_config(None, fedkd_overrides).simulation.vectorize else 0.0


def same_accuracies(
    fed: list[Accuracies], plain: list[Accuracies], tolerance: float = 0.0
) -> tuple[bool, str]:
    """Whether fedkd's runs reproduce the plain loop's accuracies (run by run, round by
    round), and how to say so: with no ``tolerance``, every client's exactly ("yes" /
    "NO"); else each round's mean over its clients within it, with the largest mean and
    single-client differences reported. Different rounds or clients are never the same."""
    shaped = len(fed) == len(plain) and all(
        len(f) == len(p) and all(len(a) == len(b) for a, b in zip(f, p, strict=True))
        for f, p in zip(fed, plain, strict=True)
    )
    if not tolerance:
        same = shaped and fed == plain
        return same, "yes" if same else "NO"
    if not shaped:
        return False, "NO (vectorised: different rounds or clients)"
    pairs = [(a, b) for f, p in zip(fed, plain, strict=True) for a, b in zip(f, p, strict=True)]
    means = [abs(statistics.fmean(a) - statistics.fmean(b)) for a, b in pairs if a]
    clients = [abs(x - y) for a, b in pairs for x, y in zip(a, b, strict=True)]
    largest = max(means, default=0.0)
    same = largest <= tolerance + 1e-9
    verdict = (
        f"round means within {tolerance:g}" if same else f"NO, round means not within {tolerance:g}"
    )
    return same, (
        f"{verdict} (vectorised: largest {largest:.4f}; one client's: "
        f"{max(clients, default=0.0):.3f})"
    )


def _prepare(overrides: list[str]) -> None:
    """Cache the data first, so neither side's start-up includes making it."""
    from fedkd.data import prepare_federated_data

    prepare_federated_data(load_config(None, overrides))


def _compare(overrides: list[str], repeats: int) -> tuple[list[dict], list[dict]]:
    """``repeats`` interleaved runs of each side, on data cached beforehand."""
    _prepare(overrides)
    fed: list[dict[str, Any]] = []
    plain: list[dict[str, Any]] = []
    for i in range(repeats):
        print(f"[{i + 1}/{repeats}] fedkd (Flower + Ray)...", flush=True)
        fed.append(_fedkd_side(overrides))
        print(f"[{i + 1}/{repeats}] plain PyTorch loop...", flush=True)
        plain.append(_plain_side(overrides))
    return fed, plain


def _med(runs: list[dict[str, Any]], key: str) -> float:
    """The median of ``key`` over runs (over all their rounds for ``round_s``; of the
    total over kinds for ``startup_cpu``, or of one kind's for ``startup_cpu.KIND``)."""
    if key == "round_s":
        return statistics.median(s for r in runs for s in r["round_s"])
    if key.startswith("startup_cpu"):
        kinds = KINDS if key == "startup_cpu" else (key.split(".", 1)[1],)
        return statistics.median(sum(r["startup_cpu"][k] for k in kinds) for r in runs)
    return statistics.median(r[key] for r in runs)


def cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS says, or fewer
    where a cgroup (v2) CPU quota allows less (e.g. a container limited to 2 CPUs)."""
    import math
    import os

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n or 1, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n or 1


def pair_ratios(fed: list[dict[str, Any]], plain: list[dict[str, Any]]) -> list[float]:
    """Each interleaved pair's ratio of median seconds per round (fedkd over plain)."""
    return [_med([f], "round_s") / _med([p], "round_s") for f, p in zip(fed, plain, strict=True)]


#: fedkd's start-up in two parts, printed below it
STARTUP_PARTS = (
    ("before Ray: imports, checks, data, models", "before_engine_s"),
    ("Ray's start, workers' imports and warm-up", "engine_s"),
)

#: the start-up's CPU seconds by kind of process (:data:`fedkd.cpu_usage.KINDS`)
CPU_PARTS = {
    "process": "the run's own process",
    "workers": "Ray's worker processes",
    "ray": "Ray's own services (GCS, raylet, ...)",
}

ROWS = (
    ("start-up (process start to round 1), s", "startup_s"),
    ("median seconds per round", "round_s"),
    ("peak memory (PSS, all processes), MB", "peak_mb"),
)


def refuse_variant_overrides(overrides: list[str]) -> None:
    """--scaling sets ``simulation.clients_per_message`` and ``simulation.vectorize`` per
    variant: refuse them from the user (dotted, or inside a ``simulation`` table)."""
    try:
        sim = apply_overrides({}, overrides).get("simulation")
    except ValueError:
        return  # malformed: the runs' own config loading says what is wrong
    given = [k for k in VARIANT_KEYS if isinstance(sim, dict) and k in sim]
    if given:
        raise SystemExit(
            f"fedkd bench --scaling: simulation.{given[0]} is set by each variant "
            f"({', '.join(VARIANTS)}); choose variants with --variants instead"
        )


def row_overrides(
    overrides: list[str], clients: int, per_round: int, rounds: int, audit: bool
) -> list[str]:
    """Both sides' overrides for a --scaling row: ``per_round`` of ``clients`` clients,
    iid, with enough private data for them all."""
    extra = [f"clients.count={clients}", f"clients.fraction={per_round / clients}"]
    extra += [f"data.private={max(50_000, 5 * clients)}", "partition.name=iid"]
    return _both_sides([*overrides, *extra, f"rounds={rounds}"], audit)


def variant_overrides(overrides: list[str], variant: str) -> list[str]:
    """fedkd's overrides for ``variant`` of a row with these (both sides') overrides:
    "actor" carries the round's clients over the workers that run at once
    (:func:`fedkd.flower.local_workers`), one message each."""
    from fedkd.assignment import clients_per_round
    from fedkd.flower import local_workers

    cfg = load_config(None, overrides)
    per_worker = -(-clients_per_round(cfg) // local_workers(cfg))
    _, extra = VARIANTS[variant]
    return [*overrides, *(e.format(per_worker=per_worker) for e in extra)]


def _scaling(args: argparse.Namespace) -> int:
    """The plain loop and each fedkd variant at 10, 100 and 1000 clients per round of
    ``args.clients``: a table, ``scaling.json`` and ``scaling.png``."""
    refuse_variant_overrides(args.overrides)
    variants = args.variants or list(VARIANTS)
    n, rows = args.clients, []
    for per_round in (k for k in (10, 100, 1000) if k <= n):
        print(f"--- {per_round} clients per round of {n} ---", flush=True)
        overrides = row_overrides(args.overrides, n, per_round, args.rounds, args.audit)
        rows.append({"per_round": per_round, **_scaling_row(overrides, variants)})
    same = all(v["same"] for row in rows for v in row["fedkd"].values())
    _print_scaling(rows, f"{n} clients, {args.rounds} rounds, one run of each per row")
    print(f"same accuracies as the plain loop: {'yes' if same else 'NO'}")
    out = Path(args.out or ".")
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(rows, indent=1))
    _plot_scaling(rows, variants, out / "scaling.png")
    return 0 if same else 1


def _scaling_row(overrides: list[str], variants: list[str]) -> dict[str, Any]:
    """One run of the plain loop, then of each fedkd variant, each checked against it."""
    _prepare(overrides)
    print("plain PyTorch loop...", flush=True)
    plain = _plain_side(overrides)
    fed: dict[str, dict[str, Any]] = {}
    for name in variants:
        print(f"fedkd (Flower + Ray), {VARIANTS[name][0]}...", flush=True)
        mine = variant_overrides(overrides, name)
        run = _fedkd_side(mine)
        same, verdict = same_accuracies(
            [run["accuracies"]], [plain["accuracies"]], _tolerance(mine)
        )
        fed[name] = {**run, "overrides": mine, "same": same, "accuracies_same": verdict}
    return {"plain": plain, "fedkd": fed}


def _print_scaling(rows: list[dict[str, Any]], title: str) -> None:
    """A line for the plain loop, then one per fedkd variant, for each clients per round."""
    print(f"\n{title}")
    head = ("start-up, s", "s/round", "peak MB", "s/round ratio")
    print(f"{'per round':>9}  {'':22}" + "".join(f"{h:>15}" for h in head) + "  same accuracies")
    for row in rows:
        figures = [_med([row["plain"]], k) for _, k in ROWS]
        cells = "".join(f"{v:>15.2f}" for v in figures)
        print(f"{row['per_round']:>9}  {'plain PyTorch loop':22}{cells}")
        for name, run in row["fedkd"].items():
            mine = [_med([run], k) for _, k in ROWS]
            cells = "".join(f"{v:>15.2f}" for v in mine)
            ratio = mine[1] / figures[1]
            print(f"{'':9}  {VARIANTS[name][0]:22}{cells}{ratio:>15.2f}  {run['accuracies_same']}")
    print("(s/round ratio: the variant's median seconds per round over the plain loop's)")


def _plot_scaling(rows: list[dict[str, Any]], variants: list[str], path: Path) -> None:
    """Seconds per round and peak memory against clients per round: a line per fedkd
    variant and one for the plain loop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    x = [r["per_round"] for r in rows]
    for ax, (label, key) in zip(axes, ROWS[1:], strict=True):
        for name in variants:
            ys = [_med([r["fedkd"][name]], key) for r in rows]
            ax.plot(x, ys, marker="o", label=f"fedkd, {VARIANTS[name][0]}")
        plain = [_med([r["plain"]], key) for r in rows]
        ax.plot(x, plain, marker="o", linestyle="--", color="black", label="plain loop")
        ax.set(xscale="log", xlabel="clients per round", title=label)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _both_sides(overrides: list[str], audit: bool) -> list[str]:
    """The user's overrides plus what makes the two sides do the same work: the mirrored
    strategy, and the membership audit on both or on neither."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in ("strategy", "strategy.name", "privacy.audit"):
            raise SystemExit(
                f"fedkd bench: {key} is set by the benchmark (strategy {MIRRORED}; the "
                "audit with --audit, on both sides)"
            )
    return [*overrides, f"strategy={MIRRORED}", f"privacy.audit={str(audit).lower()}"]


def _report(
    fed: list[dict[str, Any]], plain: list[dict[str, Any]], audit: bool, tolerance: float = 0.0
) -> int:
    """Print the medians of both sides and their ratios; 1 if the accuracies differ
    (beyond ``tolerance``, where fedkd vectorises)."""
    same, verdict = same_accuracies(
        [f["accuracies"] for f in fed], [p["accuracies"] for p in plain], tolerance
    )
    print(WORK.format(strategy=MIRRORED, audit=", membership audit" if audit else ""))
    print(f"membership audit: {'on both sides' if audit else 'off on both sides'}; "
          f"medians over {len(fed)} interleaved runs of each side")  # fmt: skip
    print(f"\n{'':42}{'fedkd':>10}{'plain':>10}{'ratio':>10}")
    for label, key in ROWS:
        a, b = _med(fed, key), _med(plain, key)
        print(f"{label:42}{a:>10.2f}{b:>10.2f}{a / b:>10.2f}")
        if key == "startup_s":
            for part, k in STARTUP_PARTS:
                print(f"  {part:40}{_med(fed, k):>10.2f}")
            _report_cpu(fed, plain)
        if key == "round_s" and len(fed) > 1:
            ratios = ", ".join(f"{r:.2f}" for r in pair_ratios(fed, plain))
            print(f"  ratio in each interleaved pair: {ratios}")
    print(f"same per-round accuracies on both sides: {verdict}")
    return 0 if same else 1


def _report_cpu(fed: list[dict[str, Any]], plain: list[dict[str, Any]]) -> None:
    """The CPU seconds all processes burn before round 1, by kind, and the start-up that
    they allow at best: spread perfectly over this machine's cores."""
    n = cores()
    a, b = _med(fed, "startup_cpu"), _med(plain, "startup_cpu")
    print(f"{'CPU-seconds before round 1, all processes':42}{a:>10.2f}{b:>10.2f}{a / b:>10.2f}")
    for kind, label in CPU_PARTS.items():
        print(f"  {label:40}{_med(fed, f'startup_cpu.{kind}'):>10.2f}")
    floor = f"start-up floor: those over the {n} core{'s' if n > 1 else ''}"
    print(f"{floor:42}{a / n:>10.2f}")  # (the plain loop runs on one core)


if __name__ == "__main__":
    sys.exit(main())
