"""Growing a sequence classifier's head for classes added after it was trained
(``incr-ray extend --allow-new-labels``; End-to-End Incremental Learning, Castro et al. 2018).

The label map only grows by appending, so the head's output layer grows by rows at the end: the
trained rows are copied, each new row is drawn as transformers draws a new head (weights
``N(0, initializer_range)``, bias 0) from ``run.seed``. The grown model gives exactly the
teacher's logits on the old classes. It is written as a model folder of its own, before any
training worker starts: every worker then loads a checkpoint whose head already has the size it
trains, which ZeRO-3 (a partitioned head cannot be resized at load) and LoRA (the head is one of
the modules that train in full) need no special case for.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

# What transformers' sequence classifiers call their head (a module directly under the model).
HEAD_NAMES = ("classifier", "score")
# Weights drawn at random when no initializer_range is configured: transformers' own default.
DEFAULT_INIT_STD = 0.02


class HeadError(ValueError):
    """A model whose classification head cannot be grown; one line."""


def output_layer_name(model: torch.nn.Module) -> str:
    """The head's output layer: the last ``nn.Linear`` under ``classifier`` or ``score`` with
    ``config.num_labels`` outputs (``classifier``, ``classifier.out_proj``, ``score``). Works on a
    model built on the meta device (no weights)."""
    num_labels = model.config.num_labels
    found = [name for name, m in model.named_modules()
             if name.split(".")[0] in HEAD_NAMES and isinstance(m, torch.nn.Linear) and m.out_features == num_labels]
    if not found:
        raise HeadError(f"{type(model).__name__} has no classification head ({'/'.join(HEAD_NAMES)}) with "
                        f"{num_labels} outputs to grow")
    return found[-1]


def grown_rows(weight: torch.Tensor, bias: torch.Tensor | None, added: int, seed: int,
               std: float = DEFAULT_INIT_STD) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An output layer with ``added`` more classes.

    Args:
        weight: ``(C_old, H)`` the trained rows.
        bias: ``(C_old,)`` or None (decoder heads have none).
        added: ``C_new − C_old ≥ 0``.
        seed: seeds the new rows (``run.seed``): the same seed gives the same rows.
        std: the new rows' standard deviation (the model's ``initializer_range``).

    Returns:
        ``(C_new, H)`` weight: the old rows bit for bit, then new rows ``N(0, std)`` drawn in fp32
        on a CPU generator and cast to ``weight``'s dtype; ``(C_new,)`` bias: the old values, then
        zeros (None when ``bias`` is None).
    """
    if added < 0:
        raise ValueError(f"added must be ≥ 0, got {added}: a label map only grows")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    new = torch.randn((added, weight.shape[1]), generator=generator, dtype=torch.float32) * std
    grown_weight = torch.cat([weight, new.to(device=weight.device, dtype=weight.dtype)])
    if bias is None:
        return grown_weight, None
    return grown_weight, torch.cat([bias, torch.zeros(added, dtype=bias.dtype, device=bias.device)])


def _head_layer(folder: str, trust_remote_code: bool) -> str:
    """The output layer's name of the classifier saved in ``folder`` (built on the meta device)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    hf = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(hf, trust_remote_code=trust_remote_code)
    return output_layer_name(model)


def grow_head_folder(src: str, dest: str, label_names: list[str], seed: int, trust_remote_code: bool = False) -> list[str]:
    """Copy the model folder ``src`` (a ``save_pretrained`` folder in safetensors) to ``dest`` with
    its head grown to ``label_names`` (the old names first, in their order) and its config's
    ``num_labels``, ``id2label`` and ``label2id`` set to them, so the folder loads in
    ``transformers.pipeline`` with the new labels. Only the safetensors file holding the head is
    rewritten; its model card (README.md) stays behind. Returns the tensor names grown.

    Raises:
        HeadError: the folder's labels are not the first of ``label_names``, or it has no head.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    root, out = Path(src), Path(dest)
    config = json.loads((root / "config.json").read_text())
    old = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    if label_names[:len(old)] != old or len(label_names) < len(old):
        raise HeadError(f"{src}: its labels {old} are not the first of {label_names}; a label map only grows "
                        "by appending")
    layer = _head_layer(src, trust_remote_code)
    std = float(config.get("initializer_range", DEFAULT_INIT_STD))
    shutil.copytree(root, out, ignore=shutil.ignore_patterns("README.md"))
    index = root / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else None
    weight_key, bias_key = f"{layer}.weight", f"{layer}.bias"
    file = weight_map.get(weight_key) if weight_map is not None else "model.safetensors"
    if file is None:
        raise HeadError(f"{src}: no tensor {weight_key!r} in its checkpoint to grow")
    with safe_open(str(root / file), framework="pt") as f:
        if weight_key not in f.keys():
            raise HeadError(f"{src}: no tensor {weight_key!r} in its checkpoint to grow")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    before = sum(t.numel() * t.element_size() for t in tensors.values())
    weight, bias = grown_rows(tensors[weight_key], tensors.get(bias_key), len(label_names) - len(old), seed, std)
    tensors[weight_key] = weight
    changed = [weight_key]
    if bias is not None:
        tensors[bias_key] = bias
        changed.append(bias_key)
    save_file(tensors, str(out / file), metadata=metadata or {"format": "pt"})
    if weight_map is not None:  # the index's total size follows the grown tensors
        saved = json.loads(index.read_text())
        after = sum(t.numel() * t.element_size() for t in tensors.values())
        saved.setdefault("metadata", {})["total_size"] = saved.get("metadata", {}).get("total_size", 0) + after - before
        (out / index.name).write_text(json.dumps(saved, indent=2))
    config["id2label"] = {str(i): name for i, name in enumerate(label_names)}
    config["label2id"] = {name: i for i, name in enumerate(label_names)}
    if "num_labels" in config:
        config["num_labels"] = len(label_names)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return changed
