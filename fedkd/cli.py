"""Command line: ``fedkd run [config.toml] [field=value ...]``, ``fedkd resume RUN_DIR``,
``fedkd bench``, ``fedkd compare``, ``fedkd reproduce``, ``fedkd list``.

Exit codes: 0 completed; 1 failed; 2 bad config or input (nothing ran); 3 completed
with failures; 4 stopped early (privacy budget); 130 interrupted. ``--allow-partial``
makes 3 and 4 exit 0.
"""

from __future__ import annotations

import time

_STARTED = time.time()  # before the heavy imports: start-up is measured from here

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402


def _outcome(call: Callable[[], Any], allow_partial: bool) -> int:
    """Run ``call`` (a run or a resume) and turn how it ended into an exit code."""
    from fedkd.config import ConfigError
    from fedkd.privacy.accounting import PrivacyError
    from fedkd.registry import UnknownNameError
    from fedkd.runner import RunError

    try:
        result = call()
    except (ConfigError, UnknownNameError, PrivacyError) as err:
        print(f"fedkd: config error: {err}", file=sys.stderr)
        return 2
    except RunError as err:
        print(f"fedkd: {err.result.summary.status}", file=sys.stderr)
        return err.result.exit_code
    except KeyboardInterrupt:
        print("fedkd: interrupted; finished rounds are in the run folder", file=sys.stderr)
        sys.stderr.flush()
        os._exit(130)  # Ray's and Flower's threads may still be winding down
    code = result.exit_code
    return 0 if allow_partial and code in (3, 4) else code


def _run(args: argparse.Namespace) -> int:
    from fedkd.runner import run

    items = list(args.items)
    configs = []
    while items and "=" not in items[0]:  # config files first, then the overrides
        configs.append(items.pop(0))
    overrides = items
    if len(configs) > 1:
        return _outcome(lambda: _run_many(configs, overrides, args.quiet), args.allow_partial)
    config = configs[0] if configs else None
    return _outcome(
        lambda: run(config, overrides, quiet=args.quiet, started=_STARTED), args.allow_partial
    )


class _Sweep:
    """What ``fedkd run A.toml B.toml ...`` ended with: the worst experiment's outcome."""

    def __init__(self, results: list[Any]) -> None:
        from fedkd.results.seeds import worst

        self.outcome = worst(r.summary.outcome for r in results)

    @property
    def exit_code(self) -> int:
        return self.outcome.exit_code


def _run_many(configs: list[str], overrides: list[str], quiet: bool) -> _Sweep:
    """Several configs, the same overrides on each, under one Ray start."""
    from fedkd.sweep import run_many

    results = run_many([(c, overrides) for c in configs], quiet=quiet, started=_STARTED)
    if not quiet:
        print("\nfedkd: each experiment (one Ray start):")
        for config, result in zip(configs, results, strict=True):
            print(f"  {config}: {result.summary.status} ({result.directory})")
    return _Sweep(results)


def _resume(args: argparse.Namespace) -> int:
    from fedkd.runner import resume

    if len(args.items) != 1:
        print("fedkd resume: give exactly one run folder", file=sys.stderr)
        return 2
    return _outcome(
        lambda: resume(args.items[0], quiet=args.quiet, started=_STARTED), args.allow_partial
    )


def _compare(args: argparse.Namespace) -> int:
    """Paired comparison of runs by seed: B - A for every B after the first run A."""
    from pathlib import Path

    from fedkd.results.records import SchemaError
    from fedkd.results.seeds import compare, comparison_table, read_seeds

    if len(args.items) < 2:
        print("fedkd compare: give at least two run folders (A, then B...)", file=sys.stderr)
        return 2
    runs = []
    for item in args.items:
        path = Path(item)
        try:
            seeds = read_seeds(path)
        except (OSError, ValueError, KeyError, SchemaError) as err:
            print(f"fedkd compare: {path}: not a finished fedkd run ({err})", file=sys.stderr)
            return 2
        if not seeds:
            print(f"fedkd compare: {path}: no seed of it has a summary", file=sys.stderr)
            return 2
        runs.append((item, seeds))
    (name_a, a), *rest = runs
    texts = [comparison_table(name_a, name_b, compare(a, b)) for name_b, b in rest]
    text = "\n".join(texts)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    """List the papers, run a paper's real settings, or run offline twins and judge
    their claims (exit 0: every claim holds, 1: some does not, 2: an error)."""
    from pathlib import Path

    from fedkd.config import ConfigError
    from fedkd.reproduce import describe_twins, reproduce, run_real, twins

    try:
        known = twins()
    except ConfigError as err:
        print(f"fedkd reproduce: {err}", file=sys.stderr)
        return 2
    unknown = [n for n in args.items if n not in known]
    if unknown:
        print(
            f"fedkd reproduce: unknown paper {unknown[0]!r}; known: {', '.join(known)}",
            file=sys.stderr,
        )
        return 2
    if not args.items and not args.offline:
        print(describe_twins(), end="")
        return 0
    if not args.offline:
        for name in args.items:
            try:
                run_real(name, seeds=args.seeds, quiet=args.quiet)
            except ConfigError as err:
                print(f"fedkd reproduce: config error: {err}", file=sys.stderr)
                return 2
        return 0
    names = args.items or list(known)
    out = Path(args.out or f"runs/reproduce-{time.strftime('%Y%m%d-%H%M%S')}")
    result = reproduce(names, out, seeds=args.seeds, quick=args.quick, quiet=args.quiet)
    if args.quiet:
        print((out / "claims.md").read_text(), end="")
    for error in result.errors:
        print(f"fedkd reproduce: {error}", file=sys.stderr)
    return result.exit_code


