"""Typed run records: one round, one client, one failure, the run summary; one schema.

Everything fedkd writes about a run (``metrics.jsonl``, ``baseline.jsonl``,
``summary.json``, the checkpoint's records) is one of these dataclasses, written by
``to_json`` and read back by ``from_json``; everything that reads results (summary
table, plots, ``fedkd compare``-style scripts, resume, the tests) uses the fields,
not string keys into nested dicts. ``schema`` is :data:`SCHEMA` in every record;
reading a record of another schema raises :class:`SchemaError`.

Run outcomes (:class:`Outcome`), the first word(s) of ``RunSummary.status``:

* ``completed``: every round ran and every sampled client replied usably
  (simulated faults from ``[faults]`` are the experiment, not failures);
* ``completed with failures``: every round ran, but some clients failed in some
  rounds (the summary names them, the round and the first line of why);
* ``stopped early``: a planned stop, e.g. the privacy budget;
* ``interrupted``: Ctrl-C (finished rounds are kept; ``fedkd resume`` continues);
* ``failed``: a round had fewer usable replies than ``clients.min_success``, or the
  server side raised; the reason follows the colon.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

SCHEMA = 2  # version 1: the untyped dicts of fedkd 0.1 (no "schema" field)


class SchemaError(ValueError):
    """A record written by another version of fedkd, or not a fedkd record at all."""


class Outcome(str, Enum):
    """How a run ended (see the module docstring)."""

    COMPLETED = "completed"
    COMPLETED_WITH_FAILURES = "completed with failures"
    STOPPED_EARLY = "stopped early"
    INTERRUPTED = "interrupted"
    FAILED = "failed"

    @property
    def exit_code(self) -> int:
        """The CLI's exit code: 0 only for ``completed``."""
        return {
            Outcome.COMPLETED: 0,
            Outcome.FAILED: 1,
            Outcome.COMPLETED_WITH_FAILURES: 3,
            Outcome.STOPPED_EARLY: 4,
            Outcome.INTERRUPTED: 130,
        }[self]


def _check_schema(data: Mapping[str, Any], what: str) -> None:
    found = data.get("schema")
    if found != SCHEMA:
        raise SchemaError(
            f"{what} has schema {found!r}; this fedkd reads schema {SCHEMA} "
            "(re-run the experiment, or read it with the fedkd version that wrote it)"
        )


def _finite_or_none(x: float | None) -> float | None:
    """JSON has no NaN or infinity: they are written as null (and read back as NaN)."""
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def _num(x: float | None) -> float:
    """A number read back from JSON: null (a non-finite value when written) -> NaN."""
    return math.nan if x is None else float(x)


def _nums(d: Mapping[str, Any]) -> dict[str, float]:
    return {k: _num(v) for k, v in d.items()}


def _client_from_json(cid: str, data: Mapping[str, Any]) -> ClientRecord:
    d = dict(data)
    d.update(cid=int(cid), accuracy=_num(d["accuracy"]), loss=_num(d["loss"]))
    d["metrics"] = _nums(d.get("metrics", {}))
    return ClientRecord(**d)


@dataclass(frozen=True)
class Stats:
    """Mean, min and max of some accuracies, and how many there were."""

    mean: float
    min: float
    max: float
    count: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Stats | None:
        v = [float(x) for x in values]
        if not v:
            return None
        return cls(sum(v) / len(v), min(v), max(v), len(v))

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Stats | None:
        return None if data is None else cls(**data)


