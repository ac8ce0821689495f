"""Elastic weight consolidation (``method.ewc``) outside the loss: each generation's diagonal Fisher
information, and the anchor the next student's Trainer holds it in.

After a generation trains and saves, rank 0 loads the saved model whole (where every reader of it
loads it, after :func:`incr_ray.generation.recipe.release`) and :func:`estimate_fisher` writes
``fisher.safetensors``: for each weight the *next* student trains, ``fisher.<name>`` (F) and
``anchor.<name>`` (θ*, the weight as saved), fp32, keyed by the saved model's parameter names,
with the generation, rows and estimator in the file's metadata. The next student reads the
teacher's file into an :class:`EwcAnchor`, whose :meth:`EwcAnchor.added_to` adds
:func:`incr_ray.method.losses.ewc_penalty` to each batch's loss.

Which weights: a full fine-tune trains them all. A LoRA student starts from the merged teacher with
*fresh* adapters (B = 0), so the teacher's own adapters mean nothing to it; what it moves are the
adapted projections' weights, by ``scale·B·A``, and the head, in full. So under LoRA the file holds
the adapted projections' weights and the head (:func:`trained_weight_names`), and the penalty's
``θ − θ*`` of an adapted weight is the adapter's delta (its base weight is θ* itself, frozen).
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..config import Config, LoraSection
from ..lora import HEAD_NAMES, _matches, target_modules
from ..method.losses import ewc_penalty
from ..modeling import load_classifier
from ..storage import read_bytes

FISHER_FILE = "fisher.safetensors"
ESTIMATOR = "expected"  # Σ_y p(y|x)·(∇ log p(y|x))², see diagonal_fisher
META_KEY = "incr_ray"  # the file's metadata: generation, rows, estimator
ROW_ID = "_ewc_row_id"  # carried through the collate, so one pass over the rows is one pass


# ---------------------------------------------------------------------------------------------
# Estimating F on a trained generation


def trained_weight_names(model: torch.nn.Module, lora: LoraSection) -> list[str]:
    """The parameter names (of a plain, saved model) whose weights a student starting from it
    changes: every one in a full fine-tune; under LoRA the ``.weight`` of each adapted projection
    and every weight of the head (``classifier`` / ``score``)."""
    names = [n for n, _ in model.named_parameters()]
    if not lora.r:
        return names
    targets = target_modules(model.config.model_type, lora.target_modules)
    adapted = {f"{m}.weight" for m, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and any(_matches(m, t) for t in targets)}
    heads = tuple(f"{h}." for h in HEAD_NAMES)
    return [n for n in names if n in adapted or n.startswith(heads)]


def with_row_ids(collate):
    """``collate`` that also carries each row's id (:data:`ROW_ID`)."""

    def collate_with_ids(batch: dict) -> dict:
        out = collate(batch)
        out[ROW_ID] = torch.as_tensor(batch["row_id"])
        return out

    return collate_with_ids


def single_rows(batches: Iterable[dict[str, Any]], limit: int) -> Iterator[dict[str, torch.Tensor]]:
    """Model inputs of one row each, from collated batches (:func:`with_row_ids`), in order: the
    first ``limit`` distinct rows, or every distinct row the stream holds.

    A row id seen before is skipped, not taken for the start of the stream's next pass: identical
    (text, label) rows share an id (:func:`incr_ray.method.hashing.row_ids`), and Rotten Tomatoes
    holds such pairs, which used to end the estimate after 16-24 of 64 rows. A training stream is
    bounded (``max_steps`` × ``grad_accum`` batches), and reading a batch costs little beside a
    row's backward passes, so a block with fewer distinct rows than ``limit`` ends with the stream."""
    seen: set[int] = set()
    for batch in batches:
        ids = batch[ROW_ID].tolist()
        for i, row_id in enumerate(ids):
            if row_id in seen:
                continue
            seen.add(row_id)
            yield {k: v[i:i + 1] for k, v in batch.items()
                   if k not in ("labels", "targets", ROW_ID) and torch.is_tensor(v)}
            if len(seen) == limit:
                return


