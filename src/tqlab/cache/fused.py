"""Attention over a layer's packed codes with the Triton decode kernel, merged with its exact tokens.

The same sums as the reference (`attention.attend`), computed in two parts: the codes by
`kernels.decode_attention` (queries rotated once per KV head, output rotated back once), the exact sinks and
recent tokens in fp32, joined by one softmax over the codes' log-sum-exp and the exact logits. A one-token
step rotates its query in one launch (`kernels.step`), and with no exact token, or one and no padding, rotates
back (and joins it) in one more; otherwise the end is PyTorch's. A
query block of more rows than the kernel holds (a prompt, under the all-quantized protocol) is cut into
chunks of query tokens, each a kernel call that stops at its own last key. Calls the kernel cannot serve
return None and the caller takes the reference path: a sliding window shorter than what the layer holds, or
a mask that is not causal attention after left padding (checked once per mask tensor).
"""

from __future__ import annotations

import torch

from .packed import stored

STARTS = "_tqlab_starts"  # attribute of a mask tensor: its per-row padding, or False when not left padding
EXACT_LOGITS = 1 << 24  # most fp32 logits over exact tokens held at once (64 MiB)


def _left_padding(attention_mask, batch: int, q_len: int, held: int) -> torch.Tensor | None:
    """Per sequence the number of leading keys no query sees, if the mask is exactly causal attention after
    that many padding keys (else None). transformers passes one mask to every layer of a kind, so the check
    (one host sync) runs once per forward call."""
    if attention_mask.dtype != torch.bool or attention_mask.shape[0] != batch:
        return None
    known = getattr(attention_mask, STARTS, None)
    if known is None:
        mask = attention_mask[:, 0, :, -held:]
        starts = (~mask[:, -1]).cumprod(-1).sum(-1)  # leading keys the last query does not see
        key = torch.arange(held, device=mask.device)
        position = torch.arange(held - q_len, held, device=mask.device)
        causal = (key[None, None, :] <= position[None, :, None]) & (
            key[None, None, :] >= starts[:, None, None]
        )
        known = starts.to(torch.int32) if torch.equal(causal, mask) else False
        setattr(attention_mask, STARTS, known)
    return None if known is False else known


