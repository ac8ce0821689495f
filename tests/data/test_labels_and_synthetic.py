"""Label naming and the synthetic data generator (no Ray)."""

from __future__ import annotations

import numpy as np

from incr_ray.data import label_name, sorted_label_names, synthetic_rows


def test_label_names_and_their_order():
    assert [label_name(v) for v in (3, "3", 3.0, "fresh", None, "  ", float("nan"))] == [
        "3", "3", "3", "fresh", None, None, None,
    ]
    assert sorted_label_names(["10", "2", "1", "2"]) == ["1", "2", "10"]
    assert sorted_label_names(["b", "10", "a"]) == ["10", "a", "b"]


def test_synthetic_rows_are_learnable_single_token_english():
    from transformers import AutoTokenizer

    from incr_ray.modeling import minilm_dir

    ids = np.arange(3000, dtype=np.int64)
    texts, cls = synthetic_rows(ids, seed=0, classes=4)
    again, cls_again = synthetic_rows(ids[::-1], seed=0, classes=4)
    assert texts == again[::-1] and np.array_equal(cls, cls_again[::-1])  # per row, not per batch
    assert synthetic_rows(ids[:50], seed=1, classes=4)[0] != texts[:50]
    assert np.bincount(cls).min() > 600
    lengths = [len(t.split()) for t in texts]
    assert min(lengths) == 8 and max(lengths) == 12

    vocab = sorted({w for t in texts for w in t.split()})
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    assert all(tok.tokenize(w) == [w] for w in vocab)

    # Learnable: counting each class's keywords (learned from the first half) classifies the rest.
    words = [t.split() for t in texts]
    half = len(texts) // 2
    counts: dict[str, np.ndarray] = {}
    for ws, c in zip(words[:half], cls[:half]):
        for w in ws:
            counts.setdefault(w, np.zeros(4))[c] += 1
    keyword = {w: int(v.argmax()) for w, v in counts.items() if v.max() > 0.9 * v.sum()}
    predicted = [np.bincount([keyword[w] for w in ws if w in keyword] or [0], minlength=4).argmax() for ws in words[half:]]
    assert (np.array(predicted) == cls[half:]).mean() > 0.9
