"""``fedkd reproduce``: the papers' claims, checked on multi-seed runs.

Each paper has an *offline twin* (``simulations/papers/offline/<paper>.toml``): runs on
the offline datasets that a 2-core CPU finishes in minutes, and the paper's
qualitative claims written as checks on those runs' results across seeds::

    [paper]
    name = "fedmd"
    title = "FedMD (Li & Wang 2019)"
    configs = ["simulations/papers/fedmd_mnist_femnist.toml"]   # the real settings
    quick = ["rounds=3"]                                      # --quick overrides

    [runs.fedmd]
    config = "simulations/fedmd.toml"
    overrides = ['baseline=["local","transfer"]']

    [[claims]]
    text = "FedMD beats local-only"
    kind = "greater"            # B - A > 0, its 95% CI above 0
    a = "fedmd:local_only"      # run:metric (fedkd.results.seeds.METRICS)
    b = "fedmd:students"

Claim kinds: ``greater`` (B's paired mean exceeds A's and the 95% CI of the
difference excludes 0), ``at_least`` (B is at most ``margin`` below A on average:
mean(B - A) >= -margin, ``margin`` in the metric's unit, accuracy as a fraction), and
``fewer`` (B needs ``factor`` times less of the metric than A: mean(A) / mean(B) >=
``factor``). A claim that does not hold is reported as such, with its numbers.

Each run writes an ordinary multi-seed run folder; the claim table is printed and
written as ``claims.md``, ``claims.csv`` and one ``<paper>.png`` per paper.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from fedkd.config import ConfigError
from fedkd.results.records import Outcome, RunSummary
from fedkd.results.seeds import METRICS, Spread, paired

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = ROOT / "simulations" / "papers" / "offline"
KINDS = ("greater", "at_least", "fewer")


@dataclass(frozen=True)
class RunSpec:
    name: str
    config: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Claim:
    text: str
    kind: str
    a: str  # "run:metric"
    b: str
    margin: float = 0.0
    factor: float = 1.0

    def parts(self, side: str) -> tuple[str, str]:
        run, _, metric = (self.a if side == "a" else self.b).partition(":")
        return run, metric


@dataclass(frozen=True)
class Twin:
    """One paper's offline twin: its runs and its claims."""

    name: str
    title: str
    runs: tuple[RunSpec, ...]
    claims: tuple[Claim, ...]
    configs: tuple[str, ...] = ()  # the paper's real settings (real data)
    quick: tuple[str, ...] = ()  # overrides of --quick
    path: Path | None = None


def load_twin(path: Path) -> Twin:
    """Read and check a twin file; errors name the file and the key."""
    where = str(path)
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(where, f"cannot read the twin: {err}") from None
    paper = data.get("paper", {})
    runs = tuple(
        RunSpec(name, str(spec["config"]), tuple(spec.get("overrides", ())))
        for name, spec in data.get("runs", {}).items()
    )
    if not runs:
        raise ConfigError(f"{where}: runs", "a twin needs at least one [runs.<name>]")
    claims = []
    names = {r.name for r in runs}
    for i, c in enumerate(data.get("claims", [])):
        claim = Claim(
            str(c["text"]),
            str(c.get("kind", "greater")),
            str(c["a"]),
            str(c["b"]),
            float(c.get("margin", 0.0)),
            float(c.get("factor", 1.0)),
        )
        if claim.kind not in KINDS:
            raise ConfigError(f"{where}: claims[{i}].kind", f"must be one of {', '.join(KINDS)}")
        for side in ("a", "b"):
            run, metric = claim.parts(side)
            if run not in names:
                raise ConfigError(f"{where}: claims[{i}].{side}", f"no run named {run!r}")
            if metric not in METRICS:
                known = ", ".join(METRICS)
                raise ConfigError(
                    f"{where}: claims[{i}].{side}", f"unknown metric {metric!r}; {known}"
                )
        claims.append(claim)
    return Twin(
        str(paper.get("name", Path(path).stem)),
        str(paper.get("title", Path(path).stem)),
        runs,
        tuple(claims),
        tuple(paper.get("configs", ())),
        tuple(paper.get("quick", ())),
        Path(path),
    )


def twins(folder: Path = OFFLINE) -> dict[str, Twin]:
    """Every offline twin, by paper name."""
    out = {}
    for path in sorted(folder.glob("*.toml")):
        twin = load_twin(path)
        out[twin.name] = twin
    return out


