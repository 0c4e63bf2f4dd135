"""Appending codes along the token axis, for any codec's `Code` (nested ones included).

A code of vectors of leading shape (batch, tokens) holds tensors whose leading dims are (batch, tokens);
those grow by concatenation when tokens are appended. A code that groups tokens (KIVI's keys: each channel
over groups of tokens) holds them along its fields' last axis, and is appended a whole group at a time.
Tokens already stored are never re-encoded.
"""

from __future__ import annotations

import dataclasses

import torch

from ..quant import Code

TOKEN_AXIS = 1  # codes in the cache cover vectors of shape (batch, tokens, head_dim)


def _per_token(value, shape: tuple) -> bool:
    return isinstance(value, torch.Tensor) and tuple(value.shape[: len(shape)]) == tuple(shape)


def concat(a: Code | None, b: Code) -> Code:
    """`a` followed by `b` along the token axis (`a` may be None: nothing stored yet)."""
    if a is None:
        return b
    if hasattr(a, "concat"):  # a code with its own token layout (gated keys)
        return a.concat(b)
    if a.grouped_token_fields and a.shape[TOKEN_AXIS] % a.group:
        raise ValueError(
            f"cannot append to a code of {a.shape[TOKEN_AXIS]} tokens: not whole groups of {a.group}"
        )
    changes = {}
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, Code):
            changes[f.name] = concat(x, y)
        elif f.name in a.grouped_token_fields:
            changes[f.name] = torch.cat([x, y], dim=-1)
        elif _per_token(x, a.shape):
            changes[f.name] = torch.cat([x, y], dim=TOKEN_AXIS)
        elif f.name != "shape" and not (x is y or (not isinstance(x, torch.Tensor) and x == y)):
            raise ValueError(f"cannot append codes whose {f.name} differ ({x!r} vs {y!r})")
    shape = list(a.shape)
    shape[TOKEN_AXIS] += b.shape[TOKEN_AXIS]
    return dataclasses.replace(a, shape=tuple(shape), **changes)


def drop_front(code: Code, n: int) -> Code:
    """The code without its first n tokens, copied (a view would keep the dropped bytes alive); a code that
    groups tokens drops whole groups."""
    if n == 0:
        return code
    if hasattr(code, "drop_front"):
        return code.drop_front(n)
    changes = {}
    for f in dataclasses.fields(code):
        x = getattr(code, f.name)
        if isinstance(x, Code):
            changes[f.name] = drop_front(x, n)
        elif f.name in code.grouped_token_fields:
            if n % code.group:
                raise ValueError(f"cannot drop {n} tokens from a code of groups of {code.group}")
            per_group = x.shape[-1] // -(-code.shape[TOKEN_AXIS] // code.group)  # bytes or scales per group
            changes[f.name] = x[..., n // code.group * per_group :].clone()
        elif _per_token(x, code.shape):
            changes[f.name] = x[:, n:].clone()
    shape = list(code.shape)
    shape[TOKEN_AXIS] -= n
    return dataclasses.replace(code, shape=tuple(shape), **changes)
