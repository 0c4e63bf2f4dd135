"""Appending to and slicing codes along the token axis, for any codec's `Code` (nested ones included).

A code of vectors of leading shape (batch, tokens) holds tensors whose leading dims are (batch, tokens);
those grow by concatenation when tokens are appended. Tokens already stored are never re-encoded.
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
    changes = {}
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, Code):
            changes[f.name] = concat(x, y)
        elif _per_token(x, a.shape):
            changes[f.name] = torch.cat([x, y], dim=TOKEN_AXIS)
        elif f.name != "shape" and not (x is y or (not isinstance(x, torch.Tensor) and x == y)):
            raise ValueError(f"cannot append codes whose {f.name} differ ({x!r} vs {y!r})")
    shape = list(a.shape)
    shape[TOKEN_AXIS] += b.shape[TOKEN_AXIS]
    return dataclasses.replace(a, shape=tuple(shape), **changes)


def token_slice(code: Code, start: int, stop: int) -> Code:
    """The tokens start..stop−1 of a code (views, no copy)."""
    changes = {}
    for f in dataclasses.fields(code):
        x = getattr(code, f.name)
        if isinstance(x, Code):
            changes[f.name] = token_slice(x, start, stop)
        elif _per_token(x, code.shape):
            changes[f.name] = x[:, start:stop]
    shape = list(code.shape)
    shape[TOKEN_AXIS] = len(range(*slice(start, stop).indices(code.shape[TOKEN_AXIS])))
    return dataclasses.replace(code, shape=tuple(shape), **changes)
