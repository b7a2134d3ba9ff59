"""FEMNIST (LEAF, Caldas et al. 2018, https://arxiv.org/abs/1812.01097) from LEAF's JSON shards.

FEMNIST is NIST Special Database 19's handwritten digits and letters grouped by the
writer who drew them: 62 classes, about 3,500 writers. LEAF's preprocessing
(https://github.com/TalwalkarLab/leaf, ``data/femnist``; the full data set with
``./preprocess.sh -s niid --sf 1.0 -k 0 -t sample``) splits every writer's samples into
``train`` and ``test`` (90/10 by default): that is the official split. It writes
``data/femnist/data/{train,test}/*.json``, so ``data.root`` is LEAF's ``data`` folder
(or any folder holding ``femnist/data/{train,test}/``). Every ``*.json`` file of a split's
folder is read, in the order of their names.

Format (LEAF's ``data/femnist/preprocess/data_to_json.py`` and ``data/utils/split_data.py``):
each shard is one JSON object ``{"users": [writer, ...], "num_samples": [n, ...],
"user_data": {writer: {"x": [[784 floats], ...], "y": [label, ...]}}}``. An image is the
128x128 NIST scan converted to 8-bit grey, shrunk to 28x28 (``Image.thumbnail``), flattened
row by row and divided by 255: black ink on a white page, so the background is 1.0 and
the ink near 0, the reverse of MNIST. Labels follow LEAF's ``relabel_class``: 0-9 the
digits, 10-35 ``A``-``Z``, 36-61 ``a``-``z``.

The reader returns images upright as (N, 1, 28, 28) float32 in [0, 1] and, with
``invert=True`` (default), as ``1 - x``: MNIST's convention, ink high on a background
of 0 (``invert=False`` keeps LEAF's values). ``classes`` keeps ``all`` 62 classes,
the 10 ``digits``, the 52 ``letters``, the 26 ``uppercase`` or the 26 ``lowercase``
ones, relabelled from 0 in LEAF's order; or it lists classes (LEAF labels 0..61 or
their characters, a list merging several into one: ``[["a", "A"], ["b", "B"]]`` is
EMNIST-letters' case-merged a and b), relabelled from 0 in the order given (see
:mod:`fedkd.data.classes`). Rows of other classes are dropped while reading. Every row
also carries its writer's id.
Reading the full data set parses about 10 GB of JSON (minutes); fedkd caches the result.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fedkd.config import ConfigError
from fedkd.data.classes import Groups, lookup, parse_classes

__all__ = ["CLASS_SUBSETS", "FEMNIST_CLASSES", "femnist_classes", "femnist_files", "read_femnist"]

#: LEAF's label order: 0-9 digits, 10-35 uppercase, 36-61 lowercase letters
FEMNIST_CLASSES = tuple(string.digits + string.ascii_uppercase + string.ascii_lowercase)

#: the ``classes`` option's subset names: the LEAF labels kept (relabelled to start at 0)
CLASS_SUBSETS: dict[str, range] = {
    "all": range(0, 62),
    "digits": range(0, 10),
    "letters": range(10, 62),
    "uppercase": range(10, 36),
    "lowercase": range(36, 62),
}

PATTERN = "*.json"
PIXELS = 28 * 28
SOURCE = (
    "LEAF, https://github.com/TalwalkarLab/leaf: in its data/femnist folder run "
    "./preprocess.sh -s niid --sf 1.0 -k 0 -t sample (--sf 0.05 for a small sample) and "
    "point data.root at LEAF's data folder (the Hugging Face copy flwrlabs/femnist is "
    "parquet, which fedkd does not read yet)"
)


def _check_options(classes: Any, invert: Any) -> Groups:
    """The options checked; the LEAF labels of each class kept (see :func:`femnist_classes`)."""
    groups = femnist_classes(classes)
    if not isinstance(invert, bool):
        raise ConfigError("data.dataset.invert", f"expected true or false, got {invert!r}")
    return groups


def femnist_classes(classes: Any = "all") -> Groups:
    """The LEAF labels of each class the ``classes`` option keeps (new class k: ``[k]``)."""
    return parse_classes(classes, FEMNIST_CLASSES, "FEMNIST", CLASS_SUBSETS)


def femnist_files(split: str, classes: Any = "all", invert: bool = True) -> list[Path]:
    """The folder of the split's JSON shards, relative to the root."""
    _check_options(classes, invert)
    return [Path("femnist", "data", split)]


