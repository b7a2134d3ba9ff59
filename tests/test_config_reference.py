"""The configuration reference is generated from the config's own comments: every key
has one, and docs/configuration.md is the generated page as it stands."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fedkd.config_reference import SECTIONS, field_comments, reference

PAGE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_every_config_key_has_a_comment():
    missing = [
        f"{name}.{f.name}" if name else f.name
        for name, cls in SECTIONS
        for f in dataclasses.fields(cls)
        if not dataclasses.is_dataclass(f.type)
        and not field_comments(cls).get(f.name)
        and f.name not in {s for s, _ in SECTIONS}
    ]
    assert not missing, f"config keys without a comment in fedkd/config.py: {missing}"


def test_the_reference_page_is_up_to_date():
    assert PAGE.read_text() == reference(), (
        "docs/configuration.md is stale: run "
        "`python -m fedkd.config_reference > docs/configuration.md`"
    )


def test_the_page_documents_the_recipe_keys_once():
    page = reference()
    for key in (
        "clients.optimizer",
        "clients.schedule",
        "clients.grad_clip",
        "clients.label_smoothing",
        "server.schedule",
        "data.augment",
        "amp",
    ):
        assert page.count(f"| `{key}` |") == 1, key
    assert 'clock = "step"' in page and "warmup" in page
