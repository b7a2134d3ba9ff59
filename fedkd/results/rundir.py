"""The run folder: resolved config, per-round records, errors, checkpoints, summary.

Layout of ``<output_dir>/<name>-<YYYYmmdd-HHMMSS>[-k]/``::

    config.toml        the resolved config (what `fedkd resume` continues)
    metrics.jsonl      one RoundRecord per finished round, appended as it ends
    baseline.jsonl     the local-only baseline's rounds
    errors.log         each failure's full traceback, once, in plain text
    checkpoint/        server.pt after every round (see fedkd.checkpoint)
    clients/           every client's state, per round it took part in
    summary.json/.txt  the RunSummary, and as a table; accuracy.png

Every file that is rewritten is written to a temporary file and renamed, so a
kill at any moment leaves either the old or the new version, never a torn one.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path

from fedkd.config import Config, save_config
from fedkd.results.records import RoundRecord, RunSummary

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def plain_text(text: str) -> str:
    """``text`` without ANSI colour codes (Ray colours its tracebacks)."""
    return _ANSI.sub("", text)


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (atomic on POSIX).
    ``durable``: flushed to the disk before the rename (an OS crash keeps it whole);
    without, a killed process still leaves the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


class RunDirectory:
    """One run's folder (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, config: Config) -> RunDirectory:
        root = Path(config.output_dir)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path, k = root / f"{config.name}-{stamp}", 1
        while path.exists():
            k += 1
            path = root / f"{config.name}-{stamp}-{k}"
        path.mkdir(parents=True)
        save_config(config, path / "config.toml")
        return cls(path)

    def child(self, name: str, config: Config) -> RunDirectory:
        """A run folder ``name`` inside this one (one seed of a multi-seed run)."""
        path = self.path / name
        path.mkdir(parents=True)
        save_config(config, path / "config.toml")
        return RunDirectory(path)

    @property
    def clients_dir(self) -> Path:
        return self.path / "clients"

    def append_round(self, name: str, record: RoundRecord) -> None:
        """Append one round to ``name`` (``metrics.jsonl`` or ``baseline.jsonl``) and flush."""
        with open(self.path / name, "a") as f:
            f.write(json.dumps(record.to_json()) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def log_error(self, where: str, message: str, traceback: str | None) -> None:
        """Append one failure's full traceback (plain text) to ``errors.log``."""
        with open(self.path / "errors.log", "a") as f:
            f.write(f"=== {where}: {plain_text(message)}\n")
            if traceback:
                f.write(plain_text(traceback).rstrip() + "\n")
            f.write("\n")

    def write_summary(self, summary: RunSummary, table: str) -> None:
        atomic_write_text(self.path / "summary.json", json.dumps(summary.to_json(), indent=2))
        atomic_write_text(self.path / "summary.txt", table)
