"""The typed config: defaults, overrides, one-line errors, and every YAML shipped in jobs/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from incr_ray.config import Config, ConfigError, apply_overrides, config_from_dict, load_config

JOBS = Path(__file__).resolve().parent.parent / "jobs"


def test_defaults_match_the_design():
    cfg = Config()
    assert cfg.method.k == 4 and cfg.method.threshold == 0.9 and cfg.method.floor is None
    assert cfg.method.temperature == 1.0 and cfg.method.alpha == 0.0
    assert cfg.student.init == "previous"
    assert cfg.deepspeed.stage == "auto" and cfg.cluster.workers == 1 and cfg.cluster.use_gpu == "auto"


def test_overrides_parse_yaml_scalars():
    cfg = load_config(None, ["method.k=3", "method.floor=0.5", "student.init=base", "data.labels=[a, b]",
                             "method.floor=null"])
    assert cfg.method.k == 3 and cfg.method.floor is None and cfg.student.init == "base"
    assert cfg.data.labels == ["a", "b"]


def test_the_ensemble_teacher_is_one_generation_unless_set():
    assert Config().teacher.ensemble == 1
    assert load_config(None, ["teacher.ensemble=3"]).teacher.ensemble == 3


def test_overrides_do_not_mutate_input():
    raw = {"method": {"k": 5}}
    apply_overrides(raw, ["method.k=6"])
    assert raw == {"method": {"k": 5}}


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["method.kk=3"], "valid keys: k, threshold, floor, temperature, alpha"),
        (["nosection.k=3"], "valid keys: run, storage"),
        (["method=3"], "is a section"),
        (["method.k"], "expected KEY=VALUE"),
        (["method.k.x=1"], "not a section"),
        (["method.k=0"], "method.k"),
        (["method.threshold=0"], "method.threshold"),
        (["method.threshold=1.01"], "method.threshold"),
        (["method.floor=-0.1"], "method.floor"),
        (["method.floor=0.9"], "must be below method.threshold"),
        (["student.learning_rate=0"], "student.learning_rate"),
        (["student.epochs=-1"], "student.epochs"),
        (["student.init=random"], "student.init"),
        (["deepspeed.stage=4"], "deepspeed.stage"),
        (["deepspeed.stage=2", "deepspeed.offload_params=true"], "needs deepspeed.stage: 3"),
        (["run.name=a/b"], "run.name"),
        (["data.eval_fraction=1"], "data.eval_fraction"),
        (["method.keep_best=true"], "method.keep_best needs a validation slice: set method.validation_fraction"),
        (["method.calibrate=true"], "method.calibrate needs a validation slice"),
        (["method.validation_fraction=0.5"], "method.validation_fraction"),
        (["student.schedule=global"], "student.schedule"),
        (["student.min_steps=-1"], "student.min_steps"),
        (["teacher.ensemble=0"], "config teacher.ensemble: Input should be greater than or equal to 1 (got 0)"),
        (["teacher.ensemble=1.5"], "teacher.ensemble"),
        (["teacher.ensemble=all"], "teacher.ensemble"),
    ],
)
def test_errors_are_one_line_and_name_the_field(overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg


def test_unknown_yaml_key_lists_valid_ones(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("student:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'student.lr'.*learning_rate"):
        load_config(p)


def test_bad_yaml_and_non_mapping(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_round_trip_through_yaml_and_json():
    cfg = load_config(None, ["method.k=7", "method.floor=0.3"])
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_every_job_config_loads_and_starts_with_its_command():
    files = sorted(JOBS.glob("*.yaml"))
    assert files, "jobs/ should hold at least the demo config"
    for f in files:
        if f.name == "runtime_env.yaml":
            continue
        first = f.read_text().splitlines()[0]
        assert first.startswith("# Run:"), f"{f.name} must start with the command that runs it"
        load_config(f)


@pytest.mark.parametrize("overrides, needle", [
    (["replay.per_class=20", "replay.fraction=0.5"],
     "replay.fraction (0.5) and replay.per_class (20) both size the replay set; set replay.fraction: 0"),
    (["replay.selection=herding"], "replay.selection herding fills a per-class memory; set replay.per_class"),
    (["replay.selection=herding", "replay.per_class=50", "replay.candidates_per_class=40"],
     "replay.candidates_per_class (40) must be at least replay.per_class (50)"),
    (["replay.selection=herding", "replay.per_class=20", "method.threshold=1"],
     "replay.selection herding picks exemplars on the teacher's features, and at method.threshold 1 no teacher "
     "scores; set replay.selection: uniform, or method.threshold below 1"),
])
def test_contradictory_replay_settings_are_refused_in_one_line_naming_the_fix(overrides, needle):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(None, overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_memory_and_balanced_fine_tuning_are_off_by_default():
    cfg = Config()
    assert cfg.replay.selection == "uniform" and cfg.replay.per_class == 0 and not cfg.replay.memory
    assert cfg.student.balanced_epochs == 0 and cfg.student.balanced_lr_factor == 0.1
    cfg = load_config(None, ["replay.selection=herding", "replay.per_class=20", "student.balanced_epochs=2"])
    assert cfg.replay.memory and cfg.replay.candidates_per_class == 1000