def diagonal_fisher(model: torch.nn.Module, rows: Iterable[dict[str, torch.Tensor]],
                    names: list[str]) -> tuple[dict[str, torch.Tensor], int]:
    """The diagonal of the expected Fisher information of ``model`` over ``rows``, for the
    parameters ``names``: ``F = mean_x Σ_y p(y|x) · (∇_θ log p(y|x))²``, fp32.

    The *expected* Fisher, over the model's own predictive p(y|x), not the empirical one with the
    row's label: it is the Fisher information the EWC derivation needs (the curvature of the
    log-likelihood at θ*, Kirkpatrick et al. 2017, as a Laplace approximation), and the empirical
    one is a poor stand-in for it away from a perfect fit (Kunstner et al., 2019) — here exactly
    where a generation's data disagrees with its labels. It costs one forward and C backward
    passes per row (C classes, few in a text classifier), and needs no labels. Per row, not per
    batch: the square of a batch's mean gradient is not the mean of the rows' squares.

    ``rows``: model inputs of one row each (:func:`single_rows`). Returns ``({name: F}, rows)``.
    Runs in eval mode (no dropout); leaves ``requires_grad`` as it found it.
    """
    params = dict(model.named_parameters())
    chosen = [params[n] for n in names]
    before = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(False)
    for p in chosen:
        p.requires_grad_(True)
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in chosen]
    device = chosen[0].device if chosen else torch.device("cpu")
    was_training, count = model.training, 0
    model.eval()
    try:
        for inputs in rows:
            log_p = torch.log_softmax(model(**{k: v.to(device) for k, v in inputs.items()}).logits[0].float(), dim=-1)
            p_y = log_p.detach().exp()
            classes = log_p.shape[0]
            for y in range(classes):
                grads = torch.autograd.grad(log_p[y], chosen, retain_graph=y < classes - 1, allow_unused=True)
                for total, g in zip(sums, grads):
                    if g is not None:
                        total.add_(g.float().square(), alpha=float(p_y[y]))
            count += 1
    finally:
        model.train(was_training)
        for n, p in params.items():
            p.requires_grad_(before[n])
    return {n: s / max(count, 1) for n, s in zip(names, sums)}, count


def fisher_bytes(fisher: dict[str, torch.Tensor], anchors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> bytes:
    """The file: ``fisher.<name>`` and ``anchor.<name>`` (fp32, contiguous), and ``metadata`` as
    one JSON string under the header's ``incr_ray`` key (safetensors writes a metadata map in a
    random order; one key keeps the same inputs giving the same bytes)."""
    tensors = {f"fisher.{n}": f.float().contiguous().cpu() for n, f in fisher.items()}
    tensors.update({f"anchor.{n}": anchors[n].detach().float().contiguous().cpu().clone() for n in fisher})
    return save_safetensors(tensors, metadata={META_KEY: json.dumps(metadata, sort_keys=True)})


def read_fisher(path: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """``(F, θ*, metadata)`` of a fisher file on storage (local or remote), keyed by parameter name."""
    data = read_bytes(path)
    header = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])  # safetensors: u64 length + JSON
    tensors = load_safetensors(data)
    fisher = {k.removeprefix("fisher."): v for k, v in tensors.items() if k.startswith("fisher.")}
    anchors = {k.removeprefix("anchor."): v for k, v in tensors.items() if k.startswith("anchor.")}
    return fisher, anchors, json.loads(header.get("__metadata__", {}).get(META_KEY, "{}"))