def attend_packed(layer, query: torch.Tensor, attention_mask, scaling: float, window) -> torch.Tensor | None:
    """Attention of query [B, Hq, Tq, d] over what `layer` holds, [B, Hq, Tq, d] computed in fp32 (a decode
    step with no exact token, or one and no padding, stored in the query's dtype already, `_stored`; the rest
    fp32); None: use the reference."""
    from ..kernels import step
    from ..kernels.decode import MAX_ROWS, decode_attention

    batch, q_heads, q_len, dim = query.shape
    kv_heads, held = layer.num_kv_heads, layer.held
    group = q_heads // kv_heads
    if layer.static:
        return _attend_static(layer, query, attention_mask, scaling)
    if (window and window < held) or group > MAX_ROWS:
        return None
    starts = None  # no mask: causal attention without padding
    if attention_mask is not None:
        starts = _left_padding(attention_mask, batch, q_len, held)
        if starts is None:
            return None
    sinks, recent = layer.exact_tokens("key")
    n_sink = 0 if sinks is None else sinks.shape[-2]
    n_recent = 0 if recent is None else recent.shape[-2]
    coded = held - n_sink - n_recent

    # A decode step's ends in one launch each (packed codes have d a power of two ≥ 32, as they need): the
    # query rotated in, and the output rotated back with at most one exact token, which every query sees, joined
    exact = n_sink + n_recent
    ends_fused = q_len == 1 and (exact == 0 or (exact == 1 and starts is None))
    if q_len == 1:
        q_rot = step.rotate_queries(query, layer.rotations["key"])
    else:
        q_rot = _rotate(query, layer.rotations["key"])
    keys, values = layer.packed["key"].views(), layer.packed["value"].views()
    code_starts = None if starts is None else (starts - n_sink).clamp(0, coded)
    outs, lses = [], []
    rows = max(1, MAX_ROWS // group)
    for first in range(0, q_len, rows):
        n = min(rows, q_len - first)
        # keys up to this chunk's last query: code positions < coded + n_recent − (q_len − first − n)
        end = coded + n_recent - (q_len - first - n)
        length = min(coded, end)
        if length <= 0:  # this chunk's queries come before every code
            outs.append(q_rot.new_zeros(batch, q_heads, n, dim))
            lses.append(q_rot.new_full((batch, q_heads, n), float("-inf")))
            continue
        k, v = ({name: t[:, :, :length] for name, t in side.items()} for side in (keys, values))
        out, lse = decode_attention(
            q_rot[:, :, first : first + n].contiguous(), k["indices"], k["norms"], v["indices"], v["norms"],
            layer.tables["key"], layer.tables["value"],
            torch.full((batch,), length, dtype=torch.int32, device=query.device), scaling,
            starts=code_starts, causal_shift=end - length,
            key_sketch=_sketch(layer, "key", k), value_sketch=_sketch(layer, "value", v),
            key_mean=layer.rotated_means["key"], value_mean=layer.rotated_means["value"],
        )  # fmt: skip
        outs.append(out)
        lses.append(lse)
    out, lse = (outs[0], lses[0]) if len(outs) == 1 else (torch.cat(outs, dim=2), torch.cat(lses, dim=2))
    if ends_fused:
        token = [layer.exact_tokens(side)[0 if n_sink else 1] for side in ("key", "value")] if exact else None
        joined = (query, *token, scaling) if exact else (None,) * 4
        return step.finish_step(out, lse, layer.rotations["value"], *joined, dtype=_stored(query.dtype))
    out = _rotate_back(out, layer.rotations["value"])
    if exact:
        keys, values = (
            _joined([t for t in layer.exact_tokens(side) if t is not None], -2) for side in ("key", "value")
        )
        seen = None  # one query token and no padding: it sees every exact token (all precede it or are it)
        if q_len > 1 or starts is not None:
            position = torch.cat(
                [torch.arange(n_sink, device=query.device), torch.arange(n_sink + coded, held, device=query.device)]
            )  # fmt: skip
            seen = (
                position[None, None, :]
                <= torch.arange(held - q_len, held, device=query.device)[None, :, None]
            )
            if starts is not None:
                seen = seen & (position[None, None, :] >= starts[:, None, None])  # [B, Tq, n]
        out = _with_exact(out, lse, query, keys, values, seen, scaling)
    return out


def _attend_static(layer, query: torch.Tensor, attention_mask, scaling: float) -> torch.Tensor:
    """A frozen layer's decode step (`TurboQuantLayer.freeze`: one token, the cache updated already): one kernel
    call over the whole capacity with the lengths read on the device, so that a CUDA graph can replay it; the
    exact sink tokens and recent window merged in (those at padded positions unseen), and under prefill_exact
    the token's own exact key and value."""
    from ..kernels import step
    from ..kernels.decode import decode_attention

    batch = query.shape[0]
    if attention_mask is not None:
        raise ValueError(
            "a frozen cache takes its padding from freeze(starts) and no attention mask (cache.thaw() returns "
            "it to the eager path)"
        )
    own = 0 if layer._step_states is None else 1  # prefill_exact: the step's own token is attended exactly
    window = layer.layout.recent_window
    # the step's ends in one launch each (packed codes have d a power of two ≥ 32, as the step kernels need);
    # the start with the step's key and value quantize where `update` left it
    q_rot = layer._start_step(query)
    k, v = layer.packed["key"].tensors, layer.packed["value"].tensors
    out, lse = decode_attention(
        q_rot, k["indices"], k["norms"], v["indices"], v["norms"], layer.tables["key"], layer.tables["value"],
        layer._read_lengths, scaling, starts=layer._code_starts, causal_shift=window + own, static_launch=True,
        key_sketch=_sketch(layer, "key", k), value_sketch=_sketch(layer, "value", v),
        key_mean=layer.rotated_means["key"], value_mean=layer.rotated_means["value"],
    )  # fmt: skip
    # The exact keys in order: the sinks, the window (just after the codes), the step's own token (always seen).
    sinks = layer.exact_tokens("key")[0]
    parts = [] if sinks is None else [(sinks, layer.exact_tokens("value")[0], layer._sinks_seen)]
    if window:
        position = (
            layer._sunk_held("key") + layer._read_lengths[:, None] + torch.arange(window, device=query.device)
        )
        seen = (position >= layer._starts[:, None])[:, None]  # [B, 1, W]
        parts.append((layer._pending["key"], layer._pending["value"], seen))
    if own:
        parts.append((*layer._step_states, None))
    rotations = layer.rotations["value"]
    if len(parts) <= own:  # nothing exact, or the own token alone: rotated back and joined in one launch
        joined = (query, *parts[0][:2], scaling) if parts else (None,) * 4
        return step.finish_step(out, lse, rotations, *joined, dtype=_stored(query.dtype))
    out = _rotate_back(out, rotations)
    if parts:
        keys, values = _joined([p[0] for p in parts], -2), _joined([p[1] for p in parts], -2)
        seen = None  # the step's own token alone: seen by every query, nothing to mask
        if any(p[2] is not None for p in parts):
            ones = torch.ones(batch, 1, 1, dtype=torch.bool, device=query.device)
            seen = _joined([ones if p[2] is None else p[2] for p in parts], -1)
        out = _with_exact(out, lse, query, keys, values, seen, scaling)
    return out


def _stored(dtype: torch.dtype) -> torch.dtype:
    """What a step's end stores: the model's dtype (so no cast follows), or fp32 for one the kernel does not
    store (float64: cast after, as the rest of the path is)."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def _joined(tensors, dim: int) -> torch.Tensor:
    """torch.cat, without its copy for a single tensor."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def _sketch(layer, side: str, codes: dict):
    """A Prod side's QJL sketch for the kernel (its signs and residual norms among `codes`), else None."""
    from ..kernels.decode import QJLSketch

    projection = layer.projections[side]
    if projection is None:
        return None
    scale = stored(layer.codecs[side][0]).qjl_scale
    return QJLSketch(codes["signs"], codes["residual_norms"], projection, scale)


def _with_exact(out, lse, query, keys, values, seen, scaling: float) -> torch.Tensor:
    """Attention over the codes (their normalised output `out` [B, Hq, Tq, d] and log-sum-exp `lse`) and exact
    keys and values [B, KVH, n, d] where seen [B or 1, Tq, n] allows (None: all of them, for every query), in
    fp32: one softmax over the codes' log-sum-exp and the exact logits weighs the codes' output and each exact
    value (a query that sees nothing gets 0). As many KV heads at a time as keep the [queries × exact keys]
    logits within EXACT_LOGITS (all of them in a decode step: a loop over heads costs a dozen small ops per
    head per layer per token)."""
    batch, q_heads, q_len, dim = query.shape
    kv_heads = keys.shape[1]
    group = q_heads // kv_heads
    step = max(1, min(kv_heads, EXACT_LOGITS // (batch * group * q_len * keys.shape[-2])))
    parts = []
    for first in range(0, kv_heads, step):
        kv = slice(first, first + step)
        heads = slice(first * group, min(first + step, kv_heads) * group)
        rows = (batch, -1, group * q_len)  # [B, H, G·Tq, ...]: a KV head's query rows, head-major
        q = query[:, heads].float().reshape(*rows, dim) * scaling
        logits = q @ keys[:, kv].float().transpose(-1, -2)  # [B, H, G·Tq, n]
        codes_lse = lse[:, heads].reshape(*rows, 1)
        if seen is None:  # a seen exact key in every row: no row of -inf, so no NaN
            weights = torch.softmax(torch.cat([codes_lse, logits], dim=-1), dim=-1)
        else:
            hidden = ~seen[:, None, None]  # [B, 1, 1, Tq, n] against the rows as [B, H, G, Tq, n]
            logits = logits.unflatten(2, (group, q_len)).masked_fill(hidden, float("-inf")).flatten(2, 3)
            weights = torch.softmax(torch.cat([codes_lse, logits], dim=-1), dim=-1).nan_to_num(0.0)
        exact = weights[..., 1:] @ values[:, kv].float()
        mixed = weights[..., :1] * out[:, heads].reshape(*rows, dim) + exact
        parts.append(mixed.reshape(batch, -1, q_len, dim))
    return _joined(parts, 1)


def _rotate(query: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Πq in fp32 for query [B, Hq, Tq, d], each query head by its KV head's rotation ([KVH, d, d])."""
    return _by_kv_head(query.float(), rotations.transpose(-1, -2))


def _rotate_back(out: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Πᵀo for the kernel's rotated-domain output [B, Hq, Tq, d] (the value rotations, [KVH, d, d])."""
    return _by_kv_head(out, rotations)


def _by_kv_head(x: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Each query head's rows of x [B, Hq, Tq, d] times its KV head's matrix ([KVH, d, d]) on the right, in one
    bmm over the KV heads (x and the result are copied to and from head-major order only where B > 1)."""
    batch, q_heads, q_len, dim = x.shape
    kv_heads = matrices.shape[0]
    rows = x.reshape(batch, kv_heads, -1, dim).transpose(0, 1).reshape(kv_heads, -1, dim)
    product = torch.bmm(rows, matrices)
    return product.reshape(kv_heads, batch, -1, dim).transpose(0, 1).reshape(batch, q_heads, q_len, dim)
