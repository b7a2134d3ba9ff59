"""Shared fixtures: a small, fast experiment config and an isolated data cache."""

from __future__ import annotations

import pytest

from fedkd.config import Config, load_config

SMALL = [
    "data.private=1200",
    "data.public=400",
    "data.test=400",
    "clients.count=4",
    "rounds=3",
    "server.teacher.channels=32",
]


@pytest.fixture(autouse=True)
def _data_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDKD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def small_config(tmp_path) -> Config:
    """4 clients (MLP and CNN students), 3 rounds, 1,200 private MNIST-1D samples."""
    return load_config(None, [*SMALL, f"output_dir={tmp_path}"])


@pytest.fixture
def server(tmp_path):
    """A folder served over HTTP on 127.0.0.1 (see tests/http_server.py)."""
    from tests.http_server import serve

    with serve(tmp_path / "served") as srv:
        yield srv
