"""simulations/pss_monitor.py reports the peak memory of a command and its children."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_it_counts_the_memory_of_a_child_process():
    # a parent that starts a child holding 80 MB: the child's pages must be counted
    child = (
        "import time; b = bytearray(80_000_000); b[::4096] = b'x' * len(b[::4096]); time.sleep(2)"
    )
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "simulations" / "pss_monitor.py"),
            sys.executable,
            "-c",
            parent,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["rc"] == 0 and report["processes_at_peak"] >= 2
    assert report["peak_pss_mb"] >= 70
