"""Training data: sources, validation, the label map, the holdout, the k blocks, replay and
the validation/retention slices.

:func:`split_data` turns ``cfg.data`` into one Ray Dataset of ``ROW_COLUMNS`` (see
:mod:`incr_ray.data.split`); :func:`read_labelled_file` reads an eval file and :func:`read_new_block` an extension's new
block the same way (the latter may append new labels to the label map). Every problem is a one-line :class:`DataError` raised before any training.
"""

from ..method.hashing import HOLDOUT
from .errors import DataError
from .labels import label_name, sorted_label_names
from .replay import memory_candidates, replay_rows, rows_with_ids
from .slices import extension_holdout_parts, retention_sample, training_part, validation_part
from .sources import BUILTIN_SOURCES, ROTTEN_TOMATOES, ROTTEN_TOMATOES_LABELS, open_source
from .split import ROW_COLUMNS, SplitData, read_labelled_file, read_new_block, split_data
from .synthetic import SYNTHETIC, SYNTHETIC_LABELS, synthetic_rows

__all__ = [
    "BUILTIN_SOURCES", "DataError", "extension_holdout_parts", "HOLDOUT", "ROTTEN_TOMATOES", "ROTTEN_TOMATOES_LABELS", "ROW_COLUMNS",
    "SYNTHETIC", "SYNTHETIC_LABELS", "SplitData", "label_name", "memory_candidates", "open_source", "read_labelled_file",
    "read_new_block", "replay_rows", "retention_sample", "rows_with_ids", "sorted_label_names", "split_data",
    "synthetic_rows", "training_part", "validation_part",
]
