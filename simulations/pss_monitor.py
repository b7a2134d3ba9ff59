"""Run a command and report the peak memory of it and all its descendants (Ray's
processes included): the sum of their proportional set sizes, sampled every 0.5 s
(:mod:`fedkd.memory`). Linux only (/proc).

Run: ``python simulations/pss_monitor.py fedkd run clients.count=10000 ...``
"""

from __future__ import annotations

import json
import subprocess
import sys

from fedkd.memory import PeakPSS


def main(argv: list[str]) -> int:
    proc = subprocess.Popen(argv)
    with PeakPSS(proc.pid) as peak:
        proc.wait()
    report = {"rc": proc.returncode, "peak_pss_mb": peak.peak_mb}
    print(json.dumps({**report, "processes_at_peak": peak.processes}))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
