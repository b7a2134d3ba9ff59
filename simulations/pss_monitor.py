"""Run a command and report the peak memory of it and all its descendants (Ray's
processes included): the sum of their proportional set sizes (PSS, shared pages
counted once across processes), sampled every 0.5 s. Linux only (/proc).

Run: ``python simulations/pss_monitor.py fedkd run clients.count=10000 ...``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def _children() -> dict[int, list[int]]:
    """Every process's children, by parent id."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def _tree(root: int) -> list[int]:
    """``root`` and all its descendants."""
    kids, out, stack = _children(), [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(kids.get(pid, []))
    return out


def _pss_kb(pid: int) -> int:
    """The proportional set size of ``pid`` in KiB (0 if it has ended)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


def main(argv: list[str]) -> int:
    proc = subprocess.Popen(argv)
    peak, processes = 0, 0
    while proc.poll() is None:
        pids = _tree(proc.pid)
        total = sum(_pss_kb(p) for p in pids)
        if total > peak:
            peak, processes = total, len(pids)
        time.sleep(0.5)
    report = {"rc": proc.returncode, "peak_pss_mb": round(peak / 1024, 1)}
    print(json.dumps({**report, "processes_at_peak": processes}))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
