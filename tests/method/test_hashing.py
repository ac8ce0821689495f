"""The seeded hashing: row ids, the split, training order and sampling (pure numpy, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from incr_ray.method.hashing import HOLDOUT, assign_split, per_class_sample, row_ids, sample_mask, shuffle_keys



def _ids(n: int, start: int = 0) -> np.ndarray:
    return row_ids([f"text {i}" for i in range(start, start + n)], ["x"] * n)


def test_row_ids_are_stable_63_bit_content_hashes():
    ids = row_ids(["a movie", "a movie", "a movie", "other"], ["fresh", "fresh", "rotten", "fresh"])
    assert ids.dtype == np.int64 and (ids >= 0).all()
    assert ids[0] == ids[1]  # identical (text, label): the same example
    assert len({int(ids[0]), int(ids[2]), int(ids[3])}) == 3
    # Pinned: a changed hash would silently re-split every existing run.
    assert int(row_ids(["hello"], ["1"])[0]) == int(row_ids(["hello"], [1])[0]) == 9033244824107383302
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        row_ids(["a", "b"], ["x"])


def test_assign_split_is_deterministic_per_seed():
    ids = _ids(2000)
    a = assign_split(ids, seed=0, k=4, eval_fraction=0.1)
    assert a.dtype == np.int64
    assert np.array_equal(a, assign_split(ids.copy(), seed=0, k=4, eval_fraction=0.1))
    assert (a != assign_split(ids, seed=1, k=4, eval_fraction=0.1)).mean() > 0.5


def test_assign_split_is_disjoint_and_covering():
    ids = _ids(1000)
    blocks = assign_split(ids, seed=3, k=5, eval_fraction=0.2)
    assert set(np.unique(blocks)) == {HOLDOUT, 0, 1, 2, 3, 4}  # every row in exactly one place
    parts = [set(ids[blocks == b].tolist()) for b in range(-1, 5)]
    assert sum(len(p) for p in parts) == len(ids) and set().union(*parts) == set(ids.tolist())


def test_blocks_within_2_percent_when_streamed_in_batches():
    n, k = 10_000, 4
    ids = _ids(n)
    cuts = [0, 3000, 5500, 6100, n]  # uneven batches, as Ray Data would hand them over
    blocks = np.concatenate([assign_split(ids[a:b], 7, k, 0.1) for a, b in zip(cuts, cuts[1:])])
    sizes = np.bincount(blocks[blocks != HOLDOUT], minlength=k)
    train = sizes.sum()
    assert np.all(np.abs(sizes - train / k) <= 0.02 * train / k), sizes
    holdout = (blocks == HOLDOUT).mean()
    assert abs(holdout - 0.1) < 0.01
    # Holdout membership is per row, whatever batch the row arrives in.
    assert np.array_equal(blocks == HOLDOUT, assign_split(ids, 7, k, 0.1) == HOLDOUT)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 400),
    k=st.integers(2, 9),
    eval_fraction=st.sampled_from([0.0, 0.1, 0.5]),
    seed=st.integers(-(2**40), 2**40),
)
def test_every_batch_fills_blocks_to_within_one_row(n, k, eval_fraction, seed):
    blocks = assign_split(_ids(n), seed, k, eval_fraction)
    sizes = np.bincount(blocks[blocks != HOLDOUT], minlength=k)
    assert len(sizes) == k and sizes.max() - sizes.min() <= 1


def test_duplicate_rows_share_block_and_side_of_holdout():
    texts = [f"t{i % 50}" for i in range(400)]  # every text 8 times
    ids = row_ids(texts, ["y"] * len(texts))
    blocks = assign_split(ids, 0, 3, 0.3)
    for i in np.unique(ids):
        assert len(set(blocks[ids == i].tolist())) == 1


def test_assign_split_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k must be"):
        assign_split(_ids(3), 0, 0, 0.1)
    with pytest.raises(ValueError, match="eval_fraction"):
        assign_split(_ids(3), 0, 2, 1.0)


def test_sample_mask_keeps_about_the_fraction():
    ids = _ids(10_000)
    kept = sample_mask(ids, 0, 0.25)
    assert abs(kept.mean() - 0.25) < 0.02
    assert np.array_equal(kept, sample_mask(ids, 0, 0.25))
    assert not np.array_equal(kept, sample_mask(ids, 1, 0.25))


def test_shuffle_keys_depend_on_the_id_and_seed_only():
    ids = np.sort(_ids(5_000))  # ids in order, so a sort by key that kept that order would show
    keys = shuffle_keys(ids, 3)
    assert keys.dtype == np.int64 and len(np.unique(keys)) == len(ids)  # distinct ids, distinct keys
    perm = np.random.default_rng(0).permutation(len(ids))
    assert np.array_equal(shuffle_keys(ids[perm], 3), keys[perm])  # a row's key ignores its neighbours
    assert np.array_equal(shuffle_keys(np.array([ids[7], ids[7]]), 3), keys[[7, 7]])
    assert not np.array_equal(shuffle_keys(ids, 4), keys)
    # Sorting by the keys is far from the id order (the order is a shuffle, not a relabelling).
    order = np.argsort(keys)
    assert abs(np.corrcoef(order, np.arange(len(ids)))[0, 1]) < 0.1


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 300), classes=st.integers(1, 5), cap=st.integers(0, 80), seed=st.integers(0, 10**6))
def test_per_class_sample_keeps_exactly_the_cap_of_each_class_whatever_the_order(n, classes, cap, seed):
    rng = np.random.default_rng(seed)
    ids = rng.choice(10**12, size=n, replace=False).astype(np.int64)
    labels = rng.integers(0, classes, size=n)
    keep = per_class_sample(ids, labels, seed, cap, "memory")
    for c in range(classes):
        assert keep[labels == c].sum() == min(cap, (labels == c).sum())
    perm = rng.permutation(n)
    np.testing.assert_array_equal(per_class_sample(ids[perm], labels[perm], seed, cap, "memory"), keep[perm])


def test_per_class_sample_streams_and_depends_on_its_purpose():
    rng = np.random.default_rng(0)
    ids, labels = rng.choice(10**12, size=3000, replace=False).astype(np.int64), rng.integers(0, 3, size=3000)
    whole = set(ids[per_class_sample(ids, labels, 5, 40, "memory")].tolist())
    kept_ids, kept_labels = ids[:0], labels[:0]
    for start in range(0, 3000, 700):  # the rows kept so far plus the next batch, again and again
        both_ids = np.concatenate([kept_ids, ids[start:start + 700]])
        both_labels = np.concatenate([kept_labels, labels[start:start + 700]])
        keep = per_class_sample(both_ids, both_labels, 5, 40, "memory")
        kept_ids, kept_labels = both_ids[keep], both_labels[keep]
    assert set(kept_ids.tolist()) == whole and len(whole) == 120
    other = set(ids[per_class_sample(ids, labels, 5, 40, "balanced")].tolist())
    assert len(other & whole) < 20  # an independent sample: about 40 / 1000 of each class's 40 in common
