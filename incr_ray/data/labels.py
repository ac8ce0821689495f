"""Label names: how a raw label is named, and the order of the label map."""

from __future__ import annotations

import math
import re
from typing import Any

import pyarrow as pa

from .errors import DataError

def label_name(value: Any) -> str | None:
    """The name of a raw label: its str(); integral floats name like ints; blank or null -> None."""
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return str(int(value))
    name = str(value)
    return name if name.strip() else None


def sorted_label_names(names) -> list[str]:
    """Sorted distinct names; numerically when every name is an integer."""
    names = set(names)
    if names and all(re.fullmatch(r"[+-]?\d+", n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def few_names(names, limit: int = 5) -> str:
    """A few of ``names``, sorted and quoted, for a one-line error: ``'a', 'b' and 3 more``."""
    names = sorted_label_names(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


ALLOW_NEW_LABELS = "--allow-new-labels"


def extended_label_map(label_names: list[str], present, allow_new: bool, where: str) -> list[str]:
    """The label map an extension trains with: ``label_names`` (the run's; their ids never
    change) followed by the labels of ``present`` it lacks, sorted (:func:`sorted_label_names`).

    A label the run has never seen is a new class only when the user says so (``allow_new``, the
    ``--allow-new-labels`` flag of ``incr-ray extend``): a typo must not silently make a class.

    Raises:
        DataError: ``present`` holds unseen labels and ``allow_new`` is false; the message names
            a few of them and the flag.
    """
    unknown = set(present) - set(label_names)
    if unknown and not allow_new:
        raise DataError(
            f"{where} has labels never seen in training (label map {label_names}): {few_names(unknown)}; "
            f"relabel or drop those rows, or pass {ALLOW_NEW_LABELS} to add them as new classes"
        )
    return list(label_names) + sorted_label_names(unknown)


def label_names_array(column: pa.ChunkedArray) -> list[str | None]:
    return [label_name(v) for v in column.to_pylist()]

