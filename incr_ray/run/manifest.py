"""``run.json``: the typed manifest of a run folder, and which settings a resume may not change.

The manifest is the run's memory: each step records itself here as it finishes, so the same
command after a crash continues where the last one stopped. It is read through :func:`load` (the
``version`` is checked first) and written atomically by :meth:`incr_ray.run.folder.Run.save`.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from ..config import Config
from ..storage import read_json

MANIFEST_VERSION = 1


class RunError(ValueError):
    """The run folder and the request disagree (changed config, unfinished run, ...); one line."""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GenerationEntry(_Record):
    index: int
    status: Literal["pending", "running", "finished"] = "pending"
    started: str | None = None
    finished: str | None = None
    extended: bool | None = None  # trained by `incr-ray extend`
    source: str | None = None  # extend: the new data file
    # extend --set: the training settings (EXTENSION_SETTINGS) this generation changed from the run's.
    settings: dict[str, Any] | None = None
    # extend --holdout-fraction: the share of the new file held out, gen_<g>/own_holdout, its rows.
    own_holdout_fraction: float | None = None
    own_holdout: str | None = None
    own_holdout_rows: int | None = None
    # extend --allow-new-labels: the labels this generation appended to the run's label map, and
    # gen_<g>/initial_model, its teacher with the classification head grown for them (the
    # student's initial model, and a LoRA adapter's base).
    new_labels: list[str] | None = None
    initial_model: str | None = None
    # teacher.ensemble > 1: the generations whose mean softmax scored this generation's block
    # (ascending; Manifest.teacher_members), recorded with the scoring.
    ensemble: list[int] | None = None
    # Teacher scoring (generations ≥ 1): gen_<g>/targets, its rows (block + replay) and time.
    targets: str | None = None
    rows: int | None = None
    block_rows: int | None = None
    replay_rows: int | None = None
    scoring_seconds: float | None = None
    # What the teacher and the target rule did on the block's own rows (not replay), from the
    # stored targets: accuracy, nll, kept/pushed/floored shares, target_entropy, rows.
    teacher_on_block: dict[str, float] | None = None
    # replay.per_class: the memory the student replays, gen_<g>/memory.parquet (path), and selection,
    # per_class, rows, classes, candidates, per_label (rows per old class), mean_distance (herding).
    memory: dict[str, Any] | None = None
    # Suspected label errors among the block's own rows (method.suspect_below): gen_<g>/suspects.parquet,
    # and rows, block_rows, share, below, policy (method.suspects: what the student trained on for them).
    suspects: dict[str, Any] | None = None
    # Training: gen_<g>/model, the workers' figures, holdout metrics.
    model: str | None = None
    adapter: str | None = None  # gen_<g>/adapter: the LoRA adapter merged into model (student.lora.r > 0)
    # method.ewc > 0: gen_<g>/fisher.safetensors (this model's diagonal Fisher and weights, the next
    # student's anchor), and what EWC did: lambda, the penalty against the teacher's Fisher
    # (anchor_generation, weights, params, penalty_first/last/mean, share_last of the last batch's
    # loss), this model's own Fisher (fisher: rows, params, mean, max, bytes, seconds).
    fisher: str | None = None
    ewc: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    metrics: dict[str, float] | None = None
    eval_seconds: float | None = None
    seconds: float | None = None
    # Continual-learning figures: holdout rows this generation got wrong that its teacher got right
    # (flip_rate) and the reverse (fix_rate), accuracy on a sample of earlier blocks (retention).
    predictions: str | None = None  # gen_<g>/holdout_predictions.parquet
    continual: dict[str, float] | None = None
    # The validation slice (method.validation_fraction): student and teacher on it, the temperature
    # fitted there (method.calibrate), and whether the gate (method.keep_best) promoted the student.
    validation: dict[str, float] | None = None
    calibration: dict[str, float] | None = None
    promoted: bool | None = None
    # Accuracy and NLL on each extension's own holdout, keyed by that extension's generation.
    drift: dict[str, dict[str, float]] | None = None
    # A generation at or after an extension that added labels (Manifest.class_split): on the run's
    # holdout ("holdout") and each extension's own (its generation), accuracy overall, on the old
    # classes and on the new ones, rows and recall per class, and the old classes' accuracy by the
    # teacher on the same rows (old_accuracy_before) and forgetting (before − after); with
    # added_by, old_classes, new_labels and before (the teacher's generation). run/new_classes.py.
    old_new: dict[str, Any] | None = None
    # tracking.backend mlflow: this generation's nested run (a resumed generation logs into it again).
    tracking_run_id: str | None = None


class DataInfo(_Record):
    fingerprint: str
    block_sizes: list[int]
    holdout_size: int
    split: str = "split"
    split_done: bool = True


class Manifest(_Record):
    version: int = MANIFEST_VERSION
    name: str
    run_dir: str
    status: Literal["running", "finished", "extending"] = "running"
    created: str
    config: dict[str, Any]
    label_names: list[str]
    data: DataInfo
    base_model: str | None = None
    generations: list[GenerationEntry] = []
    final_model: str | None = None
    final_generation: int | None = None  # the last promoted generation (method.keep_best may keep an older one)
    # tracking.backend mlflow: the parent run; a resumed or extended run logs into the same one.
    tracking_run_id: str | None = None

    def entry(self, g: int) -> GenerationEntry:
        """Generation ``g``'s entry, created (pending) with any missing before it."""
        while len(self.generations) <= g:
            self.generations.append(GenerationEntry(index=len(self.generations)))
        return self.generations[g]

    def finished_generations(self) -> list[GenerationEntry]:
        return [e for e in self.generations if e.status == "finished"]

    def teacher_of(self, g: int) -> GenerationEntry | None:
        """The generation that teaches generation ``g``: the last finished one before it that was
        promoted (the method.keep_best gate may skip a student); None for generation 0. With
        ``teacher.ensemble`` it is the newest of :meth:`teacher_members`: the student starts from
        its weights, and its Fisher and predictions are what EWC and the flip rates compare with."""
        members = self.teacher_members(g, 1)
        return members[0] if members else None

    def teacher_members(self, g: int, n: int) -> list[GenerationEntry]:
        """The ``n`` generations whose mean softmax teaches generation ``g`` (``teacher.ensemble``),
        oldest first: the last ``n`` finished, promoted ones before ``g`` (fewer while fewer exist),
        so the newest is :meth:`teacher_of` and ``n = 1`` is that teacher alone. A student the gate
        did not promote teaches in no ensemble either. Empty for generation 0."""
        earlier = [e for e in self.generations[:g] if e.status == "finished" and e.promoted is not False]
        return earlier[-n:] if n > 0 else []

    def label_names_of(self, g: int) -> list[str]:
        """The labels generation ``g``'s model knows: the run's label map less the labels later
        extensions appended (``new_labels``)."""
        later = sum(len(e.new_labels or []) for e in self.generations[g + 1:])
        return self.label_names[:len(self.label_names) - later]

    def class_split(self, g: int) -> tuple[int, int] | None:
        """(the generation that last added labels up to ``g``, how many classes were known before
        it): generation ``g``'s old classes are the ids below that count, its new ones the rest of
        its label map. None when no generation up to ``g`` added labels."""
        adders = [e for e in self.generations[:g + 1] if e.new_labels]
        if not adders:
            return None
        last = adders[-1]
        return last.index, len(self.label_names_of(last.index)) - len(last.new_labels)

    def teacher_labels(self, g: int) -> list[str]:
        """The labels generation ``g``'s teacher knows (fewer than ``g``'s own when ``g`` appended
        new ones); generation 0's own when it has no teacher."""
        teacher = self.teacher_of(g)
        return self.label_names_of(teacher.index if teacher is not None else g)

    def begin_extension(self, data_path: str, holdout_fraction: float, settings: dict[str, Any],
                        label_names: list[str] | None = None) -> int:
        """The generation ``extend`` trains: a new pending one (the run now ``extending``), or the
        one an interrupted extension left, which only the same data and settings may finish.
        ``label_names``: the label map the new data needs (the run's, then labels it appends)."""
        if self.status == "extending":
            last = self.generations[-1]
            if last.source != data_path:
                raise RunError(f"run {self.name!r} is still being extended with {last.source!r}; "
                               "run extend with that --data first")
            if (last.settings or {}) != settings:
                raise RunError(f"run {self.name!r}'s extension was started with {as_sets(last.settings)}, "
                               f"not {as_sets(settings)}; pass the same --set to finish it")
            return last.index
        g = len(self.generations)
        self.status = "extending"
        entry = self.entry(g)
        entry.source = data_path
        entry.own_holdout_fraction = holdout_fraction or None
        entry.settings = settings or None
        added = (label_names or self.label_names)[len(self.label_names):]
        if added:
            entry.new_labels = list(added)
            self.label_names = self.label_names + list(added)
        return g

    def config_of(self, g: int) -> dict[str, Any]:
        """The config generation ``g`` trained with: the run's, with an extension's own settings."""
        out: dict[str, Any] = {section: dict(values) if isinstance(values, dict) else values
                               for section, values in self.config.items()}
        settings = self.generations[g].settings if g < len(self.generations) else None
        for key, value in (settings or {}).items():
            section, name = key.split(".")
            out.setdefault(section, {})[name] = value
        return out

    def forked(self, name: str, run_dir: str, config: dict[str, Any], generations: int | None = None) -> "Manifest":
        """The manifest of a copy of this run named ``name`` at ``run_dir`` with settings ``config``:
        the whole run as it stands (``generations`` None), or its first ``generations`` generations,
        running again with no final model yet. What it keeps must be finished; no copy logs into
        this run's tracking."""
        kept = self.generations if generations is None else self.generations[:generations]
        unfinished = [e.index for e in kept if e.status != "finished"]
        if unfinished:
            raise RunError(f"run {self.name!r} has generation {unfinished[0]} unfinished; finish it first, "
                           "or fork fewer generations")
        update: dict[str, Any] = {"name": name, "run_dir": run_dir, "config": config, "tracking_run_id": None,
                                  "generations": [e.model_copy(deep=True) for e in kept]}
        if generations is not None:
            update.update(status="running", final_model=None, final_generation=None,
                          label_names=self.label_names_of(generations - 1) if generations else self.label_names)
        return self.model_copy(update=update, deep=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def load(path: str) -> Manifest:
    raw = read_json(path)
    version = raw.get("version") if isinstance(raw, dict) else None
    if version != MANIFEST_VERSION:
        raise RunError(
            f"{path} has manifest version {version!r}; this incr-ray reads version {MANIFEST_VERSION}: "
            "use the incr-ray that wrote it, or start a new run.name"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RunError(f"{path} is not a valid run manifest ({where}: {first['msg']}); start a new run.name") from None


# Settings that decide what earlier generations contain; changing one of them makes a resumed
# run inconsistent. Everything else (workers, pool sizes, DeepSpeed stage, storage) may change.
RESULT_SETTINGS: dict[str, tuple[str, ...] | None] = {
    "run": ("seed",),
    "data": None,
    "model": ("base", "max_length"),
    "method": None,
    "student": ("init", "epochs", "min_steps", "learning_rate", "schedule", "weight_decay", "warmup_ratio",
                "batch_size", "grad_accum", "lora", "balanced_epochs", "balanced_lr_factor"),
    "replay": None,
    "teacher": ("ensemble",),
}


def result_settings(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The flattened ``section.key -> value`` settings that define a run's generations. A key the
    config predates (a run folder written by an older incr-ray) counts as its default."""
    defaults = Config().to_dict()
    out: dict[str, Any] = {}
    for section, keys in RESULT_SETTINGS.items():
        values = {**defaults[section], **cfg_dict.get(section, {})}
        for key in keys or defaults[section].keys():
            out[f"{section}.{key}"] = values.get(key)
    return out


# What `incr-ray extend --set` may change for the generation it trains: how that new student
# learns (the extension study measured an extension at 10% of the peak learning rate moving the
# model least), what it does with the rows its teacher flags as suspected label errors (new
# data is where noise arrives) and which rows of earlier blocks it replays (new classes call for a
# memory of the old ones), never what the earlier generations contain or how targets are made.
EXTENSION_SETTINGS = ("student.epochs", "student.min_steps", "student.learning_rate", "student.schedule",
                      "student.weight_decay", "student.warmup_ratio", "student.batch_size", "student.grad_accum",
                      "student.balanced_epochs", "student.balanced_lr_factor", "method.suspect_below",
                      "method.suspects", "replay.fraction", "replay.per_class", "replay.selection",
                      "replay.candidates_per_class")


def as_sets(settings: dict[str, Any] | None) -> str:
    """Settings as the ``--set`` arguments that give them."""
    return ", ".join(f"{k}={v}" for k, v in (settings or {}).items()) or "the run's own settings"


def extension_settings(manifest: Manifest, cfg: Config) -> dict[str, Any]:
    """The :data:`EXTENSION_SETTINGS` that ``cfg`` changes from the run's own (dotted key -> value)."""
    old, new = result_settings(manifest.config), result_settings(cfg.to_dict())
    return {k: new[k] for k in EXTENSION_SETTINGS if old[k] != new[k]}


def check_compatible(manifest: Manifest, cfg: Config, may_change: tuple[str, ...] = ()) -> None:
    old = result_settings(manifest.config)
    new = result_settings(cfg.to_dict())
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in new if k not in may_change and old.get(k) != new.get(k)]
    if not changed:
        return
    if may_change:  # an extension
        said, fix = "trained", f"an extension may change resource settings and {', '.join(may_change)} only"
    else:
        said, fix = "started", "restore them to resume, or choose a new run.name"
    raise RunError(f"run {manifest.name!r} was {said} with other settings ({'; '.join(changed)}); {fix}")
