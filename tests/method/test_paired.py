"""The statistics over seeds (incr_ray.method.paired): the t quantiles against a numerical
integral, the interval of a mean, paired differences, verdicts, and the seeds that would resolve a
difference."""

from __future__ import annotations

import math

import pytest

from incr_ray.method import paired


# ---------------------------------------------------------------------------------------------
# Student t


def _t_cdf(x: float, df: int, n: int = 4000) -> float:
    """P(T ≤ x) for x ≥ 0 by Simpson's rule on the density."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def pdf(t: float) -> float:
        return c * (1 + t * t / df) ** (-(df + 1) / 2)

    h = x / n
    s = pdf(0.0) + pdf(x) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, n))
    return 0.5 + s * h / 3


@pytest.mark.parametrize("df", [*range(1, 31), 31, 40, 60, 120, 1000])
def test_t_quantile_is_the_975th_percentile(df):
    assert _t_cdf(paired.t_975(df), df) == pytest.approx(0.975, abs=2e-5)


def test_t_quantile_refuses_zero_degrees_of_freedom():
    with pytest.raises(ValueError):
        paired.t_975(0)


# ---------------------------------------------------------------------------------------------
# Mean, interval, paired differences, verdicts


def test_mean_ci_matches_the_textbook_formula():
    vals = [0.70, 0.72, 0.75, 0.71, 0.74]
    ci = paired.mean_ci(vals)
    mean = sum(vals) / 5
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / 4)
    assert ci["n"] == 5 and ci["mean"] == pytest.approx(mean) and ci["std"] == pytest.approx(sd)
    assert ci["half_width"] == pytest.approx(2.7764 * sd / math.sqrt(5))
    assert ci["lo"] == pytest.approx(mean - ci["half_width"]) and ci["hi"] == pytest.approx(mean + ci["half_width"])


def test_one_value_has_no_interval():
    ci = paired.mean_ci([0.5])
    assert ci["mean"] == 0.5 and ci["std"] == 0.0
    assert ci["lo"] is None and ci["hi"] is None and ci["half_width"] is None


def test_paired_difference_is_the_mean_of_per_seed_differences():
    a, b = [0.70, 0.80, 0.60], [0.68, 0.77, 0.59]
    d = paired.paired_difference(a, b)
    assert d["diffs"] == pytest.approx([0.02, 0.03, 0.01])
    assert d["mean"] == pytest.approx(0.02)
    # sd of (0.02, 0.03, 0.01) is 0.01: half width t(2) · 0.01 / √3
    assert d["half_width"] == pytest.approx(4.3027 * 0.01 / math.sqrt(3))
    assert d["noise"] is True  # 0.02 ± 0.0248: three seeds leave +2 points inside the noise


def test_noise_means_the_interval_contains_zero():
    tight = paired.paired_difference([0.72, 0.73, 0.74, 0.75], [0.70, 0.71, 0.72, 0.73])  # +2 points every seed
    assert tight["std"] == pytest.approx(0.0, abs=1e-12) and tight["noise"] is False
    loose = paired.paired_difference([0.72, 0.69, 0.75], [0.70, 0.71, 0.72])  # +2, −2, +3
    assert loose["lo"] < 0 < loose["hi"] and loose["noise"] is True
    assert paired.paired_difference([0.7], [0.6])["noise"] is None


def test_paired_difference_needs_the_same_seeds():
    with pytest.raises(ValueError):
        paired.paired_difference([0.1, 0.2], [0.1])


def test_verdict_reads_the_whole_interval():
    up = {"mean": 0.03, "lo": 0.01, "hi": 0.05}
    straddles = {"mean": 0.01, "lo": -0.01, "hi": 0.03}
    down = {"mean": -0.03, "lo": -0.05, "hi": -0.01}
    assert paired.verdict(up) == "met"
    assert paired.verdict(straddles) == "inside the seed noise"
    assert paired.verdict(down) == "missed"
    # Lower is better (NLL, ECE): the upper end must be below the threshold.
    assert paired.verdict(down, higher_is_better=False) == "met"
    assert paired.verdict(up, higher_is_better=False) == "missed"
    # "Within 1 point" is a threshold of −0.01 on the difference.
    assert paired.verdict({"mean": -0.005, "lo": -0.008, "hi": -0.002}, -0.01) == "met"
    assert paired.verdict({"mean": -0.005, "lo": -0.02, "hi": 0.01}, -0.01) == "inside the seed noise"
    assert paired.verdict({"mean": -0.05, "lo": -0.08, "hi": -0.02}, -0.01) == "missed"
    one = {"mean": -0.02, "lo": None, "hi": None}
    assert paired.verdict(one, -0.01) == "missed (one seed)"
    assert paired.verdict(one, -0.03) == "met (one seed)"


def test_fmt_difference_says_when_zero_is_inside():
    d = paired.paired_difference([0.72, 0.69, 0.75], [0.70, 0.71, 0.72])
    text = paired.fmt_difference(d, 100)
    assert text.startswith("+1.00 [−") and text.endswith(", inside the seed noise")
    assert "inside" not in paired.fmt_difference(paired.paired_difference([0.8, 0.8], [0.7, 0.7]), 100)
    assert paired.fmt_difference(paired.paired_difference([0.7], [0.75]), 100) == "−5.00"


def test_seeds_to_resolve_is_the_least_n_whose_interval_excludes_zero():
    d = paired.paired_difference([0.72, 0.69, 0.75], [0.70, 0.71, 0.72])  # +2, −2, +3: mean 1, sd ≈ 2.65 points
    n = paired.seeds_to_resolve(d)
    assert n is not None and n > 3
    assert paired.t_975(n - 1) * d["std"] / math.sqrt(n) < abs(d["mean"])
    assert paired.t_975(n - 2) * d["std"] / math.sqrt(n - 1) >= abs(d["mean"])


def test_seeds_to_resolve_edge_cases():
    assert paired.seeds_to_resolve(paired.paired_difference([0.7], [0.6])) is None  # one seed: no spread
    assert paired.seeds_to_resolve(paired.paired_difference([0.8, 0.8], [0.7, 0.7])) == 2  # no spread at all
    assert paired.seeds_to_resolve(paired.paired_difference([0.7, 0.8], [0.7, 0.8])) == 0  # nothing to resolve
    assert paired.seeds_to_resolve(paired.paired_difference([0.701, 0.5], [0.7, 0.7]), limit=10) is None
