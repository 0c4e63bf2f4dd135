"""Where a compressed cache keeps tokens exact, and which protocol its queries follow (torch-free, so
configurations are checked before any compute)."""

from __future__ import annotations

import dataclasses

from ..registry import PROTOCOLS, RuleError


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """What the cache keeps exact around the codes, and which protocol its queries follow.

    sink_tokens: the first tokens of the cache (with left padding: the first positions of the batch,
    which may be padding for the shorter rows). recent_window: the newest tokens; a codec that encodes
    tokens in groups (KIVI's keys, groups of 32) keeps up to a group − 1 more, as KIVI itself does."""

    protocol: str = "all_quantized"
    exact_layers: tuple[int, ...] = ()
    sink_tokens: int = 0
    recent_window: int = 0

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise RuleError(f"protocol={self.protocol!r} is not allowed; choose from {list(PROTOCOLS)}")
        for key in ("sink_tokens", "recent_window"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise RuleError(f"{key}={value!r} must be an integer >= 0 (tokens)")
        if not isinstance(self.exact_layers, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in self.exact_layers
        ):
            raise RuleError(
                f"exact_layers={list(self.exact_layers) if isinstance(self.exact_layers, (list, tuple)) else self.exact_layers!r}"
                " must be a list of layer indices (negative: from the end)"
            )
        object.__setattr__(self, "exact_layers", tuple(self.exact_layers))
