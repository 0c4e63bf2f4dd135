"""Attention that reads the cache's codes, registered with transformers as `attn_implementation="tqlab"`.

`TurboQuantLayer.update` stores the new keys and values as codes and hands back the new tokens' exact
states marked with the layer that holds the codes. This function then computes, per KV head, in fp32:
scores from the key codes (`codec.score`: the rotated query against centroids × norms; Prod adds its QJL
term), softmax under the causal / sliding / padding mask, and the values accumulated in the rotated domain
(centroids × norms) with one inverse rotation per query head — or, for codecs without a rotated domain
(baselines, fractional bits), over their decoded values. This PyTorch path is the reference that GPU kernels
must match. Without a TurboQuant layer (no cache, or an exact layer) it is exactly transformers' SDPA.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..quant import Centered
from ..registry import SIDES
from . import fused

NAME = "tqlab"
LAYER_MARK = "_tqlab_layer"  # attribute of the key tensor `update` returns: the layer holding its codes


def _mask(attention_mask, batch: int, q_len: int, kv_len: int, window: int | None, device) -> torch.Tensor:
    """[batch, q_len, kv_len] booleans (True: attend). transformers gives a boolean 4D mask, or None when
    plain causal attention is meant; queries are the last q_len of kv_len positions."""
    if attention_mask is not None:
        return attention_mask[:, 0, :, -kv_len:].expand(batch, q_len, kv_len)
    position = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    key = torch.arange(kv_len, device=device)[None, :]
    allowed = key <= position
    if window:
        allowed &= position - key < window
    return allowed.expand(batch, q_len, kv_len)


def _scores(codec, code, exact: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """⟨q, k⟩ for q [B, n, d] against the layer's keys: from codes, or exact keys [B, T, d]."""
    if codec is None:
        return q @ exact.float().transpose(-1, -2)
    return codec.score(q, code)


def _weighted_values(codec, code, exact: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor:
    """Σ_t p_t v_t for p [B, n, T]: in the rotated domain where the codec has one (one inverse rotation)."""
    if codec is None:
        return p @ exact.float()
    if isinstance(codec, Centered):  # Σ p (x − μ)^ + (Σ p) μ: the mean added once
        return _weighted_values(codec.inner, code, None, p) + p.sum(-1, keepdim=True) * codec.mean
    if hasattr(codec, "rotated_centroids"):
        return codec.rotation.inverse(p @ codec.rotated_centroids(code))
    return p @ codec.dequantize(code)


def attend(layer, query: torch.Tensor, mask: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of query [B, Hq, Tq, d] over everything `layer` holds, in token order (exact sinks, codes,
    exact recent tokens); returns [B, Hq, Tq, d] in fp32."""
    batch, n_q_heads, q_len, dim = query.shape
    group = n_q_heads // layer.num_kv_heads
    out = torch.empty(batch, n_q_heads, q_len, dim, dtype=torch.float32, device=query.device)
    for h in range(layer.num_kv_heads):
        heads = slice(h * group, (h + 1) * group)
        q = query[:, heads].float().reshape(batch, group * q_len, dim)
        logits = torch.cat([_scores(*part, q) for part in layer.segments("key", h)], dim=-1)
        logits = logits.view(batch, group, q_len, layer.held) * scaling
        logits = logits.masked_fill(~mask[:, None], float("-inf"))
        p = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a query that may see nothing (padding) gets 0
        p = p.view(batch, group * q_len, layer.held)
        o, start = 0, 0
        for codec, code, exact in layer.segments("value", h):
            n = exact.shape[-2] if code is None else code.shape[1]
            o = o + _weighted_values(codec, code, exact, p[..., start : start + n])
            start += n
        out[:, heads] = o.view(batch, group, q_len, dim)
    return out


def _exact_only(module, query, layer, attention_mask, window, dropout, scaling, **kwargs):
    """SDPA over a layer that holds no codes yet (a prompt under prefill_exact, or one inside the exact
    window): the same sums as `attend`, without its [queries × keys] fp32 matrix."""
    keys = torch.cat([t for t in layer.exact_tokens("key") if t is not None], dim=-2)
    values = torch.cat([t for t in layer.exact_tokens("value") if t is not None], dim=-2)
    batch, _, q_len, _ = query.shape
    if attention_mask is not None:
        mask = attention_mask[..., -layer.held :]
    elif q_len == layer.held and not window:
        mask = None  # SDPA's own causal mask is the same
    else:
        mask = _mask(None, batch, q_len, layer.held, window, query.device)[:, None]
    return sdpa_attention_forward(module, query, keys, values, mask, dropout, scaling, **kwargs)


def tqlab_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function signature; returns ([B, Tq, Hq, d] in the query's dtype, None)."""
    layer = getattr(key, LAYER_MARK, None)
    if layer is None:  # no TurboQuant layer behind these keys: exactly SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    layer.awaiting_attention = False
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError(
            "tqlab attention does not model logit softcapping or attention sinks of the model yet"
        )
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if not any(layer.coded_tokens(side) for side in SIDES):
        return _exact_only(module, query, layer, attention_mask, window, dropout, scaling, **kwargs)
    out = None
    if layer.packed is not None:
        out = fused.attend_packed(layer, query, attention_mask, scaling, window)
    if out is None:
        mask = _mask(attention_mask, query.shape[0], query.shape[2], layer.held, window, query.device)
        out = attend(layer, query, mask, scaling)
    return out.transpose(1, 2).to(query.dtype).contiguous(), None


def register() -> None:
    """Make `attn_implementation="tqlab"` available: the attention function and, under the same name, SDPA's
    mask function (without a registered mask function the padding mask would be silently dropped)."""
    AttentionInterface.register(NAME, tqlab_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
