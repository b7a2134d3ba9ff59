"""Checkpoints and resume: a run continued after a kill equals the run never killed."""

from __future__ import annotations

import fractions
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedkd.checkpoint import restore_checkpoint, save_checkpoint
from fedkd.client import load_state
from fedkd.config import load_config
from fedkd.data import prepare_federated_data
from fedkd.federation import Federation, Interrupted
from fedkd.inline import InlineTransport
from fedkd.results import (
    SCHEMA,
    RoundRecord,
    SchemaError,
    atomic_write_text,
    read_rounds,
    read_summary,
)
from fedkd.state_store import DiskStateStore
from tests.conftest import SMALL

ROOT = Path(__file__).resolve().parents[1]
FEDKD = str(Path(sys.executable).parent / "fedkd")


def _numbers(records: list[RoundRecord]) -> list:
    """What must be equal between two runs (wall-clock seconds excluded)."""
    return [
        (
            {c: (x.accuracy, x.loss, x.bytes_up, x.bytes_down) for c, x in r.clients.items()},
            r.server,
            r.bytes_up,
            r.bytes_down,
            r.privacy,
        )
        for r in records
    ]


# --- the client-state store ------------------------------------------------------------


def test_state_store_loads_the_newest_version_before_a_round(tmp_path):
    store = DiskStateStore(tmp_path)
    assert store.load(3, 1) is None
    for rnd in (1, 2, 4):
        store.save(3, rnd, f"after {rnd}".encode())
    assert store.load(3, 5) == b"after 4"
    assert store.load(3, 4) == b"after 2"  # round 4 re-run: starts from round 2's state
    assert sorted(p.name for p in (tmp_path / "3").iterdir()) == ["r2.pt", "r4.pt"]
    assert store.discard_after(2) == 1 and store.load(3, 10) == b"after 2"


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_client_state_is_loaded_without_unpickling_code():
    buf = io.BytesIO()
    torch.save(
        {"model": {}, "optimizer": {}, "extra": {"a": np.arange(3), "h": [(1.0, 0.1, 3)]}}, buf
    )
    assert load_state(buf.getvalue())["extra"]["h"] == [(1.0, 0.1, 3)]
    buf = io.BytesIO()
    torch.save({"model": {}, "optimizer": {}, "extra": {"f": fractions.Fraction(1, 3)}}, buf)
    with pytest.raises(RuntimeError, match="cannot be loaded without running pickled code"):
        load_state(buf.getvalue())


# --- typed records -------------------------------------------------------------------


def test_round_records_round_trip_and_refuse_other_schemas(small_config):
    cfg = load_config(small_config, ["rounds=1", "faults.byzantine=1"])
    data, path = prepare_federated_data(cfg)
    (record,) = Federation(cfg, data).run(InlineTransport(cfg, str(path)))
    text = json.dumps(record.to_json())
    assert RoundRecord.from_json(json.loads(text)) == record
    assert record.faults is not None and len(record.faults.byzantine) == 1
    assert record.students is not None and record.students.count == 3  # honest clients only
    old = {**json.loads(text), "schema": SCHEMA - 1}
    with pytest.raises(SchemaError, match="schema"):
        RoundRecord.from_json(old)


# --- checkpoints in process ------------------------------------------------------------


class _After:
    """A stop signal set once ``federation`` has finished ``rounds`` rounds."""

    def __init__(self, federation: Federation, rounds: int) -> None:
        self.federation, self.rounds = federation, rounds

    def is_set(self) -> bool:
        return len(self.federation.records) >= self.rounds


@pytest.mark.parametrize(
    "strategy",
    ["kd", "fedavg", "feddf", "fd", "pate"],  # teacher; server models in state; FD state; ledger
)
def test_restored_checkpoint_continues_exactly(small_config, tmp_path, strategy):
    extra = ["rounds=4", f'strategy={{name="{strategy}"}}', "privacy.audit=false"]
    if strategy == "fedavg":
        extra.append('clients.models=["cnn1d"]')
    cfg = load_config(small_config, extra)
    data, path = prepare_federated_data(cfg)
    straight = Federation(cfg, data).run(InlineTransport(cfg, str(path)))

    store = DiskStateStore(tmp_path / "clients")
    first = Federation(cfg, data)  # stopped after round 2: stands for a run killed there
    with pytest.raises(Interrupted):  # (the same config: one-shot PATE asks in the last round)
        first.run(InlineTransport(cfg, str(path), store), stop=_After(first, 2))
    save_checkpoint(tmp_path, first)
    resumed = Federation(cfg, data)
    assert restore_checkpoint(tmp_path, resumed) == 2
    records = resumed.run(InlineTransport(cfg, str(path), store))
    assert len(records) == 4
    assert _numbers(records) == _numbers(straight)


# --- kill -9 under Flower + Ray, then `fedkd resume` -----------------------------------


def _run_cli(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [FEDKD, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
@pytest.mark.simulation
def test_kill_9_in_round_5_then_resume_equals_the_uninterrupted_run(tmp_path):
    common = [*SMALL, "rounds=10", "privacy.mechanism=client_gaussian", "privacy.mode=local"]
    common.append("privacy.noise_multiplier=0.3")  # epsilon must come out equal too
    killed_dir, full_dir = tmp_path / "killed", tmp_path / "full"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [FEDKD, "run", *common, f"output_dir={killed_dir}", "-q"],
        cwd=tmp_path,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        found = list(killed_dir.glob("*/metrics.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    time.sleep(0.2)  # into round 6: some clients have saved round-6 state already
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, Ray and its workers, like an OOM kill
    proc.wait(timeout=30)
    (run_dir,) = list(killed_dir.iterdir())
    assert 5 <= len(read_rounds(run_dir / "metrics.jsonl")) < 10
    assert not (run_dir / "summary.json").exists()

    resumed = _run_cli(["resume", str(run_dir), "-q"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    full = _run_cli(["run", *common, f"output_dir={full_dir}", "-q"], tmp_path)
    assert full.returncode == 0, full.stderr
    (full_run,) = list(full_dir.iterdir())

    a, b = read_summary(run_dir), read_summary(full_run)
    assert a.resumed_from is not None and a.resumed_from >= 5
    assert a.status == b.status == "completed"
    assert a.final == b.final
    assert a.communication == b.communication
    assert a.privacy == b.privacy and a.privacy is not None and a.privacy.epsilon > 0
    assert _numbers(read_rounds(run_dir / "metrics.jsonl")) == _numbers(
        read_rounds(full_run / "metrics.jsonl")
    )
    # a run that has ended is not resumed (nothing starts; exit 2 names the folder)
    again = _run_cli(["resume", str(full_run)], tmp_path)
    assert again.returncode == 2 and "has ended (completed)" in again.stderr


def test_client_states_reach_the_disk_before_the_checkpoint_naming_their_round(
    small_config, tmp_path, monkeypatch
):
    """Client states are written without an fsync each; the checkpoint makes them durable
    (one os.sync) before its own atomic, fsynced write."""
    calls: list[str] = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync"))
    monkeypatch.setattr(os, "sync", lambda: calls.append("sync"))
    DiskStateStore(tmp_path / "clients").save(0, 1, b"state")
    assert calls == []  # no flush per client state
    cfg = load_config(small_config, ["rounds=1", "privacy.audit=false"])
    federation = Federation(cfg, prepare_federated_data(cfg)[0])
    save_checkpoint(tmp_path, federation)
    assert calls == ["sync", "fsync"]  # the states first, then the checkpoint itself
