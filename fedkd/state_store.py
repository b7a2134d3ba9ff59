"""Where each client's state lives between rounds: its student, optimizer and extras.

A client's state is saved once per round it takes part in, as a version keyed by
that round, and loaded as the newest version from before the current round. So a
round that is run again (after ``fedkd resume``) starts from exactly the state the
first attempt started from, whatever the killed attempt had already written.

:class:`DiskStateStore` keeps versions in the run folder (``clients/<cid>/r<round>.pt``),
written atomically; it serves Flower+Ray workers on one machine and is what
checkpoints and resume rely on. On an attached Ray cluster
(``simulation.ray_address``) only the driver writes it: each client's state travels
in its messages (:mod:`fedkd.flower`), so no node needs the driver's disk.
:class:`MemoryStateStore` keeps them in this process (the in-process baseline).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

from fedkd.results.rundir import atomic_write_bytes

_VERSION = re.compile(r"^r(\d+)\.pt$")


class StateStore(Protocol):
    def load(self, cid: int, before_round: int) -> bytes | None:
        """The newest state of ``cid`` saved in a round < ``before_round`` (None: none)."""
        ...

    def save(self, cid: int, rnd: int, blob: bytes) -> None:
        """Save ``cid``'s state after round ``rnd``."""
        ...


class MemoryStateStore:
    """Client states in this process's memory (only the newest version is kept)."""

    def __init__(self) -> None:
        self._states: dict[int, tuple[int, bytes]] = {}

    def load(self, cid: int, before_round: int) -> bytes | None:
        saved = self._states.get(cid)
        return saved[1] if saved is not None and saved[0] < before_round else None

    def save(self, cid: int, rnd: int, blob: bytes) -> None:
        self._states[cid] = (rnd, blob)


class DiskStateStore:
    """Client states as files ``<root>/<cid>/r<round>.pt``.

    Saving round r keeps the newest older version too (round r may be re-run after a
    crash, and must then start from it) and deletes the rest.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _versions(self, cid: int) -> list[int]:
        folder = self.root / str(cid)
        if not folder.is_dir():
            return []
        found = (_VERSION.match(p.name) for p in folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def _path(self, cid: int, rnd: int) -> Path:
        return self.root / str(cid) / f"r{rnd}.pt"

    def load(self, cid: int, before_round: int) -> bytes | None:
        older = [v for v in self._versions(cid) if v < before_round]
        return self._path(cid, older[-1]).read_bytes() if older else None

    def save(self, cid: int, rnd: int, blob: bytes) -> None:
        # not flushed one by one (an fsync per client per round was ~6% of a worker's
        # time): save_checkpoint makes them durable before the checkpoint naming the round
        atomic_write_bytes(self._path(cid, rnd), blob, durable=False)
        older = [v for v in self._versions(cid) if v < rnd]
        for v in older[:-1]:  # keep the newest older version
            self._path(cid, v).unlink(missing_ok=True)

    def discard_after(self, rnd: int) -> int:
        """Delete every version saved after round ``rnd`` (a resumed run redoes those
        rounds); returns how many were deleted."""
        if not self.root.is_dir():
            return 0
        count = 0
        for folder in self.root.iterdir():
            if folder.is_dir() and folder.name.isdigit():
                for v in self._versions(int(folder.name)):
                    if v > rnd:
                        self._path(int(folder.name), v).unlink(missing_ok=True)
                        count += 1
        return count
