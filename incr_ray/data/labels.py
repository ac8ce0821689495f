"""Label names: how a raw label is named, and the order of the label map."""

from __future__ import annotations

import math
import re
from typing import Any

import pyarrow as pa

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



def label_names_array(column: pa.ChunkedArray) -> list[str | None]:
    return [label_name(v) for v in column.to_pylist()]

