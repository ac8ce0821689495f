"""The built-in ``synthetic`` data: learnable from a few keywords per class, every word a single
token of the BERT uncased vocabulary, each row a pure function of (row number, seed)."""

from __future__ import annotations

import math

import numpy as np
import ray.data

from ..config import DataSection
from ..method.hashing import hash_ids, splitmix64, unit
from .errors import DataError

SYNTHETIC = "synthetic"
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
    base = hash_ids(ids, seed, "synthetic")

    def draw(slot: int) -> np.ndarray:  # an independent uniform per (row, slot)
        with np.errstate(over="ignore"):
            return unit(splitmix64(base + np.uint64(slot) * np.uint64(0x9E3779B97F4A7C15)))

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



def _synthetic_batch(batch: dict[str, np.ndarray], seed: int, classes: int) -> dict[str, np.ndarray]:
    texts, cls = synthetic_rows(batch["id"], seed, classes)
    return {
        "text": np.array(texts, dtype=object),
        "label": np.array(SYNTHETIC_LABELS, dtype=object)[cls],
    }



def read_synthetic(data_cfg: DataSection, seed: int) -> "ray.data.Dataset":
    n, classes = data_cfg.synthetic_rows, data_cfg.synthetic_classes
    if classes > len(SYNTHETIC_LABELS):
        raise DataError(
            f"data.synthetic_classes is {classes}; the synthetic data has at most {len(SYNTHETIC_LABELS)} classes"
        )
    # A block count fixed by n (not by the cluster) keeps the per-batch split reproducible anywhere.
    return ray.data.range(n, override_num_blocks=max(1, math.ceil(n / 1000))).map_batches(
        _synthetic_batch, batch_format="numpy", fn_kwargs={"seed": seed, "classes": classes}
    )

