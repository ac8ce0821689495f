"""The model a plan is for: its parameter count Ψ and transformer shape, read without loading weights.

The parameter count comes from one of three places, and the plan says which: the base model's
``config.json`` (the classifier is built on the ``meta`` device and its parameters counted), a
small built-in table of well-known shapes (:data:`KNOWN_SHAPES`, usable as ``model.base`` here
only), or ``--params`` given on the command line.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from ..config import Config, ConfigError
from ..lora import HEAD_NAMES, adapter_params, target_modules, trainable_params_estimate
from ..modeling import MINILM, ModelError, check_classifier, resolve_model_path

# Well-known shapes, as Hugging Face config arguments. Planning only: training needs a real folder.
# Llama-2 7B/13B/70B, Llama-3 8B/70B, Mistral-7B v0.1, Qwen2-7B, BERT base/large.
KNOWN_SHAPES: dict[str, dict] = {
    "bert-base": dict(model_type="bert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, vocab_size=30522),
    "bert-large": dict(model_type="bert", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                       intermediate_size=4096, vocab_size=30522),
    "llama-7b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, intermediate_size=11008, vocab_size=32000),
    "llama-13b": dict(model_type="llama", hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, intermediate_size=13824, vocab_size=32000),
    "llama-70b": dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, intermediate_size=28672, vocab_size=32000),
    "llama3-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, intermediate_size=14336, vocab_size=128256),
    "llama3-70b": dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, intermediate_size=28672, vocab_size=128256),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=32000),
    "qwen2-7b": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, intermediate_size=18944, vocab_size=152064),
    # Hub names of the models the shipped configs use, so that they plan on a machine without the hub.
    "Qwen/Qwen2.5-1.5B": dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                              num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                              tie_word_embeddings=True),
}


@dataclass(frozen=True)
class ModelShape:
    """What the formulas need to know about a model; ``None`` where the source does not say."""

    params: int
    source: str  # where ``params`` came from, printed verbatim
    hidden_size: int | None = None
    layers: int | None = None
    heads: int | None = None
    largest_layer_params: int | None = None  # one module's own parameters (ZeRO-3 gathers it whole)
    # Attention that never materialises the s×s score matrices (SDPA, flash): transformers' default
    # wherever the architecture supports it. False when unknown: the activation estimate is then the
    # upper bound that keeps them.
    fused_attention: bool = False
    # Parameters with gradients and optimizer states: None when all of them train; with LoRA the
    # adapters and the head (student.lora).
    trainable_params: int | None = None
    lora_targets: tuple[str, ...] = ()


FUSED_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def parse_count(text: str) -> int:
    """``"7e9"``, ``"7000000000"``, ``"7B"``, ``"6.7b"``, ``"350M"`` → an integer parameter count."""
    m = re.fullmatch(r"\s*([0-9.]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBtT]?)\s*", text)
    if not m:
        raise ValueError(f"{text!r} is not a parameter count; write e.g. 7e9 or 7B")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()]
    value = float(m.group(1)) * scale
    if value < 1:
        raise ValueError(f"{text!r} is not a positive parameter count")
    return int(round(value))


def _first_attr(cfg, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    return None


def count_parameters(hf_config, trust_remote_code: bool = False) -> tuple[int, int]:
    """Build ``AutoModelForSequenceClassification`` from ``hf_config`` on the meta device.

    Returns ``(total, largest_layer)``: the number of distinct parameters (tied ones once, as
    ``model.parameters()`` yields them) and the most parameters any one module owns directly,
    which is what DeepSpeed's ZeRO-3 estimator calls the largest layer. No memory is allocated.
    """
    return _counts(_meta_model(hf_config, trust_remote_code))


def _meta_model(hf_config, trust_remote_code: bool):
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(hf_config, trust_remote_code=trust_remote_code)


def _counts(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return total, largest


def lora_trainable(model, targets: list[str], r: int) -> int:
    """Adapters of rank ``r`` on ``targets`` plus the head's parameters, counted on ``model``."""
    linears = [(n, m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    head = sum(p.numel() for name, child in model.named_children() if name in HEAD_NAMES for p in child.parameters())
    return adapter_params(linears, targets, r) + head


def _shape_from_hf_config(hf_config, source: str, trust_remote_code: bool = False, lora=None) -> ModelShape:
    model = _meta_model(hf_config, trust_remote_code)
    total, largest = _counts(model)
    trainable, targets = None, ()
    if lora is not None and lora.r:
        targets = tuple(target_modules(hf_config.model_type, lora.target_modules))
        trainable = lora_trainable(model, list(targets), lora.r)
    return ModelShape(
        params=total,
        source=source,
        hidden_size=_first_attr(hf_config, ("hidden_size", "d_model", "dim", "n_embd")),
        layers=_first_attr(hf_config, ("num_hidden_layers", "n_layers", "num_layers", "n_layer")),
        heads=_first_attr(hf_config, ("num_attention_heads", "n_heads", "n_head")),
        largest_layer_params=largest,
        fused_attention=getattr(model.config, "_attn_implementation", None) in FUSED_ATTENTION,
        trainable_params=trainable,
        lora_targets=targets,
    )


def head_labels(cfg: Config) -> tuple[int, str]:
    """How many classes the planned head has, and why: data.labels, the synthetic classes, or 2."""
    if cfg.data.labels:
        return len(cfg.data.labels), "data.labels"
    if cfg.data.source == "synthetic":
        return cfg.data.synthetic_classes, "data.synthetic_classes"
    return 2, "assumed; set data.labels for the exact head"


def resolve_shape(
    cfg: Config,
    params: int | None = None,
    hidden_size: int | None = None,
    layers: int | None = None,
    heads: int | None = None,
) -> ModelShape:
    """The model to plan for.

    With ``params`` the base model is not read at all (it may be a hub name on an offline machine):
    Ψ is ``params`` and the shape is whatever ``hidden_size``/``layers``/``heads`` say. Otherwise
    ``model.base`` is a local folder (or ``minilm``), else a :data:`KNOWN_SHAPES` name; its config is
    built on the meta device with a head for :func:`head_labels` classes and counted.
    """
    base = cfg.model.base
    num_labels, why = head_labels(cfg)
    lora = cfg.student.lora
    if params is not None:
        trainable, targets = None, ()
        if lora.r:
            if not (hidden_size and layers):
                raise ConfigError("student.lora.r > 0: the plan counts the adapters from the model's shape; "
                                  "pass --hidden-size and --layers with --params")
            targets = tuple(lora.target_modules or ["q_proj", "v_proj"])
            trainable = trainable_params_estimate(hidden_size, layers, num_labels, list(targets), lora.r)
        return ModelShape(params=params, source="--params (model.base not read)", hidden_size=hidden_size,
                          layers=layers, heads=heads, trainable_params=trainable, lora_targets=targets)
    head = f"{num_labels}-label head ({why})"
    # id2label rather than num_labels: a folder's own id2label of another length would clash with it.
    names = cfg.data.labels or [f"LABEL_{i}" for i in range(num_labels)]
    head_kwargs = dict(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    if base == MINILM or Path(base).expanduser().exists():
        path = resolve_model_path(base)
        check_classifier(path, cfg.model.trust_remote_code)
        hf = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code, **head_kwargs)
        shape = _shape_from_hf_config(hf, f"{path}/config.json, built on the meta device with a {head}",
                                      cfg.model.trust_remote_code, lora)
    elif base in KNOWN_SHAPES:
        kwargs = dict(KNOWN_SHAPES[base])
        model_type = kwargs.pop("model_type")
        hf = AutoConfig.for_model(model_type, **head_kwargs, **kwargs)
        shape = _shape_from_hf_config(hf, f"built-in shape {base!r} ({model_type}), built on the meta device "
                                          f"with a {head}", lora=lora)
    else:
        try:  # a hub name: only its config.json is fetched, where the hub is reachable
            hf = AutoConfig.from_pretrained(base, trust_remote_code=cfg.model.trust_remote_code, **head_kwargs)
        except Exception:  # noqa: BLE001 - offline, unknown name, gated repo: all mean "cannot read it"
            raise ModelError(
                f"model.base {base!r} is neither a local model folder, a built-in shape ({', '.join(KNOWN_SHAPES)}) "
                "nor a hub model whose config could be read here; pass --params (e.g. --params 7e9 "
                "--hidden-size 4096 --layers 32)"
            ) from None
        shape = _shape_from_hf_config(hf, f"the hub's {base}/config.json, built on the meta device with a {head}",
                                      cfg.model.trust_remote_code, lora)
    overrides = {k: v for k, v in (("hidden_size", hidden_size), ("layers", layers), ("heads", heads)) if v}
    if overrides:
        flags = ", ".join("--" + k.replace("_", "-") for k in overrides)
        shape = dataclasses.replace(shape, **overrides, source=f"{shape.source}; {flags} from the command line")
    return shape
