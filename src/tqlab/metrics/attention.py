"""Attention-quality metrics under the causal mask, per query, in float64.

Inputs for one block: exact and approximate *scaled* logits [..., T_q, T_k] (query t sees keys 0..t),
exact and approximate attention outputs [..., T_q, D]. Each function returns one value per query row
(NaN where the metric is undefined for that row, e.g. a rank correlation over a single key), so a block's
value, a layer's value and the overall value are all means over the same per-query numbers.
"""

from __future__ import annotations

import torch


def causal_mask(t_q: int, t_k: int, device=None, window: int = 0) -> torch.Tensor:
    """True where query i may attend key j (the last t_q queries of a t_k-token sequence); with a sliding
    `window` > 0, only the `window` most recent keys (the query's own included), as transformers does."""
    offset = t_k - t_q
    mask = torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(offset)
    if window:
        mask &= ~torch.ones_like(mask).tril(offset - window)
    return mask


def _masked(x: torch.Tensor, mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    return x.double().masked_fill(~mask, fill)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row cosines in [−1, 1]; NaN (undefined, and counted as such) where either row is all zero, e.g. the
    logits of all-zero keys or the ranks of a constant row."""
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    return ((a * b).sum(-1) / norms.masked_fill(norms == 0, float("nan"))).clamp(-1, 1)


def attention_probs(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _masked(logits, mask, float("-inf")).softmax(-1)


def logit_cosine(exact: torch.Tensor, approx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cosine between the exact and approximate logit vectors of each query over its visible keys
    (rows with fewer than 2 keys: NaN). Clamped to [−1, 1] against round-off."""
    return _require(cosine(_masked(exact, mask), _masked(approx, mask)), mask, 2)


def logit_correlation(exact: torch.Tensor, approx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each query's exact and approximate logits over its visible keys: the cosine
    of the *centred* logits, blind to the per-query shift that softmax ignores (rows with < 2 keys: NaN)."""
    n = mask.sum(-1, keepdim=True).double()
    a, b = _masked(exact, mask), _masked(approx, mask)
    a = (a - a.sum(-1, keepdim=True) / n).masked_fill(~mask, 0.0)
    b = (b - b.sum(-1, keepdim=True) / n).masked_fill(~mask, 0.0)
    return _require(cosine(a, b), mask, 2)


def relative_mse(exact: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    """‖x − x̂‖² / ‖x‖² per vector (zero vectors: NaN, the ratio is undefined)."""
    a, b = exact.double(), approx.double()
    energy = (a * a).sum(-1)
    return ((b - a) ** 2).sum(-1) / energy.masked_fill(energy == 0, float("nan"))


def output_cosine(exact_out: torch.Tensor, approx_out: torch.Tensor) -> torch.Tensor:
    return cosine(exact_out.double(), approx_out.double())


def output_relative_error(exact_out: torch.Tensor, approx_out: torch.Tensor) -> torch.Tensor:
    a, b = exact_out.double(), approx_out.double()
    norm = a.norm(dim=-1)
    return (b - a).norm(dim=-1) / norm.masked_fill(norm == 0, float("nan"))


def attention_kl(exact: torch.Tensor, approx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ p̂) of the attention distributions of each query (nats), through log_softmax."""
    log_p = _masked(exact, mask, float("-inf")).log_softmax(-1)
    log_q = _masked(approx, mask, float("-inf")).log_softmax(-1)
    terms = log_p.exp() * (log_p - log_q)
    return terms.masked_fill(~mask, 0.0).sum(-1)


def top1_agreement(exact: torch.Tensor, approx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    a = _masked(exact, mask, float("-inf")).argmax(-1)
    b = _masked(approx, mask, float("-inf")).argmax(-1)
    return (a == b).double()


def topk_overlap(exact: torch.Tensor, approx: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """|top-k(exact) ∩ top-k(approx)| / k as sets of key positions (rows with fewer than k keys: NaN)."""
    k_eff = min(k, mask.shape[-1])
    a = _masked(exact, mask, float("-inf")).topk(k_eff, dim=-1).indices
    b = _masked(approx, mask, float("-inf")).topk(k_eff, dim=-1).indices
    hits = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).sum(-1).double() / k
    return _require(hits, mask, k)


def _ranks(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean rank) of the visible entries of each row; masked entries get 0."""
    filled = _masked(x, mask, float("inf"))  # masked entries sort last and are dropped below
    order = filled.argsort(-1)
    sorted_vals = filled.gather(-1, order)
    pos = torch.arange(x.shape[-1], device=x.device, dtype=torch.float64).expand_as(filled)
    # mean position over each run of equal values
    new_run = torch.ones_like(sorted_vals, dtype=torch.bool)
    new_run[..., 1:] = sorted_vals[..., 1:] != sorted_vals[..., :-1]
    run_id = new_run.long().cumsum(-1)
    run_sum = torch.zeros_like(pos).scatter_add_(-1, run_id - 1, pos)
    run_len = torch.zeros_like(pos).scatter_add_(-1, run_id - 1, torch.ones_like(pos))
    avg = (run_sum / run_len.clamp_min(1)).gather(-1, run_id - 1)
    ranks = torch.empty_like(avg).scatter_(-1, order, avg)
    return ranks.masked_fill(~mask, 0.0)


def spearman(exact: torch.Tensor, approx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation per query over its visible keys: the Pearson correlation of *centred*
    ranks, with tied values sharing their mean rank (rows with fewer than 2 keys: NaN)."""
    n = mask.sum(-1, keepdim=True).double()
    ra, rb = _ranks(exact, mask), _ranks(approx, mask)
    ra = (ra - ra.sum(-1, keepdim=True) / n).masked_fill(~mask, 0.0)
    rb = (rb - rb.sum(-1, keepdim=True) / n).masked_fill(~mask, 0.0)
    return _require(cosine(ra, rb), mask, 2)


def _require(values: torch.Tensor, mask: torch.Tensor, min_keys: int) -> torch.Tensor:
    visible = mask.sum(-1).expand_as(values)
    return values.masked_fill(visible < min_keys, float("nan"))


def per_query_metrics(
    exact_logits: torch.Tensor,
    approx_logits: torch.Tensor,
    values: torch.Tensor,
    approx_values: torch.Tensor,
    top_k: int = 8,
    window: int = 0,
) -> dict[str, torch.Tensor]:
    """Every metric for one block: logits [..., T, T] (scaled), values [T, D] exact and decoded; `window`
    is the layer's sliding window (0: none)."""
    mask = causal_mask(exact_logits.shape[-2], exact_logits.shape[-1], exact_logits.device, window)
    out_exact = attention_probs(exact_logits, mask) @ values.double()
    out_approx = attention_probs(approx_logits, mask) @ approx_values.double()
    return {
        "logit_cosine": logit_cosine(exact_logits, approx_logits, mask),
        "logit_correlation": logit_correlation(exact_logits, approx_logits, mask),
        "output_cosine": output_cosine(out_exact, out_approx),
        "output_rel_error": output_relative_error(out_exact, out_approx),
        "attention_kl": attention_kl(exact_logits, approx_logits, mask),
        "top1_agreement": top1_agreement(exact_logits, approx_logits, mask),
        f"top{top_k}_overlap": topk_overlap(exact_logits, approx_logits, mask, top_k),
        "spearman": spearman(exact_logits, approx_logits, mask),
    }
