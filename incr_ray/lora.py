"""LoRA students (the ``peft`` library): which modules get adapters, wrapping a loaded classifier,
counting what trains, and turning a trained adapter into a plain merged model folder.

With ``student.lora.r > 0`` a generation wraps its initial model with adapters of rank r on the
attention projections (:func:`target_modules`) and trains them together with the classification
head and anything else the initial checkpoint did not hold (:func:`modules_to_save`), which train
in full. Afterwards the adapter goes to ``gen_<g>/adapter/`` and the merged model
(``W + (alpha/r)·B·A`` in every adapted layer) to ``gen_<g>/model/``, a plain transformers folder.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForSequenceClassification

from .config import ConfigError, LoraSection

# The query and value projections of each attention block: the choice of Hu et al. 2021 (§7.1),
# which found adapting W_q and W_v as good as all four projections at the same parameter budget.
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "camembert", "layoutlm"), ["query", "value"]),
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "gemma", "gemma2", "olmo",
                     "olmo2", "phi", "starcoder2", "opt", "gptj", "gpt_neo"), ["q_proj", "v_proj"]),
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    **dict.fromkeys(("gpt_neox", "bloom", "falcon"), ["query_key_value"]),
}
# What transformers' sequence classifiers call their head (a module directly under the model).
HEAD_NAMES = ("classifier", "score")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def target_modules(model_type: str, configured: list[str] | None) -> list[str]:
    """The module names the adapters wrap: ``student.lora.target_modules`` when set, else the
    attention query and value projections of ``model_type`` (:data:`DEFAULT_TARGETS`)."""
    if configured:
        return list(configured)
    if model_type not in DEFAULT_TARGETS:
        raise ConfigError(
            f"student.lora: no default target modules for model type {model_type!r}; set "
            "student.lora.target_modules to its attention projections' names, e.g. [q_proj, v_proj]")
    return list(DEFAULT_TARGETS[model_type])


def _matches(name: str, target: str) -> bool:
    """peft's rule for a plain target name: the module's full name or its last dotted parts."""
    return name == target or name.endswith("." + target)


def unmatched_targets(module_names: Iterable[str], targets: list[str]) -> list[str]:
    """The targets that name no module of the model (a typo, or another architecture's names)."""
    names = list(module_names)
    return [t for t in targets if not any(_matches(n, t) for n in names)]


def modules_to_save(top_level: Iterable[str], new_keys: Iterable[str]) -> list[str]:
    """Modules that train in full beside the adapters: the classification head (``classifier``,
    ``score``, whichever the model has directly under it) and the owner of every weight the initial
    checkpoint did not hold (``new_keys``, e.g. ``bert.pooler.dense.weight`` of a checkpoint saved
    without a pooler): a random weight left frozen would never learn, and a merge could not
    reproduce it."""
    out = [h for h in HEAD_NAMES if h in set(top_level)]
    for key in new_keys:
        owner = key.rsplit(".", 1)[0]
        if not any(owner == m or owner.startswith(m + ".") for m in out):
            out.append(owner)
    return out


def lora_config(section: LoraSection, model_type: str, save: list[str]) -> LoraConfig:
    return LoraConfig(
        task_type="SEQ_CLS",
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=target_modules(model_type, section.target_modules),
        modules_to_save=save,
    )


def with_lora(model, section: LoraSection, new_keys: Iterable[str] = ()):
    """``model`` wrapped by peft: only the adapters and :func:`modules_to_save` are trainable."""
    save = modules_to_save((n for n, _ in model.named_children()), new_keys)
    # The adapters take their base layer's dtype. peft's default upcasts 16-bit adapters to fp32,
    # which under ZeRO-3 in bf16 (weights partitioned in bf16 as they load) left fp32 adapters
    # beside bf16 weights, and DeepSpeed's stage-3 optimizer refuses trainable weights of two
    # dtypes. DeepSpeed keeps fp32 master copies of whatever trains; other stages load in fp32
    # and cast the whole module later, so there this changes nothing.
    return get_peft_model(model, lora_config(section, model.config.model_type, save), autocast_adapter_dtype=False)


def _numel(p: torch.nn.Parameter) -> int:
    return getattr(p, "ds_numel", 0) or p.numel()  # ZeRO-3 leaves an empty partition in numel()


def parameter_counts(model) -> tuple[int, int]:
    """``(trainable, total)``: total counts the model as it is saved (the merged model under LoRA:
    no adapter weights, the head once rather than peft's trained copy and frozen original)."""
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for n, p in model.named_parameters()
                if "lora_" not in n and ".original_module." not in n)
    return trainable, total


def check_lora(section: LoraSection, model_path: str, trust_remote_code: bool = False) -> list[str]:
    """Before any compute: the targets of ``model_path``'s architecture, each matching some module
    (the model is built on the meta device, no weights read). Returns them."""
    hf = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    targets = target_modules(hf.model_type, section.target_modules)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(hf, trust_remote_code=trust_remote_code)
    missing = unmatched_targets((n for n, _ in model.named_modules()), targets)
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(
            f"student.lora.target_modules {missing} match no module of {hf.model_type!r} model {model_path!r}; "
            f"its linear layers are named {linear}")
    return targets


def save_adapter(trainer, adapter_dir: str, scratch: str, base_model: str, is_rank0: bool) -> None:
    """Write the trained adapter (and the fully trained modules) to ``adapter_dir``: peft's
    ``adapter_config.json`` and ``adapter_model.safetensors``, nothing else.

    Every rank must call this: under ZeRO-3 the Trainer gathers the trainable weights.
    ``base_model`` is recorded as the adapter's base (the initial model's real location, not the
    worker's staged copy).
    """
    trainer.model.peft_config["default"].base_model_name_or_path = base_model
    trainer.save_model(scratch)  # also writes the tokenizer and a model card: only the adapter is kept
    if not is_rank0:
        return
    os.makedirs(adapter_dir, exist_ok=True)
    for name in ADAPTER_FILES:
        shutil.move(os.path.join(scratch, name), os.path.join(adapter_dir, name))
    shutil.rmtree(scratch, ignore_errors=True)


def merged_model(load_initial: Callable[[], torch.nn.Module], adapter_dir: str, dtype: torch.dtype):
    """The initial model with the adapter merged in (``merge_and_unload``): a plain transformers
    model in ``dtype``, the dtype a full fine-tune would have saved. ``load_initial`` loads the
    generation's initial model again; the weights it draws at random are all in the adapter."""
    merged = PeftModel.from_pretrained(load_initial(), adapter_dir).merge_and_unload()
    return merged.to(dtype)


def adapter_params(linears: Iterable[tuple[str, int, int]], targets: list[str], r: int) -> int:
    """Parameters of the adapters: r·(in + out) for every ``(name, in_features, out_features)``
    layer a target names (A is r×in, B is out×r)."""
    return sum(r * (n_in + n_out) for name, n_in, n_out in linears if any(_matches(name, t) for t in targets))


def trainable_params_estimate(hidden_size: int, layers: int, num_labels: int, targets: list[str], r: int) -> int:
    """Without a model to count on: every target a hidden×hidden projection in each layer
    (grouped-query attention's smaller key/value projections make this an upper bound), plus a
    linear head."""
    return len(targets) * layers * r * 2 * hidden_size + num_labels * hidden_size