def estimate_fisher(cfg: Config, generation: int, model_dir: str, batches: Iterable[dict[str, Any]],
                    device, dest: str) -> dict[str, Any]:
    """Load the saved model at ``model_dir`` whole, in fp32, on ``device``; estimate its Fisher on
    the first ``method.ewc_rows`` rows of ``batches`` (collated with :func:`with_row_ids`: the
    generation's seeded training order, distinct rows: :func:`single_rows`); write the file to ``dest`` (local).
    Returns the figures run.json records."""
    started = time.perf_counter()
    model = load_classifier(model_dir, trust_remote_code=cfg.model.trust_remote_code, dtype=torch.float32).to(device)
    names = trained_weight_names(model, cfg.student.lora)
    fisher, rows = diagonal_fisher(model, single_rows(batches, cfg.method.ewc_rows), names)
    anchors = dict(model.named_parameters())
    data = fisher_bytes(fisher, anchors, {"generation": generation, "rows": rows, "estimator": ESTIMATOR})
    with open(dest, "wb") as f:
        f.write(data)
    flat = torch.cat([f.flatten() for f in fisher.values()]) if fisher else torch.zeros(1)
    del model, anchors
    return {"rows": rows, "estimator": ESTIMATOR, "weights": len(fisher), "params": int(flat.numel()),
            "mean": float(flat.mean()), "max": float(flat.max()), "bytes": len(data),
            "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------------------------------------
# The penalty in the next student's loss


class EwcAnchor:
    """The teacher's Fisher file, held by a student's Trainer: at each batch the deltas ``θ − θ*``
    of the weights the file names, from the student as it is now (a plain model, or a peft model:
    an adapted weight's delta is its adapter's ``scale·B·A``, a head's the trained copy's minus
    θ*), and :func:`incr_ray.method.losses.ewc_penalty` of them. The student's weights must be
    whole on this rank (ZeRO 0–2; ZeRO-3 is refused, see :func:`incr_ray.config.ewc_stage_problem`).

    Weights the file names that the student does not train, or holds in another shape (a head
    grown by ``extend --allow-new-labels``), are left out and counted."""

    def __init__(self, fisher: dict[str, torch.Tensor], anchors: dict[str, torch.Tensor], strength: float,
                 metadata: dict[str, Any] | None = None):
        self.fisher, self.anchors, self.strength = fisher, anchors, strength
        self.metadata = metadata or {}
        # (the weight, or a function giving its delta; F; θ* or None) per weight, bound at the first batch
        self.terms: list[tuple[Any, torch.Tensor, torch.Tensor | None]] | None = None
        self.left_out: list[str] = []
        self._first = self._last = self._sum = self._loss = None
        self._calls = 0

    @classmethod
    def read(cls, path: str, strength: float) -> "EwcAnchor":
        """The fisher file at ``path`` (local or remote), penalised with ``strength`` (λ)."""
        fisher, anchors, metadata = read_fisher(path)
        return cls(fisher, anchors, strength, metadata)

    def _bind(self, model: torch.nn.Module) -> None:
        # On the weights' device; θ* rounded to the weight's dtype, so a 16-bit module starts at delta 0.
        current = _current_weights(model)
        self.terms = []
        for name, f in self.fisher.items():
            delta_fn, weight = current.get(name, (None, None))
            if weight is None or tuple(weight.shape) != tuple(f.shape):
                self.left_out.append(name)
                continue
            f = f.to(weight.device)
            if delta_fn is not None:  # an adapted weight: its base is θ*, frozen; the adapter is the delta
                self.terms.append((delta_fn, f, None))
            else:
                self.terms.append((weight, f, self.anchors[name].to(device=weight.device, dtype=weight.dtype).float()))
        self.fisher = self.anchors = {}  # placed on the device: the CPU copies can go

    def deltas(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """``θ − θ*`` of each penalised weight, differentiable."""
        if self.terms is None:
            self._bind(model)
        return [value() if anchor is None else value.float() - anchor for value, _, anchor in self.terms]

    def added_to(self, loss: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
        """``loss`` + the penalty, noting both for :meth:`figures`."""
        penalty = ewc_penalty(self.deltas(model), [f for _, f, _ in self.terms], self.strength).to(loss.device)
        seen = penalty.detach()
        self._first = seen if self._first is None else self._first
        self._sum = seen if self._sum is None else self._sum + seen
        self._last, self._loss, self._calls = seen, loss.detach(), self._calls + 1
        return loss + penalty

    def figures(self) -> dict[str, Any]:
        """For run.json: the anchor's generation and rows, what was penalised, and the penalty at
        the first and last batch, its mean over the batches, and its share of the last batch's loss."""
        meta = self.metadata
        out: dict[str, Any] = {
            "anchor_generation": int(meta["generation"]) if "generation" in meta else None,
            "anchor_rows": int(meta["rows"]) if "rows" in meta else None,
            "weights": len(self.terms or []),
            "params": sum(int(f.numel()) for _, f, _ in self.terms or []),
            "left_out": len(self.left_out),
        }
        if self._calls:
            last, loss = float(self._last), float(self._loss)
            out.update(penalty_first=float(self._first), penalty_last=last, penalty_mean=float(self._sum) / self._calls,
                       share_last=last / (loss + last) if loss + last > 0 else 0.0)
        return out


def _current_weights(model: torch.nn.Module) -> dict[str, tuple[Any, torch.Tensor]]:
    """Saved name -> (None, the trainable parameter) or (a function giving the adapter's delta,
    the adapted base weight)."""
    get_base = getattr(model, "get_base_model", None)
    if get_base is None:  # a full fine-tune: the names are the saved model's
        return {n: (None, p) for n, p in model.named_parameters() if p.requires_grad}
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    out: dict[str, tuple[Any, torch.Tensor]] = {}
    for name, module in get_base().named_modules():
        if isinstance(module, LoraLayer) and module.active_adapters:
            adapter = module.active_adapters[0]
            out[f"{name}.weight"] = ((lambda m=module, a=adapter: m.get_delta_weight(a)), module.get_base_layer().weight)
        elif isinstance(module, ModulesToSaveWrapper) and module.active_adapters:
            for pn, p in module.modules_to_save[module.active_adapters[0]].named_parameters():
                out[f"{name}.{pn}"] = (None, p)
    return out
