"""Metrics against per-query loops written with numpy / scipy, and batch-splitting invariance."""

import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from tqlab.metrics.attention import causal_mask, per_query_metrics
from tqlab.metrics.torch_metrics import QueryMean, StoredBits


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def loop_metrics(s, s_hat, v, v_hat, k):
    """Per-query metrics by brute force: row t sees keys 0..t."""
    out = {
        n: []
        for n in (
            "logit_cosine",
            "logit_correlation",
            "output_cosine",
            "output_rel_error",
            "attention_kl",
            "top1_agreement",
            "topk",
            "spearman",
        )
    }
    for t in range(s.shape[0]):
        a, b = s[t, : t + 1], s_hat[t, : t + 1]
        p, q = softmax(a), softmax(b)
        o, o_hat = p @ v[: t + 1], q @ v_hat[: t + 1]
        out["logit_cosine"].append(a @ b / np.linalg.norm(a) / np.linalg.norm(b) if t >= 1 else math.nan)
        out["logit_correlation"].append(stats.pearsonr(a, b).statistic if t >= 1 else math.nan)
        out["output_cosine"].append(o @ o_hat / np.linalg.norm(o) / np.linalg.norm(o_hat))
        out["output_rel_error"].append(np.linalg.norm(o_hat - o) / np.linalg.norm(o))
        out["attention_kl"].append(special.rel_entr(p, q).sum())
        out["top1_agreement"].append(float(a.argmax() == b.argmax()))
        top = set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k]) if t + 1 >= k else None
        out["topk"].append(len(top) / k if top is not None else math.nan)
        out["spearman"].append(stats.spearmanr(a, b).statistic if t >= 1 else math.nan)
    return {n: np.array(v) for n, v in out.items()}


def test_every_metric_matches_a_per_query_loop():
    g = torch.Generator().manual_seed(0)
    t, d, k = 12, 8, 4
    s = torch.randn(t, t, generator=g, dtype=torch.float64) * 2
    s_hat = s + 0.5 * torch.randn(t, t, generator=g, dtype=torch.float64)
    s_hat[5, :3] = s_hat[5, 3]  # ties for the rank correlation
    v = torch.randn(t, d, generator=g, dtype=torch.float64)
    v_hat = v + 0.1 * torch.randn(t, d, generator=g, dtype=torch.float64)
    got = per_query_metrics(s, s_hat, v, v_hat, top_k=k)
    want = loop_metrics(s.numpy(), s_hat.numpy(), v.numpy(), v_hat.numpy(), k)
    for name, key in [*((n, n) for n in want if n != "topk"), (f"top{k}_overlap", "topk")]:
        np.testing.assert_allclose(got[name].numpy(), want[key], rtol=1e-10, atol=1e-12, err_msg=name)


def test_a_perfect_reconstruction_scores_exactly_one_and_zero():
    s = torch.randn(3, 20, 20, dtype=torch.float64) * 30  # large logits: where bf16 metrics drift above 1
    v = torch.randn(20, 16, dtype=torch.float64)
    got = per_query_metrics(s, s.clone(), v, v.clone())
    for name in ("logit_cosine", "logit_correlation", "output_cosine", "spearman", "top1_agreement"):
        values = got[name][~got[name].isnan()]
        assert (values <= 1).all() and torch.allclose(values, torch.ones_like(values))
    assert got["attention_kl"].abs().max() < 1e-12 and got["output_rel_error"].max() < 1e-12


def test_causal_mask_for_the_last_queries_of_a_sequence():
    m = causal_mask(2, 4)
    assert m.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_query_means_and_bits_add_up_over_batches_like_one_pass():
    values = torch.randn(1000, dtype=torch.float64)
    values[::7] = float("nan")
    one, split = QueryMean(), QueryMean()
    one.update(values)
    for chunk in values.split(137):
        split.update(chunk)
    assert float(one.compute()) == pytest.approx(float(split.compute()), abs=1e-12)
    assert float(one.compute()) == pytest.approx(float(values[~values.isnan()].mean()), abs=1e-12)
    bits = StoredBits()
    bits.update(36, 128)
    bits.update(36, 128)
    assert float(bits.compute()) == 36 * 8 / 128


def test_sliding_window_mask_matches_a_loop():
    t_q, t_k, window = 5, 9, 3
    got = causal_mask(t_q, t_k, window=window)
    for i in range(t_q):
        position = t_k - t_q + i  # absolute position of query i
        for j in range(t_k):
            assert bool(got[i, j]) == (j <= position and position - j < window)


def test_logit_correlation_ignores_a_per_query_shift_that_logit_cosine_does_not():
    s = torch.randn(10, 10, dtype=torch.float64)
    shifted = s + 5 * torch.randn(10, 1, dtype=torch.float64)  # softmax is unchanged by this
    got = per_query_metrics(s, shifted, torch.randn(10, 4, dtype=torch.float64), torch.zeros(10, 4))
    corr, cos = got["logit_correlation"][1:], got["logit_cosine"][1:]
    assert torch.allclose(corr, torch.ones_like(corr)) and (cos < 0.999).any()


def test_relative_mse_against_a_loop_and_undefined_for_zero_vectors():
    from tqlab.metrics.attention import relative_mse

    x, x_hat = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    x[2] = 0
    got = relative_mse(x, x_hat)
    for i in range(6):
        want = (
            np.sum((x_hat[i].numpy() - x[i].numpy()) ** 2) / np.sum(x[i].numpy() ** 2) if i != 2 else math.nan
        )
        np.testing.assert_allclose(float(got[i]), want, rtol=1e-12)


def test_metrics_of_all_zero_keys_are_undefined_and_counted_not_zero():
    zeros = torch.zeros(6, 6, dtype=torch.float64)  # logits of all-zero keys, exact and decoded
    got = per_query_metrics(zeros, zeros.clone(), torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4))
    for name in ("logit_cosine", "logit_correlation", "spearman"):
        assert got[name].isnan().all(), name  # not 0: a cosine of zero vectors is undefined
    mean = QueryMean()
    mean.update(got["logit_cosine"])
    mean.compute()
    assert mean.undefined_total == 6
