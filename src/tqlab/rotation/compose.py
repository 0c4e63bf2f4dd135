"""Rotations applied one after another: Composed([P, Q]) maps x to Q(P(x))."""

from __future__ import annotations

from torch import nn

from .base import Rotation


class Composed(Rotation):
    def __init__(self, parts: list[Rotation]):
        dims = {p.dim for p in parts}
        if len(dims) != 1:
            raise ValueError(f"composed rotations must share one dim, got {sorted(dims)}")
        super().__init__(dims.pop())
        self.parts = nn.ModuleList(parts)

    def _rotate(self, x):
        for p in self.parts:
            x = p.apply(x)
        return x

    def _unrotate(self, y):
        for p in reversed(self.parts):
            y = p.inverse(y)
        return y
