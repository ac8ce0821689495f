"""Sources of training text: CSV, JSONL and Parquet files (a file or a folder, local or a URI
pyarrow can open, such as ``s3://``), Hugging Face ``datasets`` folders and hub names
(:mod:`incr_ray.data.hf_datasets`) and the built-in datasets.

A source reads as a lazy dataset with two columns, ``text`` (str) and ``label`` (raw: str or int).
A wrong path, column or format fails on the driver in milliseconds (:func:`_locate`,
:func:`_peek_columns`), before Ray starts any read task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data

from .. import rotten_tomatoes
from ..config import DataSection
from ..method.hashing import row_ids, sample_mask
from ..storage import absolute, is_remote
from .errors import DataError, first_line, reading
from .hf_datasets import FORMAT as DATASETS_FORMAT
from .hf_datasets import hub_split, looks_like_hub_name, read_hub, read_saved, resolve_saved, saved_kind
from .labels import label_names_array
from .synthetic import SYNTHETIC, SYNTHETIC_LABELS, read_synthetic

ROTTEN_TOMATOES = "rotten_tomatoes"
BUILTIN_SOURCES = (SYNTHETIC, ROTTEN_TOMATOES)
ROTTEN_TOMATOES_LABELS = rotten_tomatoes.LABELS

_FORMAT_EXTENSIONS = {
    "csv": ["csv", "csv.gz", "csv.bz2", "csv.zst", "csv.lz4"],
    "jsonl": ["jsonl", "json", "ndjson", "jsonl.gz", "json.gz", "jsonl.bz2", "json.bz2", "jsonl.zst"],
    "parquet": ["parquet", "pq"],
}


def _decode_text(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Text as an Arrow string column; bytes that are not UTF-8 become U+FFFD."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        try:
            return pc.cast(column, pa.string())
        except pa.ArrowInvalid:
            return pa.array(
                [None if b is None else b.decode("utf-8", errors="replace") for b in column.to_pylist()],
                type=pa.string(),
            )
    return pc.cast(column, pa.string())


def _check_columns(found: list[str], text_column: str, label_column: str, where: str) -> None:
    missing = [c for c in (text_column, label_column) if c not in found]
    if missing:
        field = "data.text_column" if missing[0] == text_column else "data.label_column"
        raise DataError(
            f"{where} has no column {missing[0]!r} (columns found: {', '.join(found) or 'none'}); "
            f"set {field} to one of them"
        )


def _normalize_columns(batch: pa.Table, text_column: str, label_column: str, where: str) -> pa.Table:
    """Pick and rename the text and label columns; decode the text."""
    _check_columns(batch.column_names, text_column, label_column, where)
    return pa.table({"text": _decode_text(batch[text_column]), "label": batch[label_column]})


def _drop_blank_text(batch: pa.Table, drop_labels: tuple[str, ...]) -> pa.Table:
    keep = pc.invert(pc.fill_null(pc.equal(pc.utf8_trim_whitespace(batch["text"]), ""), True))
    for label in drop_labels:
        keep = pc.and_(keep, pc.fill_null(pc.not_equal(batch["label"], label), True))
    return batch.filter(keep)



def _sample_batch(batch: pa.Table, seed: int, fraction: float) -> pa.Table:
    ids = row_ids(batch["text"].to_pylist(), label_names_array(batch["label"]))
    return batch.filter(pa.array(sample_mask(ids, seed, fraction)))



def _format_of(name: str) -> str | None:
    lower = name.lower()
    for fmt, exts in _FORMAT_EXTENSIONS.items():
        if any(lower.endswith("." + e) for e in exts):
            return fmt
    return None


@dataclass
class _Located:
    path: str  # absolute local path or URI
    fmt: str
    is_dir: bool
    fs: Any  # pyarrow.fs.FileSystem
    first_file: str  # path inside fs of the first data file


def _locate(path: str, field: str, data_format: str) -> _Located:
    """Find a data file or folder and its format; a missing path or unknown format is a DataError."""
    if is_remote(path):
        try:
            fs, inner = pafs.FileSystem.from_uri(path)
            info = fs.get_file_info(inner)
        except Exception as err:  # noqa: BLE001 - pyarrow raises many kinds for bad URIs/credentials
            raise DataError(f"cannot open {field} {path!r}: {first_line(err)}; check the URI and credentials") from None
    else:
        path = absolute(path)
        fs, inner = pafs.LocalFileSystem(), path
        info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{field} {path!r} does not exist; point {field} at a csv, jsonl or parquet file or folder")
    if info.type != pafs.FileType.Directory:
        fmt = _format_of(path) if data_format == "auto" else data_format
        if fmt is None:
            raise DataError(
                f"cannot tell the format of {field} {path!r} from its extension; set data.format to csv, jsonl or parquet"
            )
        return _Located(path, fmt, False, fs, inner)
    files = sorted(
        f.path for f in fs.get_file_info(pafs.FileSelector(inner, recursive=True))
        if f.type == pafs.FileType.File and not Path(f.path).name.startswith((".", "_"))
    )
    formats = {_format_of(f) for f in files} - {None}
    fmt = data_format if data_format != "auto" else (formats.pop() if len(formats) == 1 else None)
    if fmt is None and formats:
        raise DataError(f"folder {field} {path!r} mixes {', '.join(sorted(formats))} files; set data.format to pick one")
    data_files = [f for f in files if _format_of(f) == fmt]
    if not data_files:
        kind = f".{fmt}" if fmt else ".csv, .jsonl or .parquet"
        raise DataError(f"folder {field} {path!r} holds no {kind} files; point {field} at the data")
    return _Located(path, fmt, True, fs, data_files[0])


def _peek_columns(located: _Located, csv_convert_options) -> list[str]:
    """Column names from the start of the first file, so that a wrong column name or an unreadable
    file fails on the driver in milliseconds instead of inside Ray tasks."""
    fs, file = located.fs, located.first_file
    if located.fmt == "parquet":
        return pq.read_schema(file, filesystem=fs).names
    with fs.open_input_stream(file, compression="detect") as stream:
        if located.fmt == "csv":
            return pacsv.open_csv(stream, convert_options=csv_convert_options).schema.names
        head = b""
        while b"\n" not in head and len(head) < (64 << 20):
            chunk = stream.read(1 << 20)
            if not chunk:
                break
            head += chunk
    line = head.split(b"\n", 1)[0].strip()
    record = json.loads(line) if line else {}
    if not isinstance(record, dict):
        raise ValueError("the first line is not a JSON object; jsonl needs one object per line")
    return list(record)



def _normalized(ds: "ray.data.Dataset", data_cfg: DataSection, where: str) -> "ray.data.Dataset":
    return ds.map_batches(
        _normalize_columns,
        batch_format="pyarrow",
        fn_kwargs={"text_column": data_cfg.text_column, "label_column": data_cfg.label_column, "where": where},
    )


def _not_datasets(split_field: str, split: str, where: str) -> DataError:
    return DataError(
        f"{split_field} is {split!r} but {where} is not a folder written by `datasets` save_to_disk; "
        f"unset {split_field}"
    )


def read_file(
    path: str, data_cfg: DataSection, field: str, split: str | None = None, split_field: str | None = None
) -> tuple["ray.data.Dataset", str, str]:
    """Lazy dataset with columns text (str) and label (raw) from a csv/jsonl/parquet file or folder
    or a ``datasets`` folder, with the words that name it in errors and its resolved format.

    ``split`` picks a split of a saved DatasetDict and ``split_field`` names the setting it came
    from (see :func:`hf_datasets.resolve_saved`); a split for anything else is an error.
    """
    if data_cfg.text_column == data_cfg.label_column:
        raise DataError(
            f"data.text_column and data.label_column are both {data_cfg.text_column!r}; name two different columns"
        )
    if saved_kind(path) is not None:
        saved = resolve_saved(path, field, split, split_field)
        _check_columns(saved.columns, data_cfg.text_column, data_cfg.label_column, saved.where)
        ds = read_saved(saved, data_cfg.text_column, data_cfg.label_column)
        return _normalized(ds, data_cfg, saved.where), saved.where, DATASETS_FORMAT
    located = _locate(path, field, data_cfg.format)
    if split is not None:
        raise _not_datasets(split_field or "data.split", split, f"{field} {located.path!r}")
    path, fmt = located.path, located.fmt
    where = f"{field} {path!r}"
    extensions = _FORMAT_EXTENSIONS[fmt] if located.is_dir else None
    # Text read as bytes so that invalid UTF-8 is replaced, not refused.
    convert = pacsv.ConvertOptions(column_types={data_cfg.text_column: pa.binary()})
    with reading(where, fmt):
        _check_columns(_peek_columns(located, convert), data_cfg.text_column, data_cfg.label_column, where)
        if fmt == "csv":
            ds = ray.data.read_csv(
                path,
                file_extensions=extensions,
                convert_options=convert,
                parse_options=pacsv.ParseOptions(newlines_in_values=True),
            )
        elif fmt == "jsonl":
            ds = ray.data.read_json(path, lines=True, file_extensions=extensions)
        else:
            ds = ray.data.read_parquet(path, file_extensions=extensions).select_columns(
                [data_cfg.text_column, data_cfg.label_column]  # pushed down: only these are read
            )
    return _normalized(ds, data_cfg, where), where, fmt


def _rotten_tomatoes_path() -> str:
    try:
        return rotten_tomatoes.corpus_file()
    except FileNotFoundError as err:
        raise DataError(f"data.source 'rotten_tomatoes': {err}") from None


def _read_rotten_tomatoes(binary: bool) -> "ray.data.Dataset":
    ds = ray.data.read_csv(
        _rotten_tomatoes_path(),
        convert_options=pacsv.ConvertOptions(
            include_columns=["category", "text"], column_types={"text": pa.binary()}
        ),
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
    )
    ds = ds.map_batches(
        _normalize_columns,
        batch_format="pyarrow",
        fn_kwargs={"text_column": "text", "label_column": "category", "where": "rotten_tomatoes"},
    )
    # The corpus has a few empty snippets; they carry nothing to learn, so the built-in drops them.
    return ds.map_batches(
        _drop_blank_text, batch_format="pyarrow", fn_kwargs={"drop_labels": ("plot",) if binary else ()}
    )




def builtin_label_names(data_cfg: DataSection) -> list[str] | None:
    if data_cfg.source == ROTTEN_TOMATOES:
        return ROTTEN_TOMATOES_LABELS[:2] if data_cfg.binary else list(ROTTEN_TOMATOES_LABELS)
    if data_cfg.source == SYNTHETIC:
        return SYNTHETIC_LABELS[: data_cfg.synthetic_classes]
    return None


def _is_hub(source: str) -> bool:
    """A hub name: not a built-in, not an existing local path, shaped like ``name`` or ``owner/name``."""
    return looks_like_hub_name(source) and source not in BUILTIN_SOURCES and not Path(absolute(source)).exists()


def source_label_names(data_cfg: DataSection) -> list[str] | None:
    """The label map the source fixes: a built-in's names, or the ClassLabel names of a
    ``datasets`` label column (in the dataset's id order); None when the data decides."""
    builtin = builtin_label_names(data_cfg)
    if builtin is not None:
        return builtin
    if saved_kind(data_cfg.source) is not None:
        saved = resolve_saved(data_cfg.source, "data.source", data_cfg.split, "data.split")
        return saved.class_names.get(data_cfg.label_column)
    if _is_hub(data_cfg.source):
        return hub_split(data_cfg.source, data_cfg.split)[1].get(data_cfg.label_column)
    return None


def check_splits(data_cfg: DataSection) -> None:
    """data.split and data.eval_split checked against the source's metadata, before any read."""
    for split_field, split in (("data.split", data_cfg.split), ("data.eval_split", data_cfg.eval_split)):
        if split is None:
            continue
        if data_cfg.source in BUILTIN_SOURCES:
            raise _not_datasets(split_field, split, f"the built-in data.source {data_cfg.source!r}")
        if saved_kind(data_cfg.source) is not None:
            resolve_saved(data_cfg.source, "data.source", split, split_field)
        elif not _is_hub(data_cfg.source):
            raise _not_datasets(split_field, split, f"data.source {data_cfg.source!r}")
    if data_cfg.eval_split is not None and data_cfg.eval_split == (data_cfg.split or "train"):
        raise DataError(
            f"data.eval_split {data_cfg.eval_split!r} is also the training split; hold out a different split"
        )
    if saved_kind(data_cfg.source) is not None:  # unset data.split takes train: check it exists
        resolve_saved(data_cfg.source, "data.source", data_cfg.split, "data.split")


def read_split(data_cfg: DataSection, split: str | None, split_field: str) -> tuple["ray.data.Dataset", str, str | None]:
    """One split of data.source: a saved folder's split, or a hub dataset's (needs network)."""
    if _is_hub(data_cfg.source):
        if data_cfg.text_column == data_cfg.label_column:
            raise DataError(f"data.text_column and data.label_column are both {data_cfg.text_column!r}; "
                            "name two different columns")
        ds, where = read_hub(data_cfg.source, split, data_cfg.text_column, data_cfg.label_column)
        return _normalized(ds, data_cfg, where), where, DATASETS_FORMAT
    return read_file(data_cfg.source, data_cfg, "data.source", split, split_field)


def open_source(data_cfg: DataSection, seed: int) -> tuple["ray.data.Dataset", str, str | None]:
    """The training source as a lazy dataset (columns text, label), the words that name it in
    errors, and its format (None for a built-in).

    ``data.max_rows`` keeps about that many rows by a seeded per-row hash sample (unbiased and
    deterministic; it costs one counting pass over file sources that lack row-count metadata).
    """
    check_splits(data_cfg)
    if data_cfg.source == SYNTHETIC:
        ds, where, fmt = read_synthetic(data_cfg, seed), f"built-in data {SYNTHETIC!r}", None
        total: int | None = data_cfg.synthetic_rows
    elif data_cfg.source == ROTTEN_TOMATOES:
        ds, where, fmt = _read_rotten_tomatoes(data_cfg.binary), f"built-in data {ROTTEN_TOMATOES!r}", None
        total = None
    else:
        (ds, where, fmt), total = read_split(data_cfg, data_cfg.split, "data.split"), None
    if data_cfg.max_rows is None:
        return ds, where, fmt
    if total is None:
        with reading(where, fmt):
            total = ds.count()
    if data_cfg.max_rows < total:
        ds = ds.map_batches(
            _sample_batch, batch_format="pyarrow", fn_kwargs={"seed": seed, "fraction": data_cfg.max_rows / total}
        )
    return ds, where, fmt