def read_femnist(
    files: list[Path], split: str, classes: Any = "all", invert: bool = True
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], np.ndarray]:
    """Read LEAF JSON shards: (x, y, class names, writer id of every row)."""
    groups = _check_options(classes, invert)
    table = lookup(groups, len(FEMNIST_CLASSES))
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    writers: list[np.ndarray] = []
    for path in files:
        for writer, x, y in _shard(path):
            y = table[y]
            mine = y >= 0
            if not mine.all():
                x, y = x[mine], y[mine]
            if len(y):
                xs.append(x)
                ys.append(y)
                writers.append(np.full(len(y), writer))
    x = np.concatenate(xs) if xs else np.empty((0, PIXELS), dtype=np.float32)
    y = np.concatenate(ys) if ys else np.empty(0, dtype=np.int64)
    ids = np.concatenate(writers) if writers else np.empty(0, dtype=np.str_)
    if invert:
        np.subtract(np.float32(1.0), x, out=x)
    x = np.ascontiguousarray(x.reshape(-1, 1, 28, 28))
    names = tuple("/".join(FEMNIST_CLASSES[label] for label in group) for group in groups)
    return x, y, names, ids


def _shard(path: Path) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(writer, x float32 (n, 784), y int64 (n,)) of every writer in one shard, checked."""
    from fedkd.data.readers import CorruptFileError

    def bad(problem: str) -> CorruptFileError:
        return CorruptFileError(path, problem, f"delete it and make it again with {SOURCE}")

    try:
        with path.open("rb") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise bad(f"not valid JSON ({err})") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("users"), list)
        or not isinstance(data.get("user_data"), dict)
    ):
        raise bad(
            "expected LEAF's JSON object with 'users' (a list), 'num_samples' and "
            "'user_data' (an object of writer -> {'x': images, 'y': labels})"
        )
    users, user_data, counts = data["users"], data["user_data"], data.get("num_samples")
    if counts is not None and (not isinstance(counts, list) or len(counts) != len(users)):
        raise bad(f"'num_samples' must be a list with one count per user ({len(users)})")
    for i, writer in enumerate(users):
        entry = user_data.get(writer) if isinstance(writer, str) else None
        if not isinstance(entry, dict) or "x" not in entry or "y" not in entry:
            raise bad(f"user {writer!r} has no 'x' and 'y' in 'user_data'")
        try:
            x = np.asarray(entry["x"], dtype=np.float32)
        except (ValueError, TypeError):
            x = None
        if x is None or (x.ndim != 2 and x.size) or (x.size and x.shape[1] != PIXELS):
            raise bad(f"user {writer!r}: 'x' must be a list of images of {PIXELS} numbers")
        x = x.reshape(-1, PIXELS)
        if x.size and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
            raise bad(f"user {writer!r}: pixel values must lie in [0, 1]")
        y = np.asarray(entry["y"])
        if y.ndim != 1 or (y.size and y.dtype.kind not in "iu"):
            raise bad(f"user {writer!r}: 'y' must be a list of integer labels")
        if len(y) != len(x):
            raise bad(f"user {writer!r} has {len(y)} labels for {len(x)} images")
        if y.size and (y.min() < 0 or y.max() >= len(FEMNIST_CLASSES)):
            raise bad(f"user {writer!r}: labels must lie in 0..61, found {y.min()}..{y.max()}")
        if counts is not None and counts[i] != len(y):
            raise bad(f"'num_samples' says user {writer!r} has {counts[i]} samples, not {len(y)}")
        yield writer, x, y.astype(np.int64)