@dataclass(frozen=True)
class ClientRecord:
    """One client's reply in one round: its student on the test set and what it sent."""

    cid: int
    model: str
    accuracy: float
    loss: float
    num_examples: int
    bytes_up: int
    bytes_down: int
    byzantine: bool = False  # a simulated Byzantine client ([faults])
    metrics: dict[str, float] = field(default_factory=dict)  # everything else it reported

    RESERVED = ("accuracy", "loss", "num_examples")

    @classmethod
    def from_reply(
        cls,
        cid: int,
        model: str,
        metrics: Mapping[str, float],
        *,
        bytes_up: int,
        bytes_down: int,
        byzantine: bool = False,
    ) -> ClientRecord:
        return cls(
            cid=cid,
            model=model,
            accuracy=float(metrics["accuracy"]),
            loss=float(metrics["loss"]),
            num_examples=int(metrics["num_examples"]),
            bytes_up=int(bytes_up),
            bytes_down=int(bytes_down),
            byzantine=byzantine,
            metrics={k: float(v) for k, v in metrics.items() if k not in cls.RESERVED},
        )


@dataclass(frozen=True)
class FailureRecord:
    """A sampled client whose reply could not be used this round, and why (one line).

    ``side`` is who caused it: ``client`` (raised, sent nothing or an invalid
    payload) or ``server`` (sent targets the client could not read). The full
    traceback, when there is one, goes to ``errors.log``, never here.
    """

    cid: int
    error: str
    side: str = "client"
    bytes_up: int = 0
    bytes_down: int = 0

    def describe(self) -> str:
        """``client 3: <why>``, saying so when the server caused it."""
        side = " (the server's fault)" if self.side == "server" else ""
        return f"client {self.cid}{side}: {self.error}"


@dataclass(frozen=True)
class PrivacyRecord:
    """Privacy spent so far, per client and worst case, at ``delta``."""

    mechanism: str
    unit: str
    delta: float
    accountant: str
    epsilon: float
    noise: str
    clients: dict[int, float]
    # PATE: epsilon of the data-dependent RDP analysis (Papernot et al. 2018) at the same
    # delta, beside the enforced data-independent ``epsilon``; it depends on the private
    # votes, so it is not itself DP (the paper releases it via smooth sensitivity)
    epsilon_data_dependent: float | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> PrivacyRecord | None:
        if data is None:
            return None
        d = dict(data)
        d["clients"] = {int(k): float(v) for k, v in d["clients"].items()}
        return cls(**d)


