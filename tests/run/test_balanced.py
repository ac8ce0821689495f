"""Balanced fine-tuning's rows, without Ray: as many rows of every class, seeded."""

from __future__ import annotations

import numpy as np

from incr_ray.config import config_from_dict
from incr_ray.generation.trainer import steps_for
from incr_ray.run.balanced import BalancedSet, balanced_cap, balanced_line, choose_balanced


def test_the_cap_is_the_memorys_budget_or_the_smallest_class():
    assert balanced_cap(np.array([30, 5, 12]), 0) == 5
    assert balanced_cap(np.array([30, 0, 12]), 0) == 12  # a class with no rows is none to balance
    assert balanced_cap(np.array([30, 5, 12]), 8) == 8
    assert balanced_cap(np.array([], np.int64), 0) == 0


def test_each_class_gets_the_same_count_seeded_by_the_generation():
    rng = np.random.default_rng(0)
    ids = rng.permutation(10**6)[:600].astype(np.int64)
    labels = np.repeat([0, 1, 2], [400, 150, 50])
    cfg = config_from_dict({"run": {"seed": 4}, "student": {"balanced_epochs": 2}})
    chosen, cap = choose_balanced(ids, labels, cfg, 1)
    assert cap == 50 and len(chosen) == 150 and list(chosen) == sorted(chosen)
    by_id = dict(zip(ids.tolist(), labels.tolist()))
    assert np.bincount([by_id[i] for i in chosen]).tolist() == [50, 50, 50]
    perm = rng.permutation(600)
    np.testing.assert_array_equal(choose_balanced(ids[perm], labels[perm], cfg, 1)[0], chosen)
    assert set(choose_balanced(ids, labels, cfg, 2)[0]) != set(chosen)  # another generation, another sample
    memory = config_from_dict({"replay": {"per_class": 20}, "student": {"balanced_epochs": 2}})
    chosen, cap = choose_balanced(np.concatenate([ids, ids[:10]]), np.concatenate([labels, labels[:10]]), memory, 1)
    assert cap == 20 and len(chosen) == 60  # a repeated row counts once


def test_the_line_says_rows_steps_and_learning_rate():
    cfg = config_from_dict({"student": {"balanced_epochs": 3, "balanced_lr_factor": 0.1, "learning_rate": 0.01}})
    steps = steps_for(60, 1, cfg.student.batch_size, 3, 1)
    line = balanced_line(2, BalancedSet(np.arange(60), 20, 60, steps), cfg)
    assert line == (f"[gen 2] then balanced fine-tuning: {steps} optimizer steps on 60 rows (up to 20 a class) at "
                    "learning rate 0.001")
