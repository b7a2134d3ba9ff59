"""CPU time of a process and all its descendants (Ray's local processes included), over
time, by kind of process: the process itself, Ray's worker processes, and Ray's own
services (GCS, raylet, dashboard, monitors, agents). Linux (/proc).

``fedkd bench`` uses it to say how much CPU a start-up burns before round 1, which
bounds it from below: on ``n`` cores it cannot take less than its CPU-seconds over
``n``, however well its parts overlap."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from fedkd.memory import TreeSampler, stat_fields

#: the kinds a process of the tree is counted under, in the order they are printed
KINDS = ("process", "workers", "ray")

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> tuple[float, int] | None:
    """``pid``'s user plus system CPU seconds so far, and its start time (clock ticks
    after boot: with the pid, it names the process even once the pid is reused); None
    if it has ended."""
    fields = stat_fields(pid)
    try:
        return (int(fields[11]) + int(fields[12])) / _TICK, int(fields[19])  # type: ignore[index]
    except (TypeError, IndexError, ValueError):  # (None: it has ended)
        return None


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds ``pid`` has used so far (None if it has ended)."""
    stat = _stat(pid)
    return None if stat is None else stat[0]


def kind_of(pid: int, root: int) -> str:
    """``root`` itself ("process"), a Ray worker process ("workers": named ``ray::IDLE``
    or ``ray::<actor or task>`` once started, running ``default_worker.py`` while it
    starts), or another of Ray's ("ray": GCS, raylet, dashboard, monitors, and its
    agents, which are named ``ray::...Agent``). The program is what counts: the
    raylet's own arguments name ``default_worker.py`` too."""
    if pid == root:
        return "process"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = [a.decode(errors="replace").strip() for a in f.read().split(b"\0")]
    except OSError:
        return "ray"
    name = args[0] if args else ""
    if name.startswith("ray::"):
        return "ray" if name.split()[0].endswith("Agent") else "workers"
    # python [-u] .../default_worker.py ...: a worker before it names itself
    program = next((a for a in args[1:3] if not a.startswith("-")), "")
    return "workers" if os.path.basename(program) == "default_worker.py" else "ray"


class CPUTrace(TreeSampler):
    """Samples the CPU seconds of ``pid``'s process tree every ``interval`` seconds while
    active (a ``with`` block). A process that ends keeps the last figure it was seen
    with, so the totals only grow. They are lower bounds: what a process uses after
    its last sample, and a process that starts and ends between two samples, are not
    counted.

    After it, :meth:`at` gives the CPU seconds by kind (:data:`KINDS`) at the last
    sample taken at or before a given time. ``until``: stop sampling once it returns
    true (e.g. once the start-up being measured is over)."""

    def __init__(
        self, pid: int, interval: float = 0.1, until: Callable[[], bool] | None = None
    ) -> None:
        super().__init__(pid, interval, until)
        self.samples: list[tuple[float, dict[str, float]]] = []
        # (pid, start time) -> (kind, cpu seconds): a reused pid is another process
        self._seen: dict[tuple[int, int], tuple[str, float]] = {}

    def sample(self, pids: list[int]) -> None:
        for p in pids:
            stat = _stat(p)
            if stat is None:
                continue
            cpu, started = stat
            known = self._seen.get((p, started), ("ray", 0.0))[0]
            # "ray" is asked again: a process just forked shows its parent's command
            # line until it runs its own program
            kind = known if known != "ray" else kind_of(p, self.pid)
            self._seen[(p, started)] = (kind, cpu)
        totals = dict.fromkeys(KINDS, 0.0)
        for kind, cpu in self._seen.values():
            totals[kind] += cpu
        self.samples.append((time.time(), totals))  # (taken after the reads: a lower bound)

    def at(self, when: float) -> dict[str, float]:
        """CPU seconds by kind at the last sample taken at or before ``when`` (zeros if
        none was)."""
        before = [totals for t, totals in self.samples if t <= when]
        return dict(before[-1]) if before else dict.fromkeys(KINDS, 0.0)