def _bench(args: argparse.Namespace) -> int:
    from fedkd.bench import main as bench_main

    return bench_main(args.items)


#: input shapes of the default model table: MNIST-1D, the MNIST family, CIFAR/SVHN
LIST_SHAPES = ("40", "1x28x28", "3x32x32")


def _list(args: argparse.Namespace) -> int:
    from fedkd.aggregators import AGGREGATORS
    from fedkd.data import DATASETS, PARTITIONERS
    from fedkd.kd import LOSSES
    from fedkd.losses import KD_LOSSES
    from fedkd.models import MODELS
    from fedkd.recipes import OPTIMIZERS, SCHEDULES
    from fedkd.strategy import CLIENT_STRATEGIES, SERVER_STRATEGIES

    texts = LIST_SHAPES if args.input is None else (args.input,)
    try:
        shapes = [tuple(int(d) for d in text.lower().split("x")) for text in texts]
        if any(not s or min(s) < 1 for s in shapes) or args.classes < 1:
            raise ValueError
    except ValueError:
        print(
            f"fedkd list: --input must look like 40 or 3x32x32, got {args.input!r}", file=sys.stderr
        )
        return 2
    for label, reg in (
        ("strategies", SERVER_STRATEGIES),
        ("client strategies", CLIENT_STRATEGIES),
        ("models", MODELS),
        ("datasets", DATASETS),
        ("partitioners", PARTITIONERS),
        ("kd losses", KD_LOSSES),
        ("strategy.losses", LOSSES),
        ("aggregators", AGGREGATORS),
        ("optimizers", OPTIMIZERS),
        ("schedules", SCHEDULES),
    ):
        if reg is MODELS and args.input is not None:
            sizes = ", ".join(f"{n} ({_size(n, shapes[0], args.classes)})" for n in MODELS.names())
            print(
                f"{label:18} {sizes}  [parameters for input {args.input}, {args.classes} classes]"
            )
        elif reg is MODELS:
            print(f"{label:18} parameters for {args.classes} classes, by input shape:")
            print(f"{'':18}   {'':16}" + "".join(f"{t:>12}" for t in texts))
            for n in MODELS.names():
                row = "".join(f"{_size(n, shape, args.classes):>12}" for shape in shapes)
                print(f"{'':18}   {n:16}{row}")
        else:
            print(f"{label:18} {', '.join(reg.names())}")
    return 0


def _size(name: str, shape: tuple[int, ...], classes: int) -> str:
    """Parameter count of model ``name`` for ``shape`` and ``classes`` ("n/a" if it
    cannot take that input)."""
    from fedkd.config import Spec
    from fedkd.models import build_model
    from fedkd.registry import UnknownNameError

    try:
        model = build_model(Spec(name), shape, classes, seed=0)
    except (ValueError, TypeError, RuntimeError):
        return "n/a"
    except UnknownNameError:  # e.g. an installed model entry point that does not load
        return "broken"
    return f"{sum(p.numel() for p in model.parameters()):,}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedkd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, items, text in (
        (
            "run",
            _run,
            "[config.toml ...] [field.path=value ...]",
            "run an experiment (several configs: one after another under one Ray start, "
            "the overrides applied to each)",
        ),
        ("resume", _resume, "RUN_DIR", "continue a killed or interrupted run"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("items", nargs="*", help=items)
        p.add_argument("-q", "--quiet", action="store_true", help="print nothing")
        p.add_argument(
            "--allow-partial",
            action="store_true",
            help="exit 0 also for 'completed with failures' and 'stopped early'",
        )
        p.set_defaults(fn=fn)
    b = sub.add_parser("bench", help="time fedkd against a plain PyTorch loop", add_help=False)
    b.add_argument("items", nargs="*", help="[--repeats N] [field.path=value ...]")
    args_list = sys.argv[1:] if argv is None else argv
    if os.getcwd() not in sys.path:  # like `python -m`: a user's own modules load by import path
        sys.path.insert(0, os.getcwd())
    if args_list[:1] == ["bench"]:  # the benchmark parses its own options
        return _bench(argparse.Namespace(items=args_list[1:]))
    cmp = sub.add_parser(
        "compare", help="paired comparison of runs by seed (mean difference, 95%% CI)"
    )
    cmp.add_argument("items", nargs="+", help="RUN_A RUN_B [RUN_C ...]: each B against A")
    cmp.add_argument("--out", help="also write the comparison to this file")
    cmp.set_defaults(fn=_compare)
    rep = sub.add_parser("reproduce", help="the papers' settings and claims (see --offline)")
    rep.add_argument("items", nargs="*", help="paper names (none: list them, or all)")
    rep.add_argument("--offline", action="store_true", help="run the offline twins, judge claims")
    rep.add_argument("--seeds", default=None, help="5 (seeds 0..4) or [11,12,13]")
    rep.add_argument("--quick", action="store_true", help="fewer rounds (the twins' quick set)")
    rep.add_argument("--out", default=None, help="folder for the runs and the claim table")
    rep.add_argument("-q", "--quiet", action="store_true", help="print only the claim table")
    rep.set_defaults(fn=_reproduce)
    lst = sub.add_parser("list", help="list registered plug-ins")
    lst.add_argument(
        "--input",
        default=None,
        help="one input shape for model sizes, e.g. 3x32x32 (default: 40, 1x28x28, 3x32x32)",
    )
    lst.add_argument("--classes", type=int, default=10, help="classes for model sizes")
    lst.set_defaults(fn=_list)
    args, rest = parser.parse_known_args(args_list)  # `run cfg.toml -q k=v`: items after -q
    unknown = [r for r in rest if r.startswith("-") or not hasattr(args, "items")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if rest:
        args.items = [*args.items, *rest]
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
