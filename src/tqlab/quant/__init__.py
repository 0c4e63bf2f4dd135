"""Codecs: TurboQuant Stage 1 and 2, fractional bits, and baselines, all in one interface.

from tqlab.quant import TurboQuantMSE, TurboQuantProd, make_codec
q = TurboQuantMSE(dim=128, bits=3, rotation="random_haar", seed=0)
code = q.quantize(x); x_hat = q.dequantize(code)
code.nbytes, code.bits_per_coordinate, q.constant_nbytes()
"""

from __future__ import annotations

from .baselines import KIVI, BlockCode, Int4Block, Int8Block
from .codebook import coordinate_distortion, lloyd_max_codebook
from .codes import Code
from .mixed import MixedCode, MixedPrecision
from .mse import MSECode, TurboQuantMSE
from .packing import pack_bits, packed_row_bytes, unpack_bits
from .prod import ProdCode, TurboQuantProd

CODECS = ("turboquant_mse", "turboquant_prod", "int8_block", "int4_block", "kivi")


def make_codec(name: str, dim: int, bits: float, **options):
    """Build a codec by name. Fractional bits on a TurboQuant codec give a MixedPrecision split."""
    if name in ("turboquant_mse", "turboquant_prod"):
        base = name.removeprefix("turboquant_")
        if not float(bits).is_integer():
            return MixedPrecision(dim, bits, base=base, **options)
        return (TurboQuantMSE if base == "mse" else TurboQuantProd)(dim, int(bits), **options)
    fixed = {"int8_block": (Int8Block, (8,)), "int4_block": (Int4Block, (4,)), "kivi": (KIVI, (2, 4))}
    if name not in fixed:
        raise ValueError(f"codec={name!r} is unknown; choose from {CODECS}")
    cls, allowed = fixed[name]
    if bits not in allowed:
        raise ValueError(f"bits={bits!r} is not allowed for codec {name}: choose from {allowed}")
    return cls(dim, bits=int(bits), **options) if cls is KIVI else cls(dim, **options)


__all__ = [
    "CODECS",
    "KIVI",
    "BlockCode",
    "Code",
    "Int4Block",
    "Int8Block",
    "MSECode",
    "MixedCode",
    "MixedPrecision",
    "ProdCode",
    "TurboQuantMSE",
    "TurboQuantProd",
    "coordinate_distortion",
    "lloyd_max_codebook",
    "make_codec",
    "pack_bits",
    "packed_row_bytes",
    "unpack_bits",
]
