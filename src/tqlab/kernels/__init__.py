"""Triton kernels for the compressed KV cache: fused quantize and fused decode attention over codes.

from tqlab.kernels import centroid_table, decode_attention, quantize_mse
indices, norms = quantize_mse(x, codec.rotation.matrix(), codec.boundaries)
out = codec.rotation.inverse(decode_attention(codec.rotation.apply(q), ..., centroid_table(codec.centroids), ...))
At 4 bits the cache stores Lloyd-Max codes as sign-magnitude labels, which the register kernel decodes in fewer
instructions: `quantize_tables(..., sign_magnitude=True)` and `centroid_table(codec.centroids, sign_magnitude=True)`.
TurboQuant-Prod: `quantize_prod`, and `decode_attention(..., key_sketch=QJLSketch(...), value_sketch=...)`.
A frozen (CUDA-graph) decode step rotates its query and finishes its output in one launch each (`kernels.step`).

Nothing else in tqlab imports this package, so `import tqlab` needs neither triton nor a GPU. Without a
GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported).
"""

from __future__ import annotations

try:
    import triton  # noqa: F401
except ImportError as err:
    raise ImportError(
        "tqlab.kernels needs triton: `pip install triton` (on a CPU-only machine, also set TRITON_INTERPRET=1)"
    ) from err

from .decode import decode_attention
from .packed import centroid_table
from .quantize import QuantizeTables, quantize_mse, quantize_prod, quantize_tables

__all__ = [
    "QuantizeTables",
    "centroid_table",
    "decode_attention",
    "quantize_mse",
    "quantize_prod",
    "quantize_tables",
]