@dataclass(frozen=True)
class FaultsRecord:
    """The simulated faults of one round (empty when ``[faults]`` configures none), as
    :func:`fedkd.faults.plan_round` plans them and the round record keeps them.

    Attributes:
        dropped: sampled clients that do not reply at all this round (dropout).
        delays: simulated extra delay (s) of each straggler this round, by client id
            (the late ones included). A dropped client is never a straggler.
        late: stragglers whose delay exceeds ``faults.deadline`` (when it is > 0):
            their replies arrive too late and are dropped.
        byzantine: the Byzantine clients among the sampled (dropped or late ones too).
    """

    dropped: tuple[int, ...] = ()
    delays: dict[int, float] = field(default_factory=dict)
    late: tuple[int, ...] = ()
    byzantine: tuple[int, ...] = ()

    @property
    def excluded(self) -> tuple[int, ...]:
        """Clients whose replies the server does not use this round (dropped + late), sorted."""
        return tuple(sorted((*self.dropped, *self.late)))

    @property
    def attackers(self) -> tuple[int, ...]:
        """Byzantine clients whose (malicious) replies do reach the server this round."""
        out = set(self.excluded)
        return tuple(c for c in self.byzantine if c not in out)

    def __bool__(self) -> bool:
        return bool(self.dropped or self.delays or self.late or self.byzantine)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready plain data (client-id keys of ``delays`` as strings, as JSON has them)."""
        return {
            "dropped": [int(c) for c in self.dropped],
            "delays": {str(int(c)): float(d) for c, d in sorted(self.delays.items())},
            "late": [int(c) for c in self.late],
            "byzantine": [int(c) for c in self.byzantine],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FaultsRecord:
        """Inverse of :meth:`to_dict` (also accepts int keys in ``delays``)."""
        return cls(
            dropped=tuple(int(c) for c in data.get("dropped", ())),
            delays={int(c): float(d) for c, d in dict(data.get("delays", {})).items()},
            late=tuple(int(c) for c in data.get("late", ())),
            byzantine=tuple(int(c) for c in data.get("byzantine", ())),
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> FaultsRecord | None:
        return None if data is None else cls.from_dict(data)


@dataclass(frozen=True)
class RoundRecord:
    """Everything about one finished round (one line of ``metrics.jsonl``).

    ``failed``: fewer than ``clients.min_success`` of the sampled clients replied
    usably (the run stops after such a round). ``server``: the server model's test
    metrics (``accuracy`` is plotted), None when the strategy has no server model.
    """

    round: int
    seconds: float
    sampled: tuple[int, ...]
    clients: dict[int, ClientRecord]
    failures: tuple[FailureRecord, ...]
    server: dict[str, float] | None
    bytes_up: int
    bytes_down: int
    privacy: PrivacyRecord | None = None
    faults: FaultsRecord | None = None
    failed: bool = False

    @property
    def students(self) -> Stats | None:
        """Accuracy of the honest students that replied (Byzantine clients excluded)."""
        return Stats.of(c.accuracy for c in self.clients.values() if not c.byzantine)

    @property
    def server_accuracy(self) -> float | None:
        return None if not self.server else self.server.get("accuracy")

    @property
    def usable(self) -> int:
        """Sampled clients whose reply was used."""
        return len(self.clients)

    def to_json(self) -> dict[str, Any]:
        out = _plain(self)
        out["students"] = _plain(self.students)  # derived, for people reading the file
        return {"schema": SCHEMA, **out}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundRecord:
        _check_schema(data, "round record")
        return cls(
            round=int(data["round"]),
            seconds=float(data["seconds"]),
            sampled=tuple(data["sampled"]),
            clients={int(k): _client_from_json(k, v) for k, v in data["clients"].items()},
            failures=tuple(FailureRecord(**f) for f in data["failures"]),
            server=None if data["server"] is None else _nums(data["server"]),
            bytes_up=int(data["bytes_up"]),
            bytes_down=int(data["bytes_down"]),
            privacy=PrivacyRecord.from_json(data.get("privacy")),
            faults=FaultsRecord.from_json(data.get("faults")),
            failed=bool(data.get("failed", False)),
        )


@dataclass(frozen=True)
class Architecture:
    """One model of the run: the teacher, or the students of one architecture."""

    model: str
    role: str  # teacher | student
    clients: tuple[int, ...]
    params: int
    bytes: int
    latency_ms: float
    accuracy: float | None
    local_only_accuracy: float | None = None
    pct_of_teacher: float | None = None


@dataclass(frozen=True)
class Final:
    """Final accuracies: each client's last report, and the server model's."""

    students: Stats | None
    local_only: Stats | None
    gain_points: float | None
    teacher: float | None  # the global teacher, where the strategy has one
    server_model: float | None  # the teacher, or the strategy's own server model(s)
    # the other attribution baselines (transfer, fedavg, centralised): students' final
    # accuracies, each client with its own model (centralised: its architecture's)
    baselines: dict[str, Stats] = field(default_factory=dict)
    # students on their own test distribution (global test set, weighted per class by
    # each client's private label shares)
    students_own: Stats | None = None


@dataclass(frozen=True)
class Communication:
    bytes_up: int
    bytes_down: int
    bytes_per_round: float
    fedavg_bytes: int
    fedavg_bytes_per_round: float
    share_of_fedavg: float | None
    # per target accuracy (config `targets`, as a string key "0.35"): the first round in
    # which the students' mean reached it and the bytes sent up to and including it;
    # None where it was never reached
    to_target: dict[str, dict[str, int] | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Failures:
    """Client failures over the run: how many, which clients in which rounds, the first."""

    count: int = 0
    rounds: dict[int, tuple[int, ...]] = field(default_factory=dict)  # round -> failed clients
    first: str | None = None  # "round 2: client 1: RuntimeError: ..."

    @classmethod
    def of(cls, records: Iterable[RoundRecord]) -> Failures:
        rounds: dict[int, tuple[int, ...]] = {}
        first = None
        for r in records:
            if r.failures:
                rounds[r.round] = tuple(f.cid for f in r.failures)
                if first is None:
                    first = f"round {r.round}: {r.failures[0].describe()}"
        return cls(sum(len(v) for v in rounds.values()), rounds, first)

    def describe(self) -> str:
        """One line: which clients failed in which rounds, and the first reason."""
        if not self.count:
            return "no client failed"
        where = "; ".join(
            f"round {r}: client{'s' if len(c) > 1 else ''} {', '.join(map(str, c))}"
            for r, c in list(self.rounds.items())[:5]
        )
        more = f" (+{len(self.rounds) - 5} more rounds)" if len(self.rounds) > 5 else ""
        return f"{self.count} client failure(s): {where}{more}. First: {self.first}"


@dataclass(frozen=True)
class Audit:
    attack: str
    mia_auc: float
    mia_advantage: float
    clients: int


@dataclass(frozen=True)
class RunSummary:
    """The end-of-run summary (``summary.json``)."""

    name: str
    outcome: Outcome
    status: str  # the outcome, with the reason after a colon where there is one
    rounds: int
    rounds_completed: int
    strategy: str
    clients: int
    data: str
    evaluation: str
    final: Final
    architectures: tuple[Architecture, ...]
    communication: Communication
    timing: dict[str, float]
    failures: Failures
    privacy: PrivacyRecord | None = None
    audit: Audit | None = None
    aggregator: str = "mean"
    aggregations: int = 0  # rounds in which the aggregator combined payloads
    faults: dict[str, Any] | None = None  # the [faults] config and totals, when any
    resumed_from: int | None = None  # the round a `fedkd resume` continued after

    @property
    def exit_code(self) -> int:
        return self.outcome.exit_code

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **_plain(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunSummary:
        _check_schema(data, "run summary")
        d = {k: v for k, v in data.items() if k != "schema"}
        f = d["final"]
        d["outcome"] = Outcome(d["outcome"])
        d["final"] = Final(
            **{
                **f,
                "students": Stats.from_json(f["students"]),
                "local_only": Stats.from_json(f["local_only"]),
                "students_own": Stats.from_json(f.get("students_own")),
                "baselines": {k: Stats.from_json(v) for k, v in f.get("baselines", {}).items()},
            }
        )
        d["architectures"] = tuple(
            Architecture(**{**a, "clients": tuple(a["clients"])}) for a in d["architectures"]
        )
        d["communication"] = Communication(**d["communication"])
        fl = d["failures"]
        d["failures"] = Failures(
            fl["count"], {int(k): tuple(v) for k, v in fl["rounds"].items()}, fl["first"]
        )
        d["privacy"] = PrivacyRecord.from_json(d.get("privacy"))
        d["audit"] = None if d.get("audit") is None else Audit(**d["audit"])
        return cls(**d)


def _plain(value: Any) -> Any:
    """Dataclasses, enums, tuples and int keys -> JSON-ready data (NaN -> null)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return _finite_or_none(value)
    return value


def write_jsonl(path: Path, records: Iterable[RoundRecord]) -> None:
    """Write records as JSON lines, replacing ``path`` atomically."""
    from fedkd.results.rundir import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r.to_json()) + "\n" for r in records))


def read_rounds(path: Path) -> list[RoundRecord]:
    """The round records of a ``metrics.jsonl`` or ``baseline.jsonl`` (none if absent).

    A last line cut short by a kill is ignored; any other unreadable line raises.
    """
    if not Path(path).is_file():
        return []
    lines = [x for x in Path(path).read_text().splitlines() if x.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # a torn final line (the run was killed while writing it)
            raise SchemaError(f"{path}: line {i + 1} is not JSON") from None
        out.append(RoundRecord.from_json(data))
    return out


def read_summary(path: Path) -> RunSummary:
    """A run's ``summary.json`` (``path``: the file or its run folder)."""
    p = Path(path)
    if p.is_dir():
        p = p / "summary.json"
    return RunSummary.from_json(json.loads(p.read_text()))
