"""Report statistics against hand-computed values and scipy, with a planted effect and a null."""

import math

import numpy as np
import pytest
from scipy import stats

from tqlab.report.stats import describe, friedman, holm, paired_difference, row_mean, unit_means


def test_describe_matches_a_hand_computed_example():
    d = describe([1.0, 2.0, 3.0, 4.0, float("nan")])
    sd = math.sqrt(5 / 3)  # sum of squared deviations 5, n − 1 = 3
    half = 3.182446305284263 * sd / 2  # t(0.975, 3) · SEM
    assert d["n"] == 4 and d["mean"] == 2.5
    assert d["sd"] == pytest.approx(sd) and d["sem"] == pytest.approx(sd / 2)
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((2.5 - half, 2.5 + half))


def test_holm_matches_a_hand_computed_example():
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 → max(0.06, 0.04) = 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.9, 0.8]) == [1.0, 1.0]


def test_a_planted_paired_difference_is_found_and_a_null_is_not():
    rng = np.random.default_rng(0)
    a = rng.normal(size=300)
    planted = paired_difference(a, a + 0.3 + rng.normal(scale=0.2, size=300))
    assert planted["p"] < 1e-10 and planted["ci_low"] < 0.3 < planted["ci_high"] and planted["ci_low"] > 0
    null = paired_difference(a, a + rng.normal(scale=0.2, size=300))
    assert null["p"] > 0.05 and null["ci_low"] < 0 < null["ci_high"]


def test_friedman_agrees_with_scipy_and_detects_a_shift():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(60, 1))
    cols = [base[:, 0] + rng.normal(scale=0.1, size=60) + shift for shift in (0.0, 0.0, 0.2)]
    assert friedman(cols) == pytest.approx(stats.friedmanchisquare(*cols).pvalue)
    assert friedman(cols) < 1e-6
    assert math.isnan(friedman(cols[:2]))


def test_windows_that_score_different_token_counts_are_weighted_by_them():
    """A perplexity window's metrics are means over its scored tokens: across windows they stay per token
    (255 tokens at Δ 0.1 and 10 at Δ 1.0 are 0.134 per token, not 0.55), NaN rows dropped; rows without
    `tokens` (other tasks) count one each."""
    rows = [
        {"doc": "a", "nll_increase": 0.1, "tokens": 255},
        {"doc": "a", "nll_increase": 1.0, "tokens": 10},
        {"doc": "b", "nll_increase": float("nan"), "tokens": 5},
    ]
    want = (0.1 * 255 + 1.0 * 10) / 265
    assert row_mean(rows, "nll_increase") == pytest.approx(want)
    means = unit_means(rows, "nll_increase", ("doc",))
    assert means[("a",)] == pytest.approx(want) and math.isnan(means[("b",)])
    assert row_mean([{"found": 1.0}, {"found": 0.0}, {"found": 0.0}], "found") == pytest.approx(1 / 3)


def test_a_metric_that_is_not_per_token_is_a_plain_mean_over_windows():
    rows = [{"cache_bytes_per_token": 10.0, "tokens": 255}, {"cache_bytes_per_token": 20.0, "tokens": 10}]
    assert row_mean(rows, "cache_bytes_per_token") == pytest.approx(15.0)
