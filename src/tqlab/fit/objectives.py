"""What a fitted rotation minimises, for one (sequence, layer, KV head) block.

The codec sits in the loop: vectors are rotated, quantized with the codec's own codebook, and rotated back.

- mse: the hard quantizer, codes held fixed in the backward pass. Its gradient is the true one: a code
  switches where a coordinate is equidistant from two centroids, so the loss is continuous there.
- logits, attention: a code switch makes these losses jump (finite differences measured −55× to +988× the
  codes-fixed gradient on SmolLM2 keys), so they are trained through a soft quantizer — each coordinate
  decoded as the softmax(−(y − c_k)²/τ)-weighted mean of the centroids, τ = `temperature` × the codebook's
  mean squared spacing — whose loss is smooth and whose gradient is the true gradient of that loss (tested
  against finite differences). Validation always measures the hard quantizer: the loss that is deployed.
"""

from __future__ import annotations

import torch

from ..metrics.attention import causal_mask
from ..quant import TurboQuantMSE

OBJECTIVES = ("mse", "logits", "attention")


def reconstruct(codec: TurboQuantMSE, x: torch.Tensor, temperature: float = 0.0) -> torch.Tensor:
    """‖x‖ · Πᵀ c(Π x/‖x‖): hard codes held constant for autograd (temperature 0), or the soft quantizer."""
    norms = x.norm(dim=-1, keepdim=True)
    y = codec.rotation.apply(x / norms.clamp_min(torch.finfo(x.dtype).tiny))
    if temperature > 0:
        c = codec.centroids.to(y.dtype)
        tau = temperature * (c[1:] - c[:-1]).pow(2).mean()
        weights = (-(y.unsqueeze(-1) - c).pow(2) / tau).softmax(-1)
        codes = weights @ c
    else:
        with torch.no_grad():
            codes = codec.decode_rotated(codec.encode_rotated(y)).to(y.dtype)
    return codec.rotation.inverse(codes) * norms


def _reconstruct_around(codec, x, temperature: float, mean) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂, what the codec codes): x − mean coded and the mean added back, or x itself."""
    coded = x if mean is None else x - mean.to(x)
    x_hat = reconstruct(codec, coded, temperature)
    return (x_hat if mean is None else x_hat + mean.to(x)), coded


def key_loss(
    objective: str,
    codec: TurboQuantMSE,
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float,
    window: int = 0,
    temperature: float = 0.0,
    mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [G, T, D] (real queries), k [T, D]: a scale-free loss (relative error or KL); `window` is the
    layer's sliding window (0: none); temperature > 0 trains logits/attention through the soft quantizer;
    `mean`: the codec codes k − mean (codec.center), and mse is relative to the energy it codes."""
    k_hat, coded = _reconstruct_around(codec, k, 0.0 if objective == "mse" else temperature, mean)
    if objective == "mse":
        return (k_hat - k).pow(2).sum() / coded.pow(2).sum()
    mask = causal_mask(q.shape[-2], k.shape[-2], q.device, window)
    exact, approx = (q @ k.T) * scaling, (q @ k_hat.T) * scaling
    if objective == "logits":
        return (approx - exact).pow(2)[..., mask].sum() / exact.pow(2)[..., mask].sum()
    log_p = exact.masked_fill(~mask, float("-inf")).log_softmax(-1)
    log_q = approx.masked_fill(~mask, float("-inf")).log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).masked_fill(~mask, 0.0).sum(-1).mean()


def value_loss(
    objective: str,
    codec: TurboQuantMSE,
    q,
    k,
    v,
    scaling: float,
    window: int = 0,
    temperature: float = 0.0,
    mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """Relative error of the values (mse) or of the attention output they produce (logits, attention)."""
    v_hat, coded = _reconstruct_around(codec, v, 0.0 if objective == "mse" else temperature, mean)
    if objective == "mse":
        return (v_hat - v).pow(2).sum() / coded.pow(2).sum()
    mask = causal_mask(q.shape[-2], k.shape[-2], q.device, window)
    probs = ((q @ k.T) * scaling).masked_fill(~mask, float("-inf")).softmax(-1)
    return (probs @ (v_hat - v)).pow(2).sum() / (probs @ v).pow(2).sum()
