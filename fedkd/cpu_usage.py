"""CPU time of a process and all its descendants (Ray's local processes included), over
time, by kind of process: the process itself, Ray's worker processes, and Ray's own
services (GCS, raylet, dashboard, monitors, agents). Linux (/proc).

``fedkd bench`` uses it to say how much CPU a start-up burns before round 1, which
bounds it from below: on ``n`` cores it cannot take less than its CPU-seconds over
``n``, however well its parts overlap."""

from __future__ import annotations

import os
import time

from fedkd.memory import TreeSampler

#: the kinds a process of the tree is counted under, in the order they are printed
KINDS = ("process", "workers", "ray")

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds ``pid`` has used so far (None if it has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


def kind_of(pid: int, root: int) -> str:
    """``root`` itself ("process"), a Ray worker process ("workers": ``ray::IDLE`` or
    ``ray::<actor or task>`` once started, ``default_worker.py`` while it starts), or
    another of Ray's ("ray": GCS, raylet, dashboard, monitors, and its agents, which
    are also named ``ray::...Agent``)."""
    if pid == root:
        return "process"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "ray"
    if "default_worker.py" in cmd:
        return "workers"
    name = cmd.split(" ", 1)[0]
    return "workers" if name.startswith("ray::") and not name.endswith("Agent") else "ray"


class CPUTrace(TreeSampler):
    """Samples the CPU seconds of ``pid``'s process tree every ``interval`` seconds while
    active (a ``with`` block). A process that ends keeps the last figure it was seen
    with, so the totals only grow; they are lower bounds by at most one interval.

    After it, :meth:`at` gives the CPU seconds by kind (:data:`KINDS`) at the last
    sample taken at or before a given time."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(pid, interval)
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._seen: dict[int, tuple[str, float]] = {}  # pid -> (kind, cpu seconds)

    def sample(self, pids: list[int]) -> None:
        now = time.time()
        for p in pids:
            cpu = cpu_seconds(p)
            if cpu is None:
                continue
            known = self._seen.get(p, ("ray", 0.0))[0]
            # "ray" is asked again: a process just forked shows its command line later
            kind = known if known != "ray" else kind_of(p, self.pid)
            self._seen[p] = (kind, cpu)
        totals = dict.fromkeys(KINDS, 0.0)
        for kind, cpu in self._seen.values():
            totals[kind] += cpu
        self.samples.append((now, totals))

    def at(self, when: float) -> dict[str, float]:
        """CPU seconds by kind at the last sample taken at or before ``when`` (zeros if
        none was)."""
        before = [totals for t, totals in self.samples if t <= when]
        return dict(before[-1]) if before else dict.fromkeys(KINDS, 0.0)
