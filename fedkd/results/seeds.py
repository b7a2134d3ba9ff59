"""Statistics across seeds: one run's seeds, and paired comparisons of runs.

A multi-seed run (``seeds = 5``) is a folder with one ordinary run folder per seed
(``seed-0/``, ``seed-1/``, ...) and a ``summary.json`` of kind ``seeds`` that holds,
per metric, the per-seed values, their mean, sample standard deviation and a 95%
confidence interval of the mean (Student's t with n - 1 degrees of freedom).

:func:`compare` pairs the seeds two runs have in common and reports, per metric, the
mean paired difference with its 95% CI, and says in words when the CI includes 0
(the difference is then not significant at that level).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedkd.results.records import Outcome, RunSummary, read_summary

SEEDS_KIND = "seeds"

#: the metrics reported across seeds: name -> (label, getter on a RunSummary, unit)
METRICS: dict[str, tuple[str, Callable[[RunSummary], float | None], str]] = {
    "students": ("students' mean test accuracy", lambda s: _mean(s.final.students), "%"),
    "students_own": (
        "students on their own test distribution",
        lambda s: _mean(s.final.students_own),
        "%",
    ),
    "local_only": ("local-only mean test accuracy", lambda s: _mean(s.final.local_only), "%"),
    "gain_points": (
        "gain over local-only (points)",
        lambda s: None if s.final.gain_points is None else s.final.gain_points / 100,
        "points",
    ),
    "server_model": ("server model test accuracy", lambda s: s.final.server_model, "%"),
    "transfer": (
        "transfer-only mean test accuracy",
        lambda s: _baseline(s, "transfer"),
        "%",
    ),
    "fedavg": ("FedAvg baseline mean test accuracy", lambda s: _baseline(s, "fedavg"), "%"),
    "centralised": (
        "centralised mean test accuracy",
        lambda s: _baseline(s, "centralised"),
        "%",
    ),
    "bytes_per_round": (
        "bytes per round",
        lambda s: s.communication.bytes_per_round,
        "bytes",
    ),
    "bytes_up_per_round": (
        "bytes up per round",
        lambda s: s.communication.bytes_up / max(s.rounds_completed, 1),
        "bytes",
    ),
    "epsilon": (
        "privacy: epsilon spent (worst client)",
        lambda s: None if s.privacy is None else s.privacy.epsilon,
        "eps",
    ),
    "epsilon_data_dependent": (
        "privacy: data-dependent epsilon (PATE; not itself DP)",
        lambda s: None if s.privacy is None else s.privacy.epsilon_data_dependent,
        "eps",
    ),
    "mia_auc": (
        "membership-inference audit: AUC",
        lambda s: None if s.audit is None else s.audit.mia_auc,
        "ratio",
    ),
    "mia_advantage": (
        "membership-inference audit: advantage",
        lambda s: None if s.audit is None else s.audit.mia_advantage,
        "ratio",
    ),
    "rounds_s": ("seconds in rounds", lambda s: s.timing.get("rounds_s"), "s"),
    "rounds_to_target": (
        "rounds to the first target accuracy",
        lambda s: _first_target(s, "round"),
        "rounds",
    ),
    "bytes_to_target": (
        "bytes to the first target accuracy",
        lambda s: _first_target(s, "bytes"),
        "bytes",
    ),
}


def _mean(stats: Any) -> float | None:
    return None if stats is None else stats.mean


def _first_target(summary: RunSummary, key: str) -> float | None:
    """Rounds or bytes to the first configured target (None: none set, or not reached)."""
    hits = list(summary.communication.to_target.values())
    return None if not hits or hits[0] is None else float(hits[0][key])


def _baseline(summary: RunSummary, name: str) -> float | None:
    return _mean(summary.final.baselines.get(name))


def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


@dataclass(frozen=True)
class Spread:
    """One metric over seeds: the values, mean, sample std and 95% CI of the mean."""

    seeds: tuple[int, ...]
    values: tuple[float, ...]
    mean: float
    std: float  # sample standard deviation (n - 1); 0 for one seed
    ci: tuple[float, float] | None  # 95% CI of the mean (t); None for one seed

    @classmethod
    def of(cls, seeds: Sequence[int], values: Sequence[float | None]) -> Spread | None:
        """The spread of the seeds that have a value (None when none has)."""
        pairs = [(s, float(v)) for s, v in zip(seeds, values, strict=True) if v is not None]
        if not pairs:
            return None
        keep, vals = (tuple(x) for x in zip(*pairs, strict=True))
        mean = statistics.fmean(vals)
        if len(vals) < 2:
            return cls(keep, vals, mean, 0.0, None)  # type: ignore[arg-type]
        std = statistics.stdev(vals)
        half = t_quantile(len(vals) - 1) * std / math.sqrt(len(vals))
        return cls(keep, vals, mean, std, (mean - half, mean + half))  # type: ignore[arg-type]

    @property
    def n(self) -> int:
        return len(self.values)

    def describe(self, unit: str = "%") -> str:
        """``35.8 +- 2.7% (95% CI 32.5 to 39.1, n=5)``."""
        f = _formatter(unit)
        sign = "+" if unit == "points" and self.mean > 0 else ""
        text = f"{sign}{f(self.mean)} +- {f(self.std)}{_suffix(unit)}"
        if self.ci is not None:
            text += f" (95% CI {f(self.ci[0])} to {f(self.ci[1])}, n={self.n})"
        else:
            text += f" (n={self.n})"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "seeds": list(self.seeds),
            "values": list(self.values),
            "mean": self.mean,
            "std": self.std,
            "ci95": None if self.ci is None else list(self.ci),
            "n": self.n,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Spread:
        ci = data.get("ci95")
        return cls(
            tuple(data["seeds"]),
            tuple(float(v) for v in data["values"]),
            float(data["mean"]),
            float(data["std"]),
            None if ci is None else (float(ci[0]), float(ci[1])),
        )


def _formatter(unit: str) -> Callable[[float], str]:
    if unit in ("%", "points"):
        return lambda v: f"{100 * v:.1f}"
    if unit == "bytes":
        return lambda v: f"{v:,.0f}"
    if unit == "eps":
        return lambda v: "inf" if math.isinf(v) else f"{v:.3g}"
    if unit == "ratio":
        return lambda v: f"{v:.3f}"
    return lambda v: f"{v:.1f}"


def _suffix(unit: str) -> str:
    return {"%": "%", "points": " points", "bytes": " B", "s": " s", "rounds": " rounds"}.get(
        unit, ""
    )


@dataclass(frozen=True)
class SeedsSummary:
    """A multi-seed run: each seed's outcome and every metric's spread across seeds."""

    name: str
    seeds: tuple[int, ...]
    outcome: Outcome  # the worst of the seeds' outcomes
    status: str
    statuses: dict[int, str]  # seed -> that seed's status line
    metrics: dict[str, Spread] = field(default_factory=dict)
    strategy: str = ""
    data: str = ""

    @property
    def exit_code(self) -> int:
        return self.outcome.exit_code

    @classmethod
    def of(cls, name: str, runs: Mapping[int, RunSummary | None]) -> SeedsSummary:
        """From each seed's summary (None: the seed never ran, e.g. after Ctrl-C)."""
        seeds = tuple(runs)
        done = {s: r for s, r in runs.items() if r is not None}
        metrics = {}
        for key, (_, get, _) in METRICS.items():
            spread = Spread.of(list(done), [get(r) for r in done.values()])
            if spread is not None:
                metrics[key] = spread
        outcome, status = _overall(runs)
        any_run = next(iter(done.values()), None)
        return cls(
            name,
            seeds,
            outcome,
            status,
            {s: (r.status if r is not None else "not run") for s, r in runs.items()},
            metrics,
            any_run.strategy if any_run else "",
            any_run.data if any_run else "",
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": SEEDS_KIND,
            "name": self.name,
            "seeds": list(self.seeds),
            "outcome": self.outcome.value,
            "status": self.status,
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "strategy": self.strategy,
            "data": self.data,
            "metrics": {k: v.to_json() for k, v in self.metrics.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SeedsSummary:
        if data.get("kind") != SEEDS_KIND:
            raise ValueError("not the summary of a multi-seed run")
        return cls(
            data["name"],
            tuple(data["seeds"]),
            Outcome(data["outcome"]),
            data["status"],
            {int(k): v for k, v in data["statuses"].items()},
            {k: Spread.from_json(v) for k, v in data["metrics"].items()},
            data.get("strategy", ""),
            data.get("data", ""),
        )

    def table(self) -> str:
        """The summary as aligned text: one line per metric, then each seed's status."""
        lines = [f"{self.name}: {self.strategy} on {self.data}, seeds {list(self.seeds)}"]
        width = max(len(METRICS[k][0]) for k in self.metrics) if self.metrics else 0
        for key, spread in self.metrics.items():
            label, _, unit = METRICS[key]
            lines.append(f"  {label:<{width}}  {spread.describe(unit)}")
        for seed, status in self.statuses.items():
            lines.append(f"  seed {seed}: {status}")
        lines.append(f"status: {self.status}")
        return "\n".join(lines) + "\n"


_SEVERITY = [
    Outcome.COMPLETED,
    Outcome.STOPPED_EARLY,
    Outcome.COMPLETED_WITH_FAILURES,
    Outcome.INTERRUPTED,
    Outcome.FAILED,
]


def worst(outcomes: Iterable[Outcome]) -> Outcome:
    """The worst of ``outcomes`` (completed < stopped early < completed with failures <
    interrupted < failed): the outcome of several runs taken together."""
    return max(outcomes, key=_SEVERITY.index)


def _overall(runs: Mapping[int, RunSummary | None]) -> tuple[Outcome, str]:
    """The worst outcome over the seeds, and a status line that names the seeds."""
    ran = {s: r for s, r in runs.items() if r is not None}
    missing = [s for s, r in runs.items() if r is None]
    if not ran:
        return Outcome.INTERRUPTED, "interrupted before any seed ran"
    overall = worst(r.outcome for r in ran.values())
    if missing and _SEVERITY.index(overall) < _SEVERITY.index(Outcome.INTERRUPTED):
        overall = Outcome.INTERRUPTED
    if overall is Outcome.COMPLETED:
        return overall, f"completed ({len(ran)} seeds)"
    bad = [s for s, r in ran.items() if r.outcome is not Outcome.COMPLETED]
    parts = [f"seed {s}: {ran[s].status}" for s in bad]
    if missing:
        parts.append(f"seeds {missing} not run")
    return overall, f"{overall.value}: " + "; ".join(parts)


def seed_folders(run: Path) -> dict[int, Path]:
    """``seed-<n>`` sub-folders of a multi-seed run, by seed (empty for a single run)."""
    out = {}
    for child in sorted(run.iterdir()) if run.is_dir() else []:
        if child.is_dir() and child.name.startswith("seed-") and child.name[5:].isdigit():
            out[int(child.name[5:])] = child
    return dict(sorted(out.items()))


def read_seeds(run: Path) -> dict[int, RunSummary]:
    """Each seed's summary of a run folder: a multi-seed run's seeds, or a single run
    (keyed by its config's seed). Seeds without a summary are left out."""
    run = Path(run)
    folders = seed_folders(run)
    if not folders:
        return {_seed_of(run): read_summary(run)}
    return {s: read_summary(p) for s, p in folders.items() if (p / "summary.json").is_file()}


def _seed_of(run: Path) -> int:
    import tomllib

    config = run / "config.toml"
    if not config.is_file():
        return 0
    return int(tomllib.loads(config.read_text()).get("seed", 0))


# --- paired comparison ------------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    """B - A on one metric over the seeds both runs have."""

    metric: str
    a: Spread
    b: Spread
    diff: Spread  # of the per-seed differences b - a

    @property
    def significant(self) -> bool | None:
        """Whether the 95% CI of the mean difference excludes 0 (None: one pair only)."""
        if self.diff.ci is None:
            return None
        lo, hi = self.diff.ci
        return lo > 0 or hi < 0

    def verdict(self) -> str:
        unit = METRICS[self.metric][2]
        f = _formatter(unit)
        if self.significant is None:
            return f"one paired seed: no interval (difference {f(self.diff.mean)})"
        if not self.significant:
            return "not significant: the 95% CI of the difference includes 0"
        return "B higher" if self.diff.mean > 0 else "B lower"


def paired(
    a: Mapping[int, RunSummary],
    b: Mapping[int, RunSummary],
    metric_a: str,
    metric_b: str | None = None,
) -> tuple[Spread, Spread, Spread] | None:
    """A's ``metric_a`` and B's ``metric_b`` (default the same) over the seeds both have a
    value for, and their per-seed difference B - A; None when no seed has both."""
    get_a, get_b = METRICS[metric_a][1], METRICS[metric_b or metric_a][1]
    pairs = [(s, get_a(a[s]), get_b(b[s])) for s in sorted(set(a) & set(b))]
    pairs = [(s, x, y) for s, x, y in pairs if x is not None and y is not None]
    if not pairs:
        return None
    seeds = [s for s, _, _ in pairs]
    sa = Spread.of(seeds, [x for _, x, _ in pairs])
    sb = Spread.of(seeds, [y for _, _, y in pairs])
    sd = Spread.of(seeds, [y - x for _, x, y in pairs])
    assert sa is not None and sb is not None and sd is not None
    return sa, sb, sd


def compare(a: Mapping[int, RunSummary], b: Mapping[int, RunSummary]) -> list[Difference]:
    """Paired differences B - A per metric, over the seeds both runs have a value for."""
    out = []
    for key in METRICS:
        if key == "rounds_s":
            continue  # wall-clock time: not a paired quantity worth a CI here
        spreads = paired(a, b, key)
        if spreads is not None:
            out.append(Difference(key, *spreads))
    return out


def comparison_table(name_a: str, name_b: str, diffs: Iterable[Difference]) -> str:
    """The comparison as text: per metric A, B, the mean paired difference with its CI
    and the verdict in words."""
    diffs = list(diffs)
    if not diffs:
        return f"{name_a} and {name_b} share no seed with a value to compare\n"
    seeds = diffs[0].diff.seeds
    lines = [f"A = {name_a}", f"B = {name_b}", f"paired seeds: {list(seeds)}"]
    for d in diffs:
        label, _, unit = METRICS[d.metric]
        lines.append(f"{label}:")
        lines.append(f"  A  {d.a.describe(unit)}")
        lines.append(f"  B  {d.b.describe(unit)}")
        diff_unit = "points" if unit == "%" else unit  # a difference of accuracies
        lines.append(f"  B - A  {d.diff.describe(diff_unit)}: {d.verdict()}")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, runs: Mapping[int, RunSummary | None]) -> None:
    """One row per seed: its status and every metric (fractions, not percent)."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seed", "status", *METRICS])
        for seed, r in runs.items():
            if r is None:
                w.writerow([seed, "not run", *([""] * len(METRICS))])
                continue
            values = [get(r) for _, get, _ in METRICS.values()]
            w.writerow([seed, r.status, *["" if v is None else f"{v:.6g}" for v in values]])


def plot_seeds(curves: Mapping[int, tuple[list[Any], list[Any]]], path: Path, title: str) -> None:
    """Students' mean accuracy per round, mean +- std over seeds (federated, and the
    local-only baseline dashed). ``curves``: seed -> (rounds, baseline rounds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for which, (style, label) in enumerate(
        [("o-", "students (federated)"), ("--", "students (local-only)")]
    ):
        by_round: dict[int, list[float]] = {}
        for rounds in (c[which] for c in curves.values()):
            for r in rounds:
                if r.students is not None:
                    by_round.setdefault(r.round, []).append(100 * r.students.mean)
        if not by_round:
            continue
        x = sorted(by_round)
        mean = np.array([np.mean(by_round[k]) for k in x])
        std = np.array([np.std(by_round[k], ddof=1) if len(by_round[k]) > 1 else 0 for k in x])
        color = "gray" if which else None
        ax.plot(x, mean, style, color=color, label=f"{label}, mean over {len(curves)} seeds")
        ax.fill_between(x, mean - std, mean + std, alpha=0.2, color=color)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{title} (band: +- 1 std over seeds)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # (nothing to plot when every seed failed)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
