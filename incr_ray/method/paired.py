"""Statistics over seeds: the mean and 95% Student-t interval of paired per-seed differences,
the verdict a goal gets from one, and roughly how many seeds would resolve a difference at the
observed spread.

``incr-ray compare`` and the benchmarks read their intervals from here. Paired means: ``a[i]``
and ``b[i]`` come from the same seed, so the same split, holdout and blocks; the interval is that
of the mean of the per-seed differences. Plain Python: no numpy, ray or torch.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = [float(v) for v in values]
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


# ---------------------------------------------------------------------------------------------
# Paired differences over seeds

# Two-sided 95% quantiles of Student's t, t_{0.975}(df), df = 1 … 30 (scipy is not in the venv;
# tests/test_benchmarks_quality.py checks every entry against a numerical integral of the density).
T_975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
Z_975 = 1.959963984540054


def t_975(df: int) -> float:
    """t_{0.975}(df): the table up to 30, beyond it the Cornish-Fisher expansion around the normal
    quantile (within 1e-4 of the exact value from df 30 on)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be ≥ 1, not {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def mean_ci(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample std and the 95% Student-t confidence interval of the mean of ``values``
    (``lo``/``hi``/``half_width`` are None for a single value: one seed gives no interval)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no values")
    n = len(vals)
    mean, std = mean_std(vals)
    half = t_975(n - 1) * std / math.sqrt(n) if n > 1 else None
    return {"n": n, "mean": mean, "std": std, "half_width": half,
            "lo": None if half is None else mean - half, "hi": None if half is None else mean + half}


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """``a − b`` per seed (``a[i]`` and ``b[i]`` from the same seed), its mean and 95% CI.

    ``noise`` is True when the interval contains 0 (the difference is inside the seed noise),
    None when there is no interval (one seed).
    """
    if len(a) != len(b):
        raise ValueError(f"paired values need the same seeds: {len(a)} against {len(b)}")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    out = mean_ci(diffs)
    out["diffs"] = diffs
    out["noise"] = None if out["lo"] is None else bool(out["lo"] <= 0.0 <= out["hi"])
    return out


def verdict(diff: dict[str, Any], threshold: float = 0.0, higher_is_better: bool = True) -> str:
    """A goal "difference better than ``threshold``" read from a :func:`paired_difference`:
    ``met`` when the whole 95% interval is on the good side, ``missed`` when it is all on the bad
    side, ``inside the seed noise`` when it contains the threshold; with one seed (no interval),
    ``met (one seed)`` or ``missed (one seed)`` by the point estimate."""
    sign = 1.0 if higher_is_better else -1.0
    if diff["lo"] is None:
        good = sign * (diff["mean"] - threshold) >= 0
        return "met (one seed)" if good else "missed (one seed)"
    worst = diff["lo"] if higher_is_better else diff["hi"]
    best = diff["hi"] if higher_is_better else diff["lo"]
    if sign * (worst - threshold) >= 0:
        return "met"
    if sign * (best - threshold) < 0:
        return "missed"
    return "inside the seed noise"


def fmt_difference(diff: dict[str, Any], scale: float = 1.0, digits: int = 2, noise_note: bool = True) -> str:
    """``+1.23 [−0.40, +2.86]`` (mean and 95% CI, times ``scale``), with ", inside the seed noise"
    when the interval contains 0."""
    text = f"{scale * diff['mean']:+.{digits}f}"
    if diff["lo"] is not None:
        text += f" [{scale * diff['lo']:+.{digits}f}, {scale * diff['hi']:+.{digits}f}]"
        if noise_note and diff["noise"]:
            text += ", inside the seed noise"
    return text.replace("-", "−")


def seeds_to_resolve(diff: dict[str, Any], limit: int = 1000) -> int | None:
    """Roughly how many seeds would give ``diff`` (a :func:`paired_difference`) an interval that
    excludes 0, were its mean and per-seed spread to stay as observed: the least ``n`` with
    ``t_975(n − 1) · std / √n < |mean|``. None when there is no spread to read (one seed), 0 when
    the mean is 0 (no number of seeds resolves it), or more than ``limit`` seeds would be needed."""
    mean, std = abs(diff["mean"]), diff.get("std") or 0.0
    if diff.get("lo") is None:
        return None
    if std == 0.0:
        return 2 if mean > 0 else 0
    if mean == 0.0:
        return 0
    for n in range(2, limit + 1):
        if t_975(n - 1) * std / math.sqrt(n) < mean:
            return n
    return None