# --- judging ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """A claim judged on the runs' per-seed results."""

    claim: Claim
    a: Spread | None
    b: Spread | None
    diff: Spread | None  # paired B - A
    holds: bool | None  # None: could not be checked (a run or a metric missing)
    why: str

    @property
    def label(self) -> str:
        return {True: "holds", False: "does not hold", None: "not checked"}[self.holds]


def judge(claim: Claim, results: Mapping[str, Mapping[int, RunSummary]]) -> Verdict:
    """Judge ``claim`` on ``results`` (run name -> seed -> summary), pairing seeds."""
    (ra, ma), (rb, mb) = claim.parts("a"), claim.parts("b")
    spreads = paired(results.get(ra, {}), results.get(rb, {}), ma, mb)
    if spreads is None:
        return Verdict(claim, None, None, None, None, "no seed has both values")
    a, b, d = spreads
    if claim.kind == "greater":
        holds = d.mean > 0 and (d.ci is None or d.ci[0] > 0)
        why = "B > A, 95% CI of B - A above 0" if holds else "95% CI of B - A includes 0 or below"
        if d.ci is None:
            why += " (one seed: no interval)"
    elif claim.kind == "at_least":
        holds = d.mean >= -claim.margin
        why = f"mean B - A {'>=' if holds else '<'} -{claim.margin:g}"
    else:
        ratio = a.mean / b.mean if b.mean > 0 else math.inf
        holds = ratio >= claim.factor
        why = f"A / B = {ratio:.1f} ({'>=' if holds else '<'} {claim.factor:g})"
    return Verdict(claim, a, b, d, holds, why)


def _fmt(spread: Spread | None, metric: str, diff: bool = False) -> str:
    if spread is None:
        return "-"
    unit = METRICS[metric][2]
    if diff and unit == "%":
        unit = "points"
    return spread.describe(unit)


def claim_table(title: str, verdicts: Sequence[Verdict]) -> str:
    """Markdown: claim, A, B, B - A (95% CI), verdict."""
    lines = [
        f"### {title}",
        "",
        "| claim | A | B | B - A | verdict |",
        "|---|---|---|---|---|",
    ]
    for v in verdicts:
        ma, mb = v.claim.parts("a")[1], v.claim.parts("b")[1]
        lines.append(
            f"| {v.claim.text} (A = {v.claim.a}, B = {v.claim.b}) | {_fmt(v.a, ma)} "
            f"| {_fmt(v.b, mb)} | {_fmt(v.diff, mb, diff=True)} | **{v.label}**: {v.why} |"
        )
    return "\n".join(lines) + "\n"


def write_claims(
    folder: Path, by_paper: Mapping[str, Sequence[Verdict]], titles: Mapping[str, str]
) -> str:
    """Write claims.md and claims.csv (and a plot per paper); returns the markdown."""
    text = "\n".join(claim_table(titles[p], v) for p, v in by_paper.items())
    (folder / "claims.md").write_text(text)
    with open(folder / "claims.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["paper", "claim", "a", "b", "a_mean", "b_mean", "diff_mean", "diff_ci_low",
                    "diff_ci_high", "n", "verdict", "why"])  # fmt: skip
        for paper, verdicts in by_paper.items():
            for v in verdicts:
                ci = v.diff.ci if v.diff is not None and v.diff.ci else (None, None)
                w.writerow([
                    paper, v.claim.text, v.claim.a, v.claim.b,
                    v.a.mean if v.a else "", v.b.mean if v.b else "",
                    v.diff.mean if v.diff else "", ci[0] if ci[0] is not None else "",
                    ci[1] if ci[1] is not None else "", v.diff.n if v.diff else 0,
                    v.label, v.why,
                ])  # fmt: skip
    for paper, verdicts in by_paper.items():
        _plot(verdicts, folder / f"{paper}.png", titles[paper])
    return text


