"""The independent units of the report's paired tests. (Which way each metric is better: `tqlab.results`.)"""

from __future__ import annotations

# Windows of one (layer, KV head) are strongly correlated (paired differences ≈ 0.8), so paired tests run
# on units: the block columns that define one, and how report.md describes its value.
UNITS = {
    "layer_head": (("layer", "kv_head"), "(layer, KV head): the mean over that head's windows"),
    "document": (("document",), "source document: the mean over all layers, KV heads and windows of it"),
}
