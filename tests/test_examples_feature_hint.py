"""The strategy author's page: its feature-based example runs, and so do its snippets.

``examples/feature_hint_strategy.py`` (a user strategy whose step loss reads the
student's embedding) is shown verbatim in docs/write_your_own_strategy.md; the page's
loss configs, user loss, user model and user payload are run here as written.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import tomllib
import torch

from fedkd.config import ConfigError, load_config
from fedkd.data import prepare_federated_data
from fedkd.federation import Federation
from fedkd.inline import InlineTransport
from fedkd.kd import LOSSES
from fedkd.privacy.preflight import preflight
from fedkd.selection import server_strategy

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "feature_hint_strategy.py"
PAGE = ROOT / "docs" / "write_your_own_strategy.md"
FAST = ["rounds=2", "privacy.audit=false"]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", PAGE.read_text(), flags=re.S)


def _block(lang: str, marker: str) -> str:
    (block,) = [b for b in _blocks(lang) if marker in b]
    return block


def _module(tmp_path: Path, name: str, source: str) -> ModuleType:
    """``source`` as an importable module ``name`` (on sys.path for fedkd's imports)."""
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _page_config(tmp_path: Path, block: str):
    """A TOML block of the page as the config file of a small, fast run."""
    from tests.conftest import SMALL

    (tmp_path / "page.toml").write_text(block)
    return load_config(tmp_path / "page.toml", [*SMALL, f"output_dir={tmp_path}", *FAST])


def _run(cfg):
    data, path = prepare_federated_data(cfg)
    return Federation(cfg, data).run(InlineTransport(cfg, str(path)))


# --- the worked example -------------------------------------------------------------------


def test_the_example_is_short_and_shown_verbatim_on_the_page():
    source = EXAMPLE.read_text()
    assert len([line for line in source.splitlines() if line.strip()]) < 60
    assert source in _blocks("python")


def test_the_example_runs_two_rounds_in_process(small_config, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))  # `examples` is Opacus' package name
    cfg = load_config(
        small_config, [*FAST, "strategy.name=feature_hint_strategy:RelationKD",
                       "strategy.rkd_weight=0.5"],
    )  # fmt: skip
    records = _run(cfg)
    assert len(records) == 2 and not any(r.failures for r in records)
    first, second = (r.clients for r in records)
    assert len(first) == len(second) == 4
    assert all("train_rkd" not in r.metrics and r.metrics["train_ce"] > 0 for r in first.values())
    for r in second.values():  # the teacher's embeddings arrived with the targets
        assert all(np.isfinite(r.metrics[k]) for k in ("train_ce", "train_soft_kl", "train_rkd"))
        assert r.metrics["train_rkd"] > 0 and r.bytes_down > 0


def test_the_example_is_refused_before_the_run_under_dp_sgd(small_config, monkeypatch):

    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    cfg = load_config(
        small_config, ["strategy.name=feature_hint_strategy:RelationKD",
                       "privacy.mechanism=dpsgd", "privacy.noise_multiplier=1.0"],
    )  # fmt: skip
    with pytest.raises(ConfigError, match="custom training loss"):
        preflight(cfg, prepare_federated_data(cfg)[0])


# --- the page's snippets ------------------------------------------------------------------


def test_the_loss_table_names_every_built_in_loss_and_its_parameters():
    page = PAGE.read_text()
    table = page[page.index("### 3.2 Built-in losses") : page.index("### 3.3")]
    for name in LOSSES.names():
        (row,) = [line for line in table.splitlines() if line.startswith(f"| `{name}` |")]
        loss = LOSSES.get(name)()
        for need in loss.needs:  # defaults' needs, as written (student.<student_key>...)
            side, _, key = need.partition(".")
            assert need in row or f"{side}.<{side}_key>" in row, (name, need)
        for p in inspect.signature(LOSSES.get(name).__init__).parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self":
                default = f'"{p.default}"' if isinstance(p.default, str) else repr(p.default)
                assert f"`{p.name} = {default}`" in row, (name, p.name, default)


@pytest.mark.parametrize("marker", ['name = "hint"', 'name = "rkd"'])
def test_the_config_only_feature_losses_are_valid_with_kd(marker, tmp_path):
    block = _block("toml", marker)
    assert tomllib.loads(block)["strategy"]["name"] == "kd"
    (tmp_path / "c.toml").write_text(block)
    strategy = server_strategy(load_config(tmp_path / "c.toml"))
    assert "embedding" in strategy.target_features()


def test_the_rkd_config_runs(tmp_path):
    records = _run(_page_config(tmp_path, _block("toml", 'name = "rkd"')))
    assert all(np.isfinite(r.metrics["train_rkd"]) for r in records[1].clients.values())


def test_the_user_loss_from_the_page_runs_in_a_federation(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    _module(tmp_path, "page_sp_loss", _block("python", "class SimilarityPreserving"))
    block = _block("toml", "SimilarityPreserving").replace("my_lab.losses", "page_sp_loss")
    cfg = _page_config(tmp_path, block)
    assert "embedding" in Federation(cfg, prepare_federated_data(cfg)[0]).server.clients_read
    records = _run(cfg)
    key = "train_page_sp_loss:SimilarityPreserving"
    assert all(r.metrics[key] > 0 for r in records[1].clients.values())


def test_the_user_model_from_the_page_has_features(tmp_path):
    from fedkd.models import FeatureError, embedding_dim, features

    module = _module(tmp_path, "page_two_layer", _block("python", "class TwoLayer"))
    model = module.TwoLayer((40,), 10)
    out = features(model, torch.zeros(3, 40))
    assert list(out) == ["embedding", "logits"] and out["logits"].shape == (3, 10)
    assert embedding_dim(model, (40,)) == 64
    with pytest.raises(FeatureError, match="does not expose features"):
        features(torch.nn.Identity(), torch.zeros(3, 40))


def test_the_user_payload_from_the_page_crosses_the_wire(tmp_path):
    from fedkd.payloads import PayloadError
    from fedkd.wire import payload_to_record, record_to_payload

    module = _module(tmp_path, "page_payload", _block("python", "class ClassScores"))
    p = module.ClassScores(np.arange(10, dtype=np.float32))
    back = record_to_payload(p.kind, payload_to_record(p))
    assert isinstance(back, module.ClassScores) and np.array_equal(back.scores, p.scores)
    assert p.nbytes == 40
    back.validate(num_classes=10)
    with pytest.raises(PayloadError, match="expected 3 finite scores"):
        p.validate(num_classes=3)
