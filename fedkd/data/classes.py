"""Class subsets of official datasets: the ``classes`` reader option.

Every official dataset takes ``classes`` among its reader options (in ``data.dataset``,
or in a proxy-set table ``data.public``): only the rows of the listed classes are kept,
relabelled ``0..K-1`` in the order given, and the test split is filtered the same way.
An entry is

- a label index of the dataset as read under its other options (CIFAR-100 ``labels =
  "coarse"``: a superclass index 0..19; EMNIST ``subset = "letters"``: 0..25 for a..z;
  FEMNIST: LEAF's 0..61),
- a class name, for readers that know their names without reading files (digits
  ``"0"``..``"9"``, letters, CIFAR-10 and STL-10 names, Fashion-MNIST's), or
- a list of those, merged into one class (FEMNIST ``["a", "A"]``: EMNIST-letters' case-
  merged a).

FEMNIST also takes a subset name (``classes = "lowercase"``, see :mod:`fedkd.data.femnist`).
Errors are :class:`~fedkd.config.ConfigError` on ``data.dataset.classes``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedkd.config import ConfigError

__all__ = ["FIELD", "Groups", "lookup", "parse_classes"]

FIELD = "data.dataset.classes"

#: new class k is the rows whose label (as read) is in ``groups[k]``
Groups = tuple[tuple[int, ...], ...]


def parse_classes(
    value: Any,
    known: tuple[str, ...] | int,
    title: str,
    subsets: Mapping[str, Sequence[int]] | None = None,
) -> Groups:
    """The ``classes`` option checked and resolved to label groups.

    ``known`` is the dataset's class names (label k is ``known[k]``) or, where names
    are only in its files, its class count; ``subsets`` are named subsets the reader
    takes (FEMNIST's). Raises :class:`ConfigError` on ``data.dataset.classes`` for an
    unknown or repeated class, an empty entry, or fewer than 2 classes.
    """
    count = known if isinstance(known, int) else len(known)
    names = None if isinstance(known, int) else known
    if isinstance(value, str):
        if subsets and value in subsets:
            return tuple((label,) for label in subsets[value])
        named = f"one of {', '.join(subsets)} or " if subsets else ""
        raise ConfigError(
            FIELD,
            f"{value!r} is not {named}a list of classes (label indices 0..{count - 1}"
            f"{', class names' if names else ''} or lists of them to merge into one class)",
        )
    if not isinstance(value, list | tuple) or not value:
        raise ConfigError(
            FIELD,
            f"expected a non-empty list of classes of {title} (label indices 0..{count - 1}"
            f"{', class names' if names else ''}, or lists of them to merge), got {value!r}",
        )
    groups: list[tuple[int, ...]] = []
    seen: dict[int, int] = {}
    for i, entry in enumerate(value):
        members = list(entry) if isinstance(entry, list | tuple) else [entry]
        if not members:
            raise ConfigError(FIELD, f"entry {i} is an empty list: it merges no classes")
        group = []
        for member in members:
            label = _label(member, names, count, title, i)
            if label in seen:
                raise ConfigError(
                    FIELD,
                    f"class {member!r} (label {label}) is listed twice (entries {seen[label]} "
                    f"and {i}); each class may appear once",
                )
            seen[label] = i
            group.append(label)
        groups.append(tuple(group))
    if len(groups) < 2:
        raise ConfigError(
            FIELD, f"keeps {len(groups)} class; a classification task needs at least 2"
        )
    return tuple(groups)


def _label(member: Any, names: tuple[str, ...] | None, count: int, title: str, i: int) -> int:
    """One class of entry ``i``: a label index or a class name, as a label index."""
    if isinstance(member, bool) or not isinstance(member, int | str):
        raise ConfigError(
            FIELD, f"entry {i}: expected a label index or a class name, got {member!r}"
        )
    if isinstance(member, int):
        if not 0 <= member < count:
            raise ConfigError(
                FIELD, f"entry {i}: {member} is not a label of {title} (labels 0..{count - 1})"
            )
        return member
    if names is None:
        raise ConfigError(
            FIELD,
            f"entry {i}: {member!r}: {title}'s class names are only in its files; give "
            f"label indices (0..{count - 1})",
        )
    if member not in names:
        raise ConfigError(
            FIELD, f"entry {i}: {member!r} is not a class of {title}; classes: {', '.join(names)}"
        )
    return names.index(member)


def lookup(groups: Groups, count: int) -> np.ndarray:
    """Old label -> new label (-1: the row is dropped), as an int64 array of ``count``."""
    table = np.full(count, -1, dtype=np.int64)
    for new, members in enumerate(groups):
        table[list(members)] = new
    return table