def _plot(verdicts: Sequence[Verdict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [v for v in verdicts if v.a is not None and v.b is not None]
    if not shown:
        return
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.4), squeeze=False)
    for ax, v in zip(axes[0], shown, strict=True):
        assert v.a is not None and v.b is not None
        scale = 100 if METRICS[v.claim.parts("b")[1]][2] in ("%", "points") else 1
        means, stds = [scale * v.a.mean, scale * v.b.mean], [scale * v.a.std, scale * v.b.std]
        color = ["gray", "C0" if v.holds else "C3"]
        ax.bar([0, 1], means, yerr=stds, color=color, capsize=4)
        ax.set_xticks([0, 1], ["A", "B"])
        ax.set_title(f"{v.claim.text}\n({v.label})", fontsize=8)
        ax.set_xlabel(f"A = {v.claim.a}\nB = {v.claim.b}", fontsize=7)
    fig.suptitle(f"{title} (mean +- std over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- running ------------------------------------------------------------------------------


@dataclass
class Reproduction:
    """What :func:`reproduce` did: verdicts per paper, failures, and where it wrote."""

    folder: Path
    verdicts: dict[str, list[Verdict]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.errors or any(v.holds is None for vs in self.verdicts.values() for v in vs):
            return 2
        if any(v.holds is False for vs in self.verdicts.values() for v in vs):
            return 1
        return 0


def seeds_override(seeds: str | int | Sequence[int] | None) -> list[str]:
    """``--seeds 5`` or ``--seeds [11,12]`` as a config override (none: each run's own)."""
    if seeds is None:
        return []
    if isinstance(seeds, int):
        return [f"seeds={seeds}"]
    if isinstance(seeds, str):
        return [f"seeds={seeds.strip()}"]
    return [f"seeds=[{','.join(str(s) for s in seeds)}]"]


def reproduce(
    names: Sequence[str],
    folder: Path,
    *,
    seeds: str | int | Sequence[int] | None = None,
    quick: bool = False,
    quiet: bool = False,
) -> Reproduction:
    """Run the offline twins ``names`` into ``folder`` and judge their claims. Every
    run of every twin goes under one Ray start (:func:`fedkd.run_many`); a bad config
    stops them all before anything runs (an error, exit code 2)."""
    import fedkd
    from fedkd.results.seeds import read_seeds

    all_twins = twins()
    folder.mkdir(parents=True, exist_ok=True)
    out = Reproduction(folder)
    titles = {name: all_twins[name].title for name in names}
    experiments: list[tuple[Path, list[str]]] = []
    where: list[tuple[str, str]] = []  # (twin, run) of each experiment
    for name in names:
        twin = all_twins[name]
        for run in twin.runs:
            overrides = [*run.overrides, *(twin.quick if quick else ()), *seeds_override(seeds)]
            overrides += [f"output_dir={folder / name}", f"name={run.name}"]
            if not any(o.startswith("seeds=") for o in overrides):
                overrides.append("seeds=5")
            experiments.append((ROOT / run.config, overrides))
            where.append((name, run.name))
    results: dict[str, dict[str, dict[int, RunSummary]]] = {name: {} for name in names}

    def done(i: int, result: Any) -> None:
        name, run = where[i]
        results[name][run] = read_seeds(result.directory)
        if result.summary.outcome is Outcome.FAILED:  # (stopped early by a budget: a result)
            out.errors.append(f"{name}/{run}: {result.summary.status}")
        if not quiet:
            print(f"[{i + 1}/{len(where)}] {name}/{run}: {result.summary.status}", flush=True)

    if not quiet:
        print(f"{len(where)} runs of {len(names)} twins under one Ray start ...", flush=True)
    try:
        fedkd.run_many(experiments, quiet=True, on_result=done)
    except ConfigError as err:
        out.errors.append(str(err))
        if not quiet:
            print(f"    error: {err}", flush=True)
    for name in names:
        out.verdicts[name] = [judge(c, results[name]) for c in all_twins[name].claims]
    text = write_claims(folder, out.verdicts, titles)
    if not quiet:
        print("\n" + text + f"written to {folder}")
    return out


def describe_twins() -> str:
    """The list ``fedkd reproduce`` prints: papers, their real settings and claims."""
    lines = []
    for name, twin in twins().items():
        lines.append(f"{name:8} {twin.title}")
        for config in twin.configs:
            lines.append(f"{'':8}   real setting: {config}")
        for claim in twin.claims:
            lines.append(f"{'':8}   claim: {claim.text}")
    return "\n".join(lines) + "\n"


def run_real(name: str, *, seeds: Any = None, quiet: bool = False) -> list[Any]:
    """Run the paper's real-data settings (its ``configs``), each a multi-seed run."""
    import fedkd

    twin = twins()[name]
    if not twin.configs:
        raise ConfigError("reproduce", f"{name} lists no real-data setting")
    return [fedkd.run(ROOT / c, seeds_override(seeds), quiet=quiet) for c in twin.configs]
