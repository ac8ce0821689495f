"""Hugging Face ``datasets`` as a source: folders written by ``save_to_disk`` and hub names.

A saved ``Dataset`` folder holds ``state.json`` (the list of its Arrow files), ``dataset_info.json``
(its features) and the Arrow IPC stream files; a saved ``DatasetDict`` holds ``dataset_dict.json``
and one such folder per split.

Saved folders are read by opening their Arrow files directly with pyarrow, one Ray task per file,
rather than through ``datasets.load_from_disk`` + ``ray.data.from_huggingface``: that route maps
the whole table into the driver and ships it from there, while reading the files in tasks works
the same for a local folder and for cluster storage (``s3://``) and never gathers the data in the
driver. Only the JSON metadata is read on the driver, so a wrong split or column fails in
milliseconds.

A ``ClassLabel`` label column stores ints; they are turned into the class names as they are read,
and the names (in the feature's order) become the label map, so a model's id2label matches the
dataset's own ids.

A name that is no local path (``imdb``, ``user/name``) is loaded from the hub with
``datasets.load_dataset`` when the machine can reach it (not exercised by the tests, which run
offline); otherwise it is a one-line error.
"""

from __future__ import annotations

import functools
import posixpath
import re
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import ray.data

from ..storage import absolute, exists, is_remote, read_json
from .errors import DataError, first_line

DATASET_DICT_FILE = "dataset_dict.json"
STATE_FILE = "state.json"
INFO_FILE = "dataset_info.json"
FORMAT = "datasets"  # the format name used in errors

# A hub id: "name" or "owner/name", no file extension that would make it a missing data file.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_DATA_SUFFIX = re.compile(r"\.(csv|jsonl?|ndjson|parquet|pq|arrow|gz|bz2|zst|lz4|txt)$", re.IGNORECASE)


@dataclass
class SavedSplit:
    """One saved ``Dataset`` (a whole folder, or one split of a ``DatasetDict``)."""

    files: list[str]  # absolute paths or URIs of the Arrow files
    columns: list[str]
    class_names: dict[str, list[str]] = field(default_factory=dict)  # ClassLabel column -> names
    where: str = ""  # the words that name it in errors


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if is_remote(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), absolute(path)


def _join(path: str, name: str) -> str:
    return posixpath.join(path.rstrip("/"), name) if is_remote(path) else f"{absolute(path).rstrip('/')}/{name}"


def _read_json(path: str) -> dict | None:
    """A small JSON file (local or remote), or None when it does not exist."""
    return read_json(path) if exists(path) else None


def saved_kind(path: str) -> str | None:
    """``"dict"`` for a saved DatasetDict, ``"dataset"`` for a saved Dataset, None for anything else
    (a data file, a folder of files, a path that does not exist)."""
    try:
        fs, inner = _filesystem(path)
        info = fs.get_file_info(inner)
        if info.type != pafs.FileType.Directory:
            return None
        names = {
            posixpath.basename(f.path)
            for f in fs.get_file_info(pafs.FileSelector(inner, recursive=False))
            if f.type == pafs.FileType.File
        }
    except Exception:  # noqa: BLE001 - an unreachable URI is reported by the file reader
        return None
    if DATASET_DICT_FILE in names:
        return "dict"
    if {STATE_FILE, INFO_FILE} <= names:
        return "dataset"
    return None


def saved_splits(path: str) -> list[str]:
    return list((_read_json(_join(path, DATASET_DICT_FILE)) or {}).get("splits", []))


def _class_names(features: dict) -> dict[str, list[str]]:
    return {
        name: [str(n) for n in spec["names"]]
        for name, spec in features.items()
        if isinstance(spec, dict) and spec.get("_type") == "ClassLabel" and spec.get("names")
    }


def _load_split(path: str, where: str) -> SavedSplit:
    state = _read_json(_join(path, STATE_FILE)) or {}
    info = _read_json(_join(path, INFO_FILE)) or {}
    names = [f["filename"] for f in state.get("_data_files", [])]
    if not names:
        raise DataError(f"{where} lists no Arrow files in its {STATE_FILE}; save the dataset again with save_to_disk")
    features = info.get("features") or {}
    columns = list(features)
    if not columns:  # no features recorded: take the columns from the first file's schema
        fs, inner = _filesystem(_join(path, names[0]))
        with fs.open_input_stream(inner) as stream:
            columns = pa.ipc.open_stream(stream).schema.names
    return SavedSplit(
        files=[_join(path, n) for n in names],
        columns=columns,
        class_names=_class_names(features),
        where=where,
    )


