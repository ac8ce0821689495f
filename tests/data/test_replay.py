"""Replay's rows without Ray: the memory's candidates, streamed from a split on the driver."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from incr_ray.data.replay import memory_candidates
from incr_ray.method.hashing import validation_mask


def test_the_candidates_are_a_per_class_sample_of_the_earlier_blocks_training_rows(tmp_path):
    rng = np.random.default_rng(1)
    n = 5000
    split = pa.table({"row_id": rng.permutation(10**6)[:n].astype(np.int64), "text": ["x"] * n,
                      "label": rng.integers(0, 3, size=n), "block": rng.integers(-1, 4, size=n)})
    folder = tmp_path / "split"
    folder.mkdir()
    for i in range(3):
        pq.write_table(split.slice(i * 2000, 2000), folder / f"{i}.parquet")
    got = memory_candidates(str(folder), 2, 50, run_seed=7, validation_fraction=0.2)
    frame = split.to_pandas()
    frame = frame[(frame.block >= 0) & (frame.block < 2) & ~validation_mask(frame.row_id.to_numpy(), 7, 0.2)]
    assert set(got["row_id"]) <= set(frame.row_id) and list(got["row_id"]) == sorted(got["row_id"])
    assert np.bincount(got["label"]).tolist() == [50, 50, 50]
    chosen = frame.set_index("row_id").loc[got["row_id"]]
    np.testing.assert_array_equal(chosen.label.to_numpy(), got["label"])
    np.testing.assert_array_equal(chosen.block.to_numpy(), got["block"])
    everything = memory_candidates(str(folder), 2, 10**6, 7, 0.2)  # a cap above every class: all their rows
    assert set(everything["row_id"]) == set(frame.row_id)
    later = memory_candidates(str(folder), 3, 50, 7, 0.2)
    assert len(set(later["row_id"]) & set(got["row_id"])) > 50  # a candidate stays unless a later row hashes lower
