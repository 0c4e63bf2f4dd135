"""What a fitted rotation minimises, for one (sequence, layer, KV head) block.

The codec sits in the loop: vectors are rotated, quantized with the codec's own codebook, and rotated back.
In the backward pass the chosen codes are held fixed — the quantizer's derivative almost everywhere. (A
straight-through estimator would pass the rotation's own error back through itself; since rotations
preserve norms, the reconstruction-error gradient would then vanish.)
"""

from __future__ import annotations

import torch

from ..metrics.attention import causal_mask
from ..quant import TurboQuantMSE

OBJECTIVES = ("mse", "logits", "attention")


def reconstruct(codec: TurboQuantMSE, x: torch.Tensor) -> torch.Tensor:
    """‖x‖ · Πᵀ c(Π x/‖x‖) with the codes c held constant for autograd."""
    norms = x.norm(dim=-1, keepdim=True)
    y = codec.rotation.apply(x / norms.clamp_min(torch.finfo(x.dtype).tiny))
    with torch.no_grad():
        codes = codec.decode_rotated(codec.encode_rotated(y))
    return codec.rotation.inverse(codes) * norms


def key_loss(
    objective: str, codec: TurboQuantMSE, q: torch.Tensor, k: torch.Tensor, scaling: float, window: int = 0
) -> torch.Tensor:
    """q [G, T, D] (real queries), k [T, D]: a scale-free loss (relative error or KL); `window` is the
    layer's sliding window (0: none)."""
    k_hat = reconstruct(codec, k)
    if objective == "mse":
        return (k_hat - k).pow(2).sum() / k.pow(2).sum()
    mask = causal_mask(q.shape[-2], k.shape[-2], q.device, window)
    exact, approx = (q @ k.T) * scaling, (q @ k_hat.T) * scaling
    if objective == "logits":
        return (approx - exact).pow(2)[..., mask].sum() / exact.pow(2)[..., mask].sum()
    log_p = exact.masked_fill(~mask, float("-inf")).log_softmax(-1)
    log_q = approx.masked_fill(~mask, float("-inf")).log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).masked_fill(~mask, 0.0).sum(-1).mean()


def value_loss(
    objective: str, codec: TurboQuantMSE, q, k, v, scaling: float, window: int = 0
) -> torch.Tensor:
    """Relative error of the values (mse) or of the attention output they produce (logits, attention)."""
    v_hat = reconstruct(codec, v)
    if objective == "mse":
        return (v_hat - v).pow(2).sum() / v.pow(2).sum()
    mask = causal_mask(q.shape[-2], k.shape[-2], q.device, window)
    probs = ((q @ k.T) * scaling).masked_fill(~mask, float("-inf")).softmax(-1)
    return (probs @ (v_hat - v)).pow(2).sum() / (probs @ v).pow(2).sum()
