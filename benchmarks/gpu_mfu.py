"""Model FLOPs utilization for the GPU check: achieved FLOP/s over a peak, against two peaks.

FLOPs per token follow the usual dense-transformer count (Kaplan et al.; PaLM's MFU): 2·N for a
forward pass and 6·N for training (forward + backward), N counting every parameter, the embedding
included. Attention's score and value products (≈ 2·layers·seq·hidden per token forward) are left
out, as in llm-foundry's 1B figure we compare with, so at 512 tokens this MFU slightly understates
the work done.

Two denominators, both named in the results: the peak measured on the same GPU (a large bf16
matmul) and the vendor's dense bf16 figure for that GPU (no sparsity), looked up by its name. An
unknown GPU gets only the measured one.
"""

from __future__ import annotations

from typing import Any

# (substring of torch.cuda.get_device_name, label, dense bf16 FLOP/s), first match wins: the
# specific names come before the plain "H100". Figures from NVIDIA's data sheets (the "with
# sparsity" figure halved).
VENDOR_DENSE_BF16: tuple[tuple[str, str, float], ...] = (
    ("GH200", "GH200 dense bf16 (vendor)", 989e12),
    ("H200 NVL", "H200 NVL dense bf16 (vendor)", 835e12),
    ("H200", "H200 dense bf16 (vendor)", 989e12),
    ("H100 NVL", "H100 NVL dense bf16 (vendor)", 835e12),
    ("H100 PCIE", "H100 PCIe dense bf16 (vendor)", 756e12),
    ("H100", "H100 SXM dense bf16 (vendor)", 989e12),  # "NVIDIA H100 80GB HBM3": the SXM part
    ("A100", "A100 dense bf16 (vendor)", 312e12),
)
# Goals, as fractions of the vendor figure: the student's training MFU for the ~1B decoder
# (llm-foundry reports 41.8% for 1B on H100 that way) and the teacher's forward MFU (issue 24, item 13).
STUDENT_GOAL = 0.40
TEACHER_GOAL = 0.50


def forward_flops_per_token(params: int) -> float:
    """2·N: one multiply and one add per parameter per token."""
    return 2.0 * params


def training_flops_per_token(params: int) -> float:
    """6·N: the forward (2·N) and a backward of twice its cost."""
    return 6.0 * params


def vendor_peak(gpu_name: str | None) -> tuple[str, float] | None:
    """``(label, dense bf16 FLOP/s)`` of the GPU named ``gpu_name``, or None when it is not in
    :data:`VENDOR_DENSE_BF16` (then only the measured peak applies)."""
    name = (gpu_name or "").upper()
    for key, label, flops in VENDOR_DENSE_BF16:
        if key in name:
            return label, flops
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    """Achieved FLOP/s (``flops_per_token · tokens_per_s``) over ``peak_flops``."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops}")
    return flops_per_token * tokens_per_s / peak_flops


def mfu_figures(params: int, tokens_per_s: float, pass_kind: str, measured_peak: float | None,
                gpu_name: str | None, goal: float | None = None) -> dict[str, Any]:
    """The MFU of ``tokens_per_s`` (non-pad tokens) through a model of ``params`` parameters,
    against the measured peak and the vendor's figure for ``gpu_name``; ``pass_kind`` is
    "training" (6·N) or "forward" (2·N). ``goal`` (a fraction of the vendor figure) adds
    ``goal_met``; without a vendor figure there is nothing to hold it against (None)."""
    per_token = {"training": training_flops_per_token, "forward": forward_flops_per_token}[pass_kind](params)
    achieved = per_token * tokens_per_s
    out: dict[str, Any] = {"flops_per_token": f"{'6' if pass_kind == 'training' else '2'}·N", "params": params,
                           "tokens_per_s": tokens_per_s, "achieved_tflops": achieved / 1e12}
    if measured_peak:
        out.update(measured_peak_tflops=measured_peak / 1e12, mfu_measured=achieved / measured_peak)
    vendor = vendor_peak(gpu_name)
    if vendor is not None:
        label, flops = vendor
        out.update(vendor_peak_name=label, vendor_peak_tflops=flops / 1e12, mfu_vendor=achieved / flops)
    if goal is not None:
        out.update(goal_of_vendor=goal, goal_met=None if vendor is None else bool(out["mfu_vendor"] >= goal))
    return out
