"""The generation loop's pieces on the session's Ray that need no fit: one-hot generations.

The whole loop runs in the scenario runs (tests/scenarios.py): R1 tests/run/test_reference_run.py,
R2 test_crash_resume.py, R3 test_faults_e2e.py, R4 tests/test_multinode_e2e.py, R5
tests/test_job_submit_e2e.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from small_run import small_config

pytestmark = pytest.mark.e2e


def test_threshold_one_trains_on_labels_without_scoring(ray_local, tmp_path, tiny_bert):
    """At method.threshold 1 every target is the one-hot label: no teacher pool starts, replay
    rows still join the block, and run.json counts them as a scored generation's would."""
    from ray.data.expressions import col

    from incr_ray.run.folder import open_run
    from incr_ray.run.scoring import one_hot_generation

    said: list[str] = []
    cfg = small_config(tmp_path, tiny_bert, "onehot", method={"threshold": 1.0}, replay={"fraction": 0.5})
    assert not cfg.method.needs_teacher
    assert cfg.model_copy(update={"method": cfg.method.model_copy(update={"keep_best": True})}).method.needs_teacher
    with open_run(cfg, say=said.append) as run:
        block = run.split_dataset().filter(expr=col("block") == 2).materialize()
        rows = one_hot_generation(run, 2, block).to_pandas()
        entry = run.manifest.generations[2]
    block_rows = run.manifest.data.block_sizes[2]
    assert list(rows.columns) == ["row_id", "text", "label"] and rows.row_id.is_unique
    assert entry.rows == len(rows) and entry.block_rows == block_rows
    assert 0.3 * block_rows < entry.replay_rows < 0.7 * block_rows  # the same seeded sample as a scored one
    assert entry.targets is None and not (Path(cfg.run_dir) / "gen_002" / "targets").exists()
    assert "[gen 2] no teacher scoring: at method.threshold 1 every target is the one-hot label" in said
