"""Each worker and actor checks the local paths it reads on its own node (#24 item 5)."""

from __future__ import annotations

import pytest

from incr_ray.config import ConfigError
from incr_ray.generation.visibility import require_visible


def test_a_path_this_node_cannot_see_is_one_line_naming_setting_node_and_fix(tmp_path):
    seen = tmp_path / "run.json"
    seen.write_text("{}")
    require_visible({"storage.path": str(seen), "model.base": "s3://bucket/model"}, "training worker rank 0")
    with pytest.raises(ConfigError) as caught:
        require_visible({"storage.path": str(seen), "model.base": str(tmp_path / "nowhere")}, "training worker rank 3")
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(f"model.base {str(tmp_path / 'nowhere')!r} is not visible on node ")
    assert "where training worker rank 3 runs" in text and "NFS mount on all nodes, or s3://" in text


def test_scoring_actors_check_their_model_before_loading_it(tmp_path):
    """The teacher's and the evaluation pool's actors: the one line, not a model-loading traceback."""
    from incr_ray.config import config_from_dict
    from incr_ray.generation.evaluation import HoldoutStatsScorer
    from incr_ray.generation.teacher import TargetScorer

    cfg = config_from_dict({"teacher": {"cpus_per_actor": 1}}).to_dict()
    gone = str(tmp_path / "gen_000" / "model")
    with pytest.raises(ConfigError, match=r"^storage.path \(the teacher's model\) .* where a scoring actor runs"):
        TargetScorer(gone, cfg, on_gpu=False)
    with pytest.raises(ConfigError, match=r"^storage.path \(the model\) .* where an evaluation actor runs"):
        HoldoutStatsScorer(gone, cfg, on_gpu=False)


@pytest.mark.ray
def test_an_actor_that_cannot_see_its_model_stops_the_driver_in_one_line(ray_local, tmp_path):
    """What a teacher actor on a node without the run's folder raises reaches the driver as the one
    line (the run loop's worker-failure handling), not as Ray's actor-death traceback."""
    import ray

    from incr_ray.generation.teacher import score_block
    from incr_ray.resolve import ClusterFacts, resolve
    from incr_ray.run.scoring import worker_failures_reported
    from small_run import small_config

    gone = str(tmp_path / "gen_000" / "model")
    cfg = resolve(small_config(tmp_path, gone, "unseen", teacher={"pool_size": 1}), ClusterFacts(node_cpus=(2.0,)))
    rows = [{"row_id": i, "text": f"word {i}", "label": i % 3, "block": 1} for i in range(8)]
    with pytest.raises(ConfigError) as caught:
        with worker_failures_reported(print):
            score_block(ray.data.from_items(rows), gone, cfg, on_gpu=False).materialize()
    assert str(caught.value).startswith(f"storage.path (the teacher's model) {gone!r} is not visible on node ")
    assert "\n" not in str(caught.value)
