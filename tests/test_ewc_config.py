"""`method.ewc` and `method.ewc_rows` in the config, and the one-line refusal at ZeRO-3: written by
the user, or chosen by `deepspeed.stage: auto` (resolved against hand-made cluster facts)."""

from __future__ import annotations

import pytest

from incr_ray.config import ConfigError, config_from_dict
from incr_ray.resolve import ClusterFacts, resolve

FIX = "set deepspeed.stage to 2 (or 0/1), or method.ewc: 0"


def test_off_by_default_with_256_fisher_rows():
    cfg = config_from_dict({})
    assert cfg.method.ewc == 0.0 and cfg.method.ewc_rows == 256
    cfg = config_from_dict({}, ["method.ewc=0.5", "method.ewc_rows=32", "deepspeed.stage=2"])
    assert (cfg.method.ewc, cfg.method.ewc_rows) == (0.5, 32)


@pytest.mark.parametrize("overrides, message", [
    (["method.ewc=-1"], "config method.ewc: Input should be greater than or equal to 0"),
    (["method.ewc_rows=0"], "config method.ewc_rows: Input should be greater than or equal to 1"),
])
def test_out_of_range_values_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({}, overrides)


def test_zero_3_is_refused_in_one_line_naming_the_fix():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"method": {"ewc": 1.0}, "deepspeed": {"stage": 3}})
    line = str(err.value)
    assert "\n" not in line and line.startswith("method.ewc needs each worker to hold the whole weights") and FIX in line
    for stage in (0, 1, 2, "auto"):  # the others are fine, and ewc off is fine at ZeRO-3
        config_from_dict({"method": {"ewc": 1.0}, "deepspeed": {"stage": stage}})
    config_from_dict({"method": {"ewc": 0.0}, "deepspeed": {"stage": 3}})


def test_zero_3_chosen_by_auto_is_refused_before_any_compute():
    """tests/test_resolve.py's 7B on one 8-GPU node: auto picks ZeRO-3 there."""
    seven_b = {"model": {"base": "llama-7b", "max_length": 256}, "data": {"labels": ["neg", "pos"]},
               "cluster": {"workers": 8, "use_gpu": True, "gpu_memory_gb": 24},
               "student": {"batch_size": 4, "grad_accum": 4, "gradient_checkpointing": True}}
    one_node = ClusterFacts((96.0,), gpus=8, node_gpus=(8.0,), node_interconnect=("",))
    assert resolve(config_from_dict(seven_b), one_node).deepspeed.stage == 3
    with pytest.raises(ConfigError) as err:
        resolve(config_from_dict({**seven_b, "method": {"ewc": 1.0}}), one_node)
    assert str(err.value).startswith("deepspeed.stage auto chose ZeRO-3, and method.ewc needs") and FIX in str(err.value)