def resolve_saved(path: str, field: str, split: str | None, split_field: str | None) -> SavedSplit:
    """The saved Dataset at ``path``, or the chosen split of a saved DatasetDict.

    ``split_field`` names the setting that chooses the split (``data.split``, ``data.eval_split``);
    None means no setting applies (``data.eval_path``, new data for an extension), and then a
    DatasetDict must be pointed at one split's folder. Unset ``data.split`` takes ``train``.
    """
    kind = saved_kind(path)
    where = f"{field} {path!r}"
    if kind == "dataset":
        if split is not None:
            fix = (
                "unset data.eval_split and use data.eval_fraction or data.eval_path"
                if split_field == "data.eval_split" else f"unset {split_field}"
            )
            raise DataError(f"{split_field} is {split!r} but {where} is a saved Dataset with no splits; {fix}")
        return _load_split(path, where)
    splits = saved_splits(path)
    if split_field is None:
        example = _join(path, splits[0]) if splits else path
        raise DataError(
            f"{where} is a saved DatasetDict (splits: {', '.join(splits) or 'none'}); "
            f"point {field} at one split's folder, such as {example!r}"
        )
    chosen = split if split is not None else "train"
    if chosen not in splits:
        listed = ", ".join(splits) or "none"
        if split is None:
            raise DataError(f"{where} has no split 'train' (splits: {listed}); set data.split to one of them")
        raise DataError(f"{split_field} {split!r} is not a split of {where} (splits: {listed}); set it to one of them")
    return _load_split(_join(path, chosen), f"{where} split {chosen!r}")


def _label_names_column(column: pa.ChunkedArray, names: list[str]) -> pa.Array:
    """ClassLabel ints -> class names; -1 (datasets' "no label") and nulls stay null."""
    values = column.to_pylist()
    out = []
    for v in values:
        if v is None or v == -1:
            out.append(None)
        elif isinstance(v, int) and 0 <= v < len(names):
            out.append(names[v])
        else:
            raise DataError(f"label {v!r} is outside the {len(names)} ClassLabel names {names}; fix the dataset")
    return pa.array(out, type=pa.string())


def _named_labels(table: pa.Table, label_column: str, names: list[str] | None) -> pa.Table:
    if names is None or label_column not in table.column_names:
        return table
    i = table.column_names.index(label_column)
    return table.set_column(i, label_column, _label_names_column(table[label_column], names))


def _read_arrow_files(batch: pa.Table, columns: list[str], label_column: str, names: list[str] | None) -> pa.Table:
    """One Arrow IPC stream file (a row of ``batch``) as a table of ``columns``."""
    tables = []
    for path in batch["file"].to_pylist():
        fs, inner = _filesystem(path)
        with fs.open_input_stream(inner) as stream:
            table = pa.ipc.open_stream(stream).read_all()
        tables.append(_named_labels(table.select(columns), label_column, names))
    return pa.concat_tables(tables)


def read_saved(saved: SavedSplit, text_column: str, label_column: str) -> "ray.data.Dataset":
    """Lazy dataset of the two columns, one read task per Arrow file; ClassLabel ints become names."""
    files = [{"file": f} for f in saved.files]
    return ray.data.from_items(files, override_num_blocks=len(files)).map_batches(
        _read_arrow_files,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={
            "columns": [text_column, label_column],
            "label_column": label_column,
            "names": saved.class_names.get(label_column),
        },
    )


# ---------------------------------------------------------------------------------------------
# Hub names (need network; not tested here)


def looks_like_hub_name(source: str) -> bool:
    """A hub id such as ``imdb`` or ``user/name``: no URI scheme, at most one slash, no data file suffix."""
    return not is_remote(source) and bool(_HUB_NAME.fullmatch(source)) and not _DATA_SUFFIX.search(source)


@functools.lru_cache(maxsize=4)
def _load_hub(name: str, split: str):
    # Imported here: `datasets` costs a second or more to import and only hub names need it.
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:  # noqa: BLE001 - offline, unknown name, missing split: all one line
        raise DataError(
            f"data.source {name!r} is not a local path, and loading it from the Hugging Face hub failed "
            f"({first_line(err)}); point data.source at a file or folder, or run where the hub is reachable"
        ) from None


def hub_split(name: str, split: str | None) -> tuple[object, dict[str, list[str]], str]:
    """The loaded hub split, its ClassLabel names and the words that name it in errors."""
    ds = _load_hub(name, split or "train")
    features = {k: {"_type": type(v).__name__, "names": getattr(v, "names", None)} for k, v in ds.features.items()}
    return ds, _class_names(features), f"hub dataset {name!r} split {split or 'train'!r}"


def read_hub(name: str, split: str | None, text_column: str, label_column: str) -> tuple["ray.data.Dataset", str]:
    ds, class_names, where = hub_split(name, split)
    missing = [c for c in (text_column, label_column) if c not in ds.column_names]
    if missing:
        key = "data.text_column" if missing[0] == text_column else "data.label_column"
        raise DataError(
            f"{where} has no column {missing[0]!r} (columns found: {', '.join(ds.column_names)}); set {key} to one of them"
        )
    rows = ray.data.from_huggingface(ds.select_columns([text_column, label_column]))
    return rows.map_batches(
        _named_labels,
        batch_format="pyarrow",
        fn_kwargs={"label_column": label_column, "names": class_names.get(label_column)},
    ), where
