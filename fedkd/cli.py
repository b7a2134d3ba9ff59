"""Command line: ``fedkd run [config.toml] [field=value ...]``, ``fedkd bench``, ``fedkd list``."""

from __future__ import annotations

import time

_STARTED = time.time()  # before the heavy imports: start-up is measured from here

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402


def _run(args: argparse.Namespace) -> int:
    from fedkd.config import ConfigError
    from fedkd.registry import UnknownNameError
    from fedkd.simulation import run

    config = None
    overrides = list(args.items)
    if overrides and "=" not in overrides[0]:
        config = overrides.pop(0)
    try:
        run(config, overrides, quiet=args.quiet, started=_STARTED)
    except (ConfigError, UnknownNameError) as err:
        print(f"fedkd: config error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nfedkd: interrupted; finished rounds are in the run directory", file=sys.stderr)
        sys.stderr.flush()
        os._exit(130)  # Ray and Flower threads may still be winding down
    return 0


def _bench(args: argparse.Namespace) -> int:
    from fedkd.bench import main as bench_main

    return bench_main(args.items)


def _list(args: argparse.Namespace) -> int:
    from fedkd.data import DATASETS, PARTITIONERS
    from fedkd.losses import KD_LOSSES
    from fedkd.models import MODELS
    from fedkd.strategy import CLIENT_STRATEGIES, SERVER_STRATEGIES

    for label, reg in (
        ("strategies", SERVER_STRATEGIES),
        ("client strategies", CLIENT_STRATEGIES),
        ("models", MODELS),
        ("datasets", DATASETS),
        ("partitioners", PARTITIONERS),
        ("kd losses", KD_LOSSES),
    ):
        print(f"{label:18} {', '.join(reg.names())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedkd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run an experiment (default: the quick-start)")
    p.add_argument("items", nargs="*", help="[config.toml] [field.path=value ...]")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    p.set_defaults(fn=_run)
    b = sub.add_parser("bench", help="time fedkd against a plain PyTorch loop", add_help=False)
    b.add_argument("items", nargs="*", help="[--repeats N] [field.path=value ...]")
    args_list = sys.argv[1:] if argv is None else argv
    if os.getcwd() not in sys.path:  # like `python -m`: a user's own modules load by import path
        sys.path.insert(0, os.getcwd())
    if args_list[:1] == ["bench"]:  # the benchmark parses its own options
        return _bench(argparse.Namespace(items=args_list[1:]))
    sub.add_parser("list", help="list registered plug-ins").set_defaults(fn=_list)
    args, rest = parser.parse_known_args(args_list)  # `run cfg.toml -q k=v`: items after -q
    unknown = [r for r in rest if r.startswith("-") or not hasattr(args, "items")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if rest:
        args.items = [*args.items, *rest]
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
