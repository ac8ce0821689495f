"""The driver side of student training: the seeded training order."""

from __future__ import annotations

import numpy as np

import pytest

from incr_ray.generation.student import shuffled_for_training
from incr_ray.method.hashing import shuffle_keys


@pytest.mark.parametrize("local_rows", [10_000, 0], ids=["in memory", "ray data sort"])
def test_training_rows_are_shuffled_reproducibly(ray_local, local_rows):
    """A class-sorted block (like Rotten Tomatoes' file order) reaches training well mixed, the
    same way for the same seed, with every row exactly once."""
    import ray

    rows = [{"row_id": i, "label": 0 if i < 300 else 1} for i in range(600)]
    ds = ray.data.from_items(rows, override_num_blocks=4)

    def order(ds, seed):
        return [r["row_id"] for r in shuffled_for_training(ds, seed, rows=600, local_rows=local_rows).take_all()]

    first, again, other = order(ds, 7), order(ds, 7), order(ds, 8)
    assert sorted(first) == list(range(600))
    assert first == again
    assert first != other
    # The same rows cut into other blocks and arriving in another order (as a teacher pool's
    # output does between runs) train in the same order: a resumed run matches an unbroken one.
    relaid = ray.data.from_items(rows[::-1], override_num_blocks=7)
    assert order(relaid, 7) == first
    labels = np.array([0 if i < 300 else 1 for i in first])
    # Sorted input has one switch between classes; a shuffle has about n/2.
    assert (labels[1:] != labels[:-1]).sum() > 200
    assert abs(labels[:100].mean() - 0.5) < 0.2  # the first batches already hold both classes
    # Both ways give one order: by the seeded key, then the row id (the key alone, as sorted here).
    keys = shuffle_keys(np.arange(600), 7)
    assert first == sorted(range(600), key=lambda i: (keys[i], i))


def test_fit_student_refuses_an_unresolved_stage():
    """``deepspeed.stage: auto`` is resolved once per run (``incr_ray.resolve``); a direct caller that
    skips it is told so, instead of a KeyError in the worker."""
    from incr_ray.config import config_from_dict
    from incr_ray.generation.student import StudentRequest, fit_student

    cfg = config_from_dict({"cluster": {"cpus_per_worker": 1}, "teacher": {"cpus_per_actor": 1}})
    request = StudentRequest(generation=0, init_model="m", label_names=["a", "b"], rows=10, model_dest="d",
                             ray_storage="r")
    with pytest.raises(ValueError, match=r"fit_student needs a resolved config \(deepspeed.stage: auto\).*incr_ray.resolve"):
        fit_student(cfg, request, None, on_gpu=False)
