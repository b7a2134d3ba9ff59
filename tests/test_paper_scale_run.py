"""The paper-scale path end to end, as a user types it: official files on disk, a
proxy set of its own, the papers' models, a training recipe, through Flower + Ray."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedkd.results import read_rounds, read_summary
from tests.test_official_data import TEST, write_cifar10, write_cifar100


def _fedkd(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fedkd.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("paper")
    write_cifar10(root)  # 5 x 40 training images, 50 test images
    write_cifar100(root)
    return root


def test_missing_files_exit_2_before_ray_naming_the_files_and_the_key(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = _fedkd(
        "run",
        "data.dataset=cifar10",
        f"data.root={tmp_path / 'empty'}",
        "data.public.dataset=cifar10",
        "data.public.size=200",
        'clients.models=["resnet8"]',
        "server.teacher.name=resnet20",
        "rounds=1",
        f"output_dir={tmp_path / 'runs'}",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert time.monotonic() - start < 10
    err = proc.stderr
    assert "cifar-10-batches-py/data_batch_1" in err and str(tmp_path / "empty") in err
    assert "data.download = true" in err
    assert not (tmp_path / "runs").exists()  # before anything ran


@pytest.mark.simulation
def test_cifar10_clients_with_a_cifar100_proxy_run_under_flower_and_ray(
    folder: Path, tmp_path: Path
) -> None:
    """Private and public sets from different datasets and label spaces, ResNet students
    and teacher, SGD with momentum, a cosine schedule, augmentation on: one round."""
    proc = _fedkd(
        "run",
        "data.dataset=cifar10",
        f"data.root={folder}",
        "data.private=120",
        "data.test=0",
        'data.public={dataset="cifar100", size=40}',
        "clients.count=2",
        'clients.models=["resnet8"]',
        'clients.optimizer={name="sgd", momentum=0.9, weight_decay=0.0005}',
        "clients.lr=0.05",
        'clients.schedule={name="cosine", clock="step"}',
        "clients.local_epochs=1",
        "server.teacher.name=resnet20",
        "server.epochs=1",
        "partition=iid",
        "rounds=1",
        "baseline=false",
        f"output_dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = tmp_path.iterdir()
    summary = read_summary(run)
    assert summary.status == "completed"
    assert f"({TEST} samples)" in summary.evaluation  # the whole official test split
    (record,) = read_rounds(run / "metrics.jsonl")
    assert sorted(record.clients) == [0, 1] and record.server and "accuracy" in record.server
    assert all(0 < c.metrics["train_lr"] < 0.05 for c in record.clients.values())
    config = (run / "config.toml").read_text()
    assert 'dataset = "cifar100"' in config and "resnet20" in config
    assert json.loads((run / "summary.json").read_text())["outcome"] == "completed"


@pytest.mark.slow
@pytest.mark.simulation
def test_the_issue_command_completes_on_official_cifar10_files(
    folder: Path, tmp_path: Path
) -> None:
    """The "done when" command of the paper-scale issue, on tiny official files."""
    proc = _fedkd(
        "run",
        "data.dataset=cifar10",
        f"data.root={folder}",
        "data.public.dataset=cifar10",
        "data.public.size=20",
        "data.private=100",
        "data.test=0",
        "clients.count=4",
        "partition=iid",
        'clients.models=["resnet8"]',
        "server.teacher.name=resnet20",
        "rounds=1",
        f"output_dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = tmp_path.iterdir()
    summary = read_summary(run)
    assert summary.status == "completed" and f"({TEST} samples)" in summary.evaluation
