"""The independent units of the report's paired tests. (Which way each metric is better: `tqlab.results`.)"""

from __future__ import annotations

# Windows of one (layer, KV head) are strongly correlated (paired differences ≈ 0.8), so paired tests run
# on units: the block columns that define one, and how report.md describes its value.
UNITS = {
    "layer_head": (("layer", "kv_head"), "(layer, KV head): the mean over that head's windows"),  # on request
    "document": (("document",), "source document: the mean over all layers, KV heads and windows of it"),
}
UNIT_INDEPENDENCE = {  # what a test on these units says
    "document": "Every layer, KV head and window of one document reads its text, so documents are the "
    "independent pairs.",
    "layer_head": "(layer, KV head) units all read the same documents: they are not independent samples of "
    "text, so these tests describe the documents evaluated only (by document: unit=document).",
}
