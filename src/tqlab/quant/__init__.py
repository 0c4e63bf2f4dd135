"""Codecs: TurboQuant Stage 1 and 2, fractional bits, and baselines, all in one interface.

from tqlab.quant import TurboQuantMSE, TurboQuantProd, make_codec
q = TurboQuantMSE(dim=128, bits=3, rotation="random_haar", seed=0)
code = q.quantize(x); x_hat = q.dequantize(code)
code.nbytes, code.bits_per_coordinate, q.constant_nbytes()
"""

from __future__ import annotations

from .. import registry
from .baselines import KIVI, BlockCode, Int4Block, Int8Block
from .centered import Centered
from .codebook import coordinate_distortion, lloyd_max_codebook
from .codes import Code
from .gated import GatedCode, RelevanceGated
from .metric import QueryWeighted, query_metric_maps
from .mixed import MixedCode, MixedPrecision
from .mse import MSECode, TurboQuantMSE
from .packing import pack_bits, packed_row_bytes, unpack_bits
from .prod import ProdCode, TurboQuantProd
from .protected import ProtectedChannels, ProtectedCode
from .transform import TransformCode, TransformCoder

CODECS = tuple(registry.CODECS)


def make_codec(name: str, dim: int, bits: float, **options):
    """Build a codec by name. Fractional bits on a TurboQuant codec give a MixedPrecision split. Names and
    bit widths are checked against `tqlab.registry`, the rules config validation reads too."""
    bits = registry.check_bits(name, bits, dim=dim)
    if name in ("turboquant_mse", "turboquant_prod"):
        base = name.removeprefix("turboquant_")
        if isinstance(bits, float):
            return MixedPrecision(dim, bits, base=base, **options)
        return (TurboQuantMSE if base == "mse" else TurboQuantProd)(dim, bits, **options)
    if name == "transform_coding":
        return TransformCoder(dim, bits, **options)
    if name == "protected_channels":
        return ProtectedChannels(dim, bits, **options)
    if name == "relevance_gated":
        return RelevanceGated(dim, bits, **options)
    if name == "kivi":
        return KIVI(dim, bits=bits, **options)
    return {"int8_block": Int8Block, "int4_block": Int4Block}[name](dim, **options)


__all__ = [
    "CODECS",
    "Centered",
    "QueryWeighted",
    "KIVI",
    "BlockCode",
    "Code",
    "Int4Block",
    "Int8Block",
    "ProtectedChannels",
    "RelevanceGated",
    "GatedCode",
    "ProtectedCode",
    "MSECode",
    "MixedCode",
    "MixedPrecision",
    "ProdCode",
    "TurboQuantMSE",
    "TransformCode",
    "TransformCoder",
    "TurboQuantProd",
    "coordinate_distortion",
    "lloyd_max_codebook",
    "make_codec",
    "pack_bits",
    "packed_row_bytes",
    "query_metric_maps",
    "unpack_bits",
]
