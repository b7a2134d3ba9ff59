"""Checkpoints: after every round, what the server needs to continue the run.

``<run>/checkpoint/server.pt`` holds the finished rounds' records, the teacher and
its optimizer, the strategy object and ``ServerNode.state`` (server-side models,
caches), the privacy ledger with its accountant histories, the targets for the
next round, counters and the global RNG states. Client state is not in it: each
client's state is saved per round by the client-state store in ``<run>/clients``
(:mod:`fedkd.state_store`), and a resumed round loads the version from before it.

The file is written atomically after the round's record is on disk, so a kill at
any moment leaves the previous checkpoint or this one. It is a pickle of the
run's own objects (strategy state may hold any Python object), so load only
checkpoints you made; client state, which is small and typed, is loaded with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedkd.results.records import SCHEMA, RoundRecord
from fedkd.results.rundir import atomic_write_bytes

if TYPE_CHECKING:
    from fedkd.federation import Federation

FILE = Path("checkpoint") / "server.pt"


def save_checkpoint(run_dir: Path, federation: Federation) -> None:
    """Write the federation's state after its last finished round."""
    s = federation.server
    state: dict[str, Any] = {
        "schema": SCHEMA,
        "round": len(federation.records),
        "records": [r.to_json() for r in federation.records],
        "teacher": s.teacher.state_dict() if s.teacher is not None else None,
        "optimizer": s.optimizer.state_dict() if s.optimizer is not None else None,
        "server_state": s.state,
        "strategy": federation.strategy,
        "ledger": s.privacy,
        "num_examples": s.num_examples,
        "teacher_updates": s.teacher_updates,
        "aggregations": s.aggregations,
        "targets": federation.targets,
        "rng": {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    os.sync()  # the round's client states (written without fsync) reach the disk first
    atomic_write_bytes(Path(run_dir) / FILE, buf.getvalue())


def restore_checkpoint(run_dir: Path, federation: Federation) -> int:
    """Load ``run_dir``'s checkpoint into a freshly built ``federation`` (same config);
    returns the last finished round (0: no checkpoint, the run starts over)."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return 0
    state = torch.load(path, weights_only=False)  # our own pickle (see the module docstring)
    if state.get("schema") != SCHEMA:
        found = state.get("schema")
        raise ValueError(f"{path} was written by another fedkd version (schema {found})")
    s = federation.server
    if state["teacher"] is not None:
        assert s.teacher is not None and s.optimizer is not None
        s.teacher.load_state_dict(state["teacher"])
        s.optimizer.load_state_dict(state["optimizer"])
    s.state = state["server_state"]
    s.privacy = state["ledger"]
    s.num_examples = state["num_examples"]
    s.teacher_updates = state["teacher_updates"]
    s.aggregations = state["aggregations"]
    federation.strategy = state["strategy"]
    federation.targets = state["targets"]
    federation.records = [RoundRecord.from_json(r) for r in state["records"]]
    federation.started = True
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    return int(state["round"])
