"""Serving captured (or synthetic) queries, keys and values to training and evaluation.

Every KV source — `tqlab.capture.CaptureStore` on disk or `SyntheticKV` in memory — answers the same
questions: `architecture`, `layers`, `splits`, `num_sequences(split)`, `layer_facts(layer)` and
`load(split, layer, sequence, kv_head) -> {"q": [G, T, D], "k": [T, D], "v": [T, D], "positions": [T]}`.
"""

from .synthetic import SyntheticKV

__all__ = ["SyntheticKV"]
