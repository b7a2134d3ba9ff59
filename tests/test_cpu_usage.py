"""CPUTrace counts the CPU time of a process tree by kind of process: the process itself,
Ray's worker processes (``ray::...``) and any other descendant (Ray's services)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from fedkd.cpu_usage import KINDS, CPUTrace, cpu_seconds

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\n"

# the root burns CPU, then starts a "worker" (argv[0] ray::Fake, as Ray names them) and
# an "agent" (ray::FakeAgent, as Ray names its services' agents), each burning CPU and
# then waiting, so the trace sees their last figure
ROOT = f"""
import subprocess, sys, time
{BURN}
burn = {BURN!r} + "time.sleep(0.6)"
named = 'exec -a "$2" "$0" -c "$1"'
kids = [
    subprocess.Popen(["bash", "-c", named, sys.executable, burn, "ray::Fake"]),
    subprocess.Popen(["bash", "-c", named, sys.executable, burn, "ray::FakeAgent"]),
]
for k in kids:
    k.wait()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_it_counts_each_kind_of_process_in_the_tree():
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-c", ROOT])
    with CPUTrace(proc.pid, interval=0.05) as trace:
        proc.wait()
    assert proc.returncode == 0
    final = trace.at(time.time())
    assert set(final) == set(KINDS)
    for kind in KINDS:  # each burnt 0.4 s (a sample may miss the last tenths)
        assert final[kind] >= 0.25, (kind, final)
    assert trace.at(started - 1) == dict.fromkeys(KINDS, 0.0)  # before any sample
    totals = [sum(t.values()) for _, t in trace.samples]
    assert totals == sorted(totals)  # a process that ended keeps its last figure


def test_an_ended_process_has_no_cpu_figure():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert cpu_seconds(proc.pid) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_program_not_its_arguments_makes_a_worker(tmp_path):
    from fedkd.cpu_usage import kind_of

    script = tmp_path / "default_worker.py"
    script.write_text("import time\ntime.sleep(30)\n")
    sleep = "import time; time.sleep(30)"
    named = 'exec -a "$1" "$0" -c "$2" "$3"'
    procs = {
        # a worker before it names itself: python -u .../default_worker.py
        "workers": [sys.executable, "-u", str(script)],
        "ray::IDLE": ["bash", "-c", named, sys.executable, "ray::IDLE", sleep, "x"],
        # the raylet names the worker program among its arguments
        "raylet": [
            "bash",
            "-c",
            named,
            sys.executable,
            "raylet",
            sleep,
            f"--python_worker_command={sys.executable} {script}",
        ],
        "agent": ["bash", "-c", named, sys.executable, "ray::DashboardAgent", sleep, "x"],
    }
    expected = {"workers": "workers", "ray::IDLE": "workers", "raylet": "ray", "agent": "ray"}
    started = {k: subprocess.Popen(cmd) for k, cmd in procs.items()}
    try:
        time.sleep(1.0)  # each has run its own program by then
        got = {k: kind_of(p.pid, root=-1) for k, p in started.items()}
        assert got == expected
        assert kind_of(started["raylet"].pid, root=started["raylet"].pid) == "process"
    finally:
        for p in started.values():
            p.kill()
            p.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_it_stops_sampling_once_until_says_so():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.6)"])
    asked = []
    with CPUTrace(proc.pid, interval=0.05, until=lambda: asked.append(1) or len(asked) >= 2):
        proc.wait()
    assert len(asked) == 2  # asked after each sample, and no sample after it said yes
