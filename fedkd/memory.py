"""Peak memory of a process and all its descendants (Ray's processes included): the
sum of their proportional set sizes (PSS: a page shared by n processes counts 1/n in
each, so shared libraries and Ray's shared memory are counted once). Linux (/proc)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self  # (type checkers only; typing.Self is 3.11+)


def stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (which may hold spaces
    and parentheses): index 0 is the state, 1 the parent id (``man 5 proc``, field 3
    on); None if the process has ended."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _children() -> dict[int, list[int]]:
    """Every process's children, by parent id."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = stat_fields(int(entry))
        if fields is None:
            continue  # the process ended meanwhile
        kids.setdefault(int(fields[1]), []).append(int(entry))
    return kids


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants."""
    kids, out, stack = _children(), [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(kids.get(pid, []))
    return out


def pss_kb(pid: int) -> int:
    """The proportional set size of ``pid`` in KiB (0 if it has ended)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


class TreeSampler:
    """Calls :meth:`sample` on ``pid``'s process tree every ``interval`` seconds, in a
    thread, while active (a ``with`` block), starting as the block starts; with
    ``until``, no more once it returns true (checked after each sample)."""

    def __init__(self, pid: int, interval: float, until: Callable[[], bool] | None = None) -> None:
        self.pid, self.interval, self.until = pid, interval, until
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self, pids: list[int]) -> None:
        """Take one sample of the processes ``pids`` (the tree now)."""
        raise NotImplementedError

    def _run(self) -> None:
        while True:
            self.sample(process_tree(self.pid))
            if self.until is not None and self.until():
                break
            if self._done.wait(self.interval):
                break

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        err: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done.set()
        self._thread.join()


class PeakPSS(TreeSampler):
    """Samples the PSS of ``pid``'s process tree every ``interval`` seconds while active
    (a ``with`` block); ``peak_mb`` and ``processes`` (at the peak) after it."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(pid, interval)
        self.peak_kb, self.processes = 0, 0

    @property
    def peak_mb(self) -> float:
        return round(self.peak_kb / 1024, 1)

    def sample(self, pids: list[int]) -> None:
        total = sum(pss_kb(p) for p in pids)
        if total > self.peak_kb:
            self.peak_kb, self.processes = total, len(pids)
