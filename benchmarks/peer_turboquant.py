"""tqlab's Triton kernels side by side with two public TurboQuant wheels, on one GPU.

    pip install --no-deps --target /tmp/peer_site fused_turboquant-0.1.0-py3-none-any.whl \
        turboquant_vllm-1.5.0-py3-none-any.whl     # (add --ignore-requires-python below Python 3.12)
    PYTHONPATH=src python benchmarks/peer_turboquant.py --site /tmp/peer_site  # → outputs/bench/benchmarks.md
    PYTHONPATH=src python benchmarks/peer_turboquant.py --site /tmp/peer_site --out -  # print only

Peers, called through their own entry points (neither needs vllm on these paths):
  fused-turboquant 0.1.0 ("fused-tq"): `TurboQuantMSE(128, bits, device="cuda").encode` / `.decode` (one
    Triton kernel each: randomized Hadamard + Lloyd-Max, bits 2/3/4 packed densely, fp32 norms). It has
    no fused decode attention: its decode step (hf/fused_cache.py, q_len == 1) is `fused_qk_scores_rht`
    (a Triton scores-only kernel over packed keys), a softmax, `.decode` of the whole value cache to fp32,
    a GQA repeat and a matmul; that sequence is timed, without the query's Hadamard rotation.
  turboquant-vllm 1.5.0 ("tq-vllm"): `triton.tq4_compress` / `tq4_decompress` (dense Haar rotation,
    codes always nibble-packed: 2 and 3 bits use a smaller codebook, not fewer bytes; fp32 norms), and
    two fused decode kernels: `fused_paged_tq4_decode` (its vLLM decode path, over a paged uint8 cache
    [blocks, 16, H·(64+4)·2], here with a contiguous block table) and `triton_flash_attention_tq4_kv`
    (its HF path, contiguous [B, H, T, 64] codes). Both wrappers rotate q and the output themselves (two
    small fp32 GEMMs, timed); tqlab's and fused-tq's query/output rotations are not timed (they fold into
    the q and o projections).

Quantize: GB/s of the bf16 input read once and % of a device-to-device copy of the same bytes (as in
gpu_quantize.py); D_mse = E‖x − x̂‖²/‖x‖² over 65536 Gaussian vectors with x̂ from the implementation's
own dequantize, next to the paper's values for d → ∞ and the exact value of the Lloyd-Max codebook at
d = 128; determinism: the encoder runs 5 times on the same input and the table gives the most bytes
(codes and norms) that differ from the first run. Decode: one step of one layer as in gpu_decode.py
(medians of CUDA-graph replays, L2 flushed), random Gaussian K/V quantized by each implementation's own
quantizer; the last column compares each output with SDPA over the bf16 cache (max |Δ| / max |out|:
quantization error, not kernel error, unless it is large). A peer's failure is printed in its cell.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import sys
import types
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from docs_section import write_section
from gpu_decode import bench
from gpu_quantize import seconds

from tqlab.kernels import centroid_table, decode_attention, quantize_mse
from tqlab.quant import TurboQuantMSE

try:  # built once per codec on a hot path; without them each quantize_mse call reads Π back (a stall)
    from tqlab.kernels import quantize_tables
except ImportError:  # a tqlab from before the tables
    quantize_tables = None

DIM = 128
DEVICE = "cuda"
DTYPE = torch.bfloat16
SAMPLE = 1 << 16  # vectors for D_mse
RUNS = 5  # encoder runs compared for determinism
BLOCK_SIZE = 16  # vLLM's default page size, for tq-vllm's paged kernel
PAPER_DMSE = {1: 0.36, 2: 0.1175, 3: 0.03454, 4: 0.009497}  # unit vectors, d → ∞ (arXiv 2504.19874)


def failure(err: BaseException) -> str:
    """An exception as one table cell."""
    text = f"{type(err).__name__}: {err}".splitlines()[0]
    return "FAILED " + text[:120].replace("|", "/")


def attempt(fn, *args):
    """fn(*args), or the exception as a table cell: one peer's failure must not stop the run."""
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - it goes into the table
        return failure(err)


def load_peers(site: Path) -> dict:
    """The peers' entry points, each a namespace or the import's exception."""
    sys.path.insert(0, str(site))
    peers = {}
    try:
        from fused_turboquant.core.hadamard import randomized_hadamard
        from fused_turboquant.core.quantizer import CompressedTensor
        from fused_turboquant.core.quantizer import TurboQuantMSE as FusedMSE
        from fused_turboquant.kernels.triton_attention import fused_qk_scores_rht

        peers["fused-tq"] = types.SimpleNamespace(
            TurboQuantMSE=FusedMSE,
            CompressedTensor=CompressedTensor,
            qk_scores=fused_qk_scores_rht,
            rotate=randomized_hadamard,
        )
    except Exception as err:  # noqa: BLE001
        peers["fused-tq"] = err
    try:
        from turboquant_vllm.quantizer import TurboQuantMSE as VllmMSE  # scipy, for its codebooks

        try:
            importlib.import_module("turboquant_vllm.triton")
        except Exception:  # noqa: BLE001 - ImportError, or a transformers that fails to import
            # turboquant_vllm/triton/__init__.py imports transformers (its HF attention registry), which
            # none of the kernels below needs: read the submodules without running it.
            import turboquant_vllm

            stub = types.ModuleType("turboquant_vllm.triton")
            stub.__path__ = [str(Path(turboquant_vllm.__file__).parent / "triton")]
            sys.modules["turboquant_vllm.triton"] = stub

        def entry(module: str, name: str | None = None):
            # import_module, not `import a.b as m`: the package re-exports functions of the modules' names
            return vars(importlib.import_module(f"turboquant_vllm.triton.{module}"))[name or module]

        peers["tq-vllm"] = types.SimpleNamespace(
            TurboQuantMSE=VllmMSE,
            compress=entry("tq4_compress"),
            decompress=entry("tq4_decompress"),
            paged_decode=entry("fused_paged_tq4_attention", "fused_paged_tq4_decode"),
            contiguous_decode=entry("flash_attention_tq4_kv", "triton_flash_attention_tq4_kv"),
        )
    except Exception as err:  # noqa: BLE001
        peers["tq-vllm"] = err
    return peers


def vllm_codec(tv, bits: int) -> types.SimpleNamespace:
    """tq-vllm's constants on the GPU, split as its vLLM backend splits them (tq4_backend.py)."""
    quantizer = tv.TurboQuantMSE(DIM, bits)  # seed 42, as the backend
    rotation_t = quantizer.rotation.T.contiguous()
    return types.SimpleNamespace(
        rotation=quantizer.rotation.to(DEVICE),
        even=rotation_t[:, 0::2].contiguous().to(DEVICE),
        odd=rotation_t[:, 1::2].contiguous().to(DEVICE),
        boundaries=quantizer.codebook.boundaries.to(DEVICE),
        centroids=quantizer.codebook.centroids.to(DEVICE),
    )


# -- quantize ------------------------------------------------------------------------------------------


def quantizers(peers: dict, bits: int):
    """(name, make) per implementation; make() → (encode(x) → output tensors, roundtrip(x) → x̂) or raises."""

    def tqlab():
        codec = TurboQuantMSE(DIM, bits, rotation="fast_hadamard").to(DEVICE)
        matrix = codec.rotation.matrix()
        labels = {"sign_magnitude": True} if bits == 4 else {}  # the cache's 4-bit code format
        tables = (
            {}
            if quantize_tables is None
            else {"tables": quantize_tables(matrix, codec.boundaries, DTYPE, **labels)}
        )
        return (
            lambda x: quantize_mse(x, matrix, codec.boundaries, **tables),
            lambda x: codec.dequantize(codec.quantize(x)),
        )

    def fused():
        ft = peers["fused-tq"]
        if isinstance(ft, Exception):
            raise ft
        tq = ft.TurboQuantMSE(DIM, bits, device=DEVICE)
        if DEVICE == "cuda" and not tq._use_fused_triton:
            raise RuntimeError("fused-turboquant did not enable its Triton path")

        def encode(x):
            code = tq.encode(x)
            return code.indices, code.norms

        return encode, lambda x: tq.decode(tq.encode(x))

    def vllm():
        tv = peers["tq-vllm"]
        if isinstance(tv, Exception):
            raise tv
        c = vllm_codec(tv, bits)

        def encode(x):
            return tv.compress(x.view(-1, 1, DIM), c.even, c.odd, c.boundaries)

        def roundtrip(x):
            rotated = tv.decompress(*encode(x), c.centroids, dtype=torch.float32)
            return rotated.view(-1, DIM) @ c.rotation  # its backend's unrotation: x = y @ Π

        return encode, roundtrip

    return [
        ("tqlab `quantize_mse` (fast Hadamard, tables built once)", tqlab),
        ("fused-tq `TurboQuantMSE.encode`", fused),
        ("tq-vllm `tq4_compress`", vllm),
    ]


def flat_bytes(tensors) -> torch.Tensor:
    return torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in tensors])


def quantize_rows(name: str, bits: int, make, x: torch.Tensor, copy_s: float) -> str:
    try:
        encode, roundtrip = make()
    except Exception as err:  # noqa: BLE001
        return f"| {bits} | {name} | {failure(err)} | | | | |"

    def throughput():
        s = seconds(partial(encode, x))
        return f"{x.nbytes / s / 1e9:.0f} | {100 * copy_s / s:.0f}%"

    def row_bytes():
        return f"{flat_bytes(encode(x[:1024])).numel() / 1024:g}"

    def dmse():
        sample = x[:SAMPLE]
        xf = sample.float()
        err = (xf - roundtrip(sample).float().view_as(xf)).square().sum(-1) / xf.square().sum(-1)
        return f"{err.mean().item():.5f}"

    def differing():
        first = flat_bytes(encode(x))
        worst = max(int((flat_bytes(encode(x)) != first).sum()) for _ in range(RUNS - 1))
        return f"{worst} of {first.numel()}"

    speed = attempt(throughput)
    if speed.startswith("FAILED"):
        speed += " | "
    return f"| {bits} | {name} | {attempt(row_bytes)} | {speed} | {attempt(dmse)} | {attempt(differing)} |"


def reference_rows(bits: int) -> list[str]:
    rows = [f"| {bits} | paper, unit vectors, d → ∞ | | | | {PAPER_DMSE.get(bits, float('nan')):.5f} | |"]
    try:
        from tqlab.quant.codebook import coordinate_distortion  # E‖u − û‖² of the whole vector (× dim)

        exact = f"{coordinate_distortion(DIM, bits):.5f}"
    except Exception as err:  # noqa: BLE001
        exact = failure(err)
    rows.append(f"| {bits} | exact Lloyd-Max at d = {DIM} (tqlab codebook) | | | | {exact} | |")
    return rows


# -- decode --------------------------------------------------------------------------------------------


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    out = out.float().reshape(expected.shape)
    return ((out - expected).abs().max() / expected.abs().max()).item()


def tqlab_decode(k, v, q, bits, scaling, expected):
    batch, context = k.shape[0], k.shape[2]
    codecs = [TurboQuantMSE(DIM, bits, rotation="fast_hadamard", seed=s).to(DEVICE) for s in (0, 1)]
    labels = bits == 4  # the cache stores 4-bit codes as sign-magnitude labels
    (kc, kn), (vc, vn) = (
        quantize_mse(
            t, c.rotation.matrix(), c.boundaries,
            tables=quantize_tables(c.rotation.matrix(), c.boundaries, t.dtype, sign_magnitude=labels),
        )
        for t, c in zip((k, v), codecs, strict=True)
    )  # fmt: skip
    tables = [centroid_table(c.centroids, labels) for c in codecs]
    lengths = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    q_rot = codecs[0].rotation.apply(q.float())  # folds into the q projection: not timed
    call = partial(decode_attention, q_rot, kc, kn, vc, vn, *tables, lengths, scaling)
    error = relative_error(codecs[1].rotation.inverse(call()[0]), expected)
    return bench(call), error


def fused_decode(ft, k, v, q, bits, scaling, expected):
    """fused-turboquant's decode step (hf/fused_cache.py, q_len == 1), query rotation excluded."""
    batch, q_heads = q.shape[:2]
    kv_heads, context = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    tq = ft.TurboQuantMSE(DIM, bits, device=DEVICE)
    keys, values = tq.encode(k), tq.encode(v)
    # As its HF forward rotates q (PyTorch butterflies); folds into the q projection, so not timed.
    q_rot = ft.rotate(q.float().reshape(-1, DIM), tq.rotation.signs).view_as(q)

    def step():
        scores = ft.qk_scores(q_rot, keys.indices, keys.norms, tq.quantizer.levels, scaling, bits=bits)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        decoded = tq.decode(ft.CompressedTensor(values.indices, values.norms, DIM, bits)).to(q.dtype)
        expanded = decoded[:, :, None].expand(batch, kv_heads, group, context, DIM)
        return weights @ expanded.reshape(batch, q_heads, context, DIM)

    error = relative_error(step(), expected)
    return bench(step), error


def paged_cache(tv, c, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    """tq-vllm's paged layout: per token [K codes (H·64) | K norms (H·4) | V codes | V norms] bytes, as
    its backend's _compress_and_store writes it, in pages of BLOCK_SIZE tokens; block table in order."""
    batch, kv_heads, context, _ = k.shape
    parts = []
    for t in (k, v):
        packed, norms = tv.compress(t.transpose(1, 2).reshape(-1, kv_heads, DIM), c.even, c.odd, c.boundaries)
        parts += [
            packed.reshape(batch * context, -1),
            norms.reshape(-1, kv_heads).contiguous().view(torch.uint8),
        ]
    rows = torch.cat(parts, dim=1)
    del parts
    blocks = triton.cdiv(context, BLOCK_SIZE)
    cache = torch.zeros(batch, blocks * BLOCK_SIZE, rows.shape[1], dtype=torch.uint8, device=DEVICE)
    cache[:, :context] = rows.view(batch, context, -1)
    table = torch.arange(batch * blocks, dtype=torch.int32, device=DEVICE).view(batch, blocks)
    return cache.view(batch * blocks, BLOCK_SIZE, -1), table


def vllm_paged_decode(tv, k, v, q, bits, scaling, expected):
    batch, q_heads = q.shape[:2]
    kv_heads, context = k.shape[1], k.shape[2]
    c = vllm_codec(tv, bits)
    cache, table = paged_cache(tv, c, k, v)
    lengths = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    q3 = q.reshape(batch, q_heads, DIM)
    # Its backend passes the key codebook for both K and V (one Centroids argument): K and V share bits here.
    call = partial(
        tv.paged_decode,
        q3,
        cache,
        table,
        lengths,
        c.centroids,
        c.rotation,
        kv_heads,
        DIM,
        BLOCK_SIZE,
        scaling,
    )
    error = relative_error(call(), expected)
    return bench(call), error


def vllm_contiguous_decode(tv, k, v, q, bits, scaling, expected):
    batch, kv_heads, context, _ = k.shape
    c = vllm_codec(tv, bits)
    codes = []
    for t in (k, v):
        packed, norms = tv.compress(t.reshape(-1, 1, DIM), c.even, c.odd, c.boundaries)
        codes += [packed.view(batch, kv_heads, context, DIM // 2), norms.view(batch, kv_heads, context)]
    call = partial(tv.contiguous_decode, q, *codes, c.centroids, c.rotation, scaling)
    error = relative_error(call(), expected)
    return bench(call), error


def tokens(context: int) -> str:
    return f"{context // 1024}k" if context % 1024 == 0 else str(context)


def decode_row(peers, batch, q_heads, kv_heads, context, bits) -> str:
    scaling = DIM**-0.5
    k, v = (torch.randn(batch, kv_heads, context, DIM, device=DEVICE, dtype=DTYPE) for _ in range(2))
    q = torch.randn(batch, q_heads, 1, DIM, device=DEVICE, dtype=DTYPE)
    sdpa = partial(F.scaled_dot_product_attention, q, k, v, scale=scaling, enable_gqa=True)
    expected = sdpa().float()
    sdpa_us = bench(sdpa)

    def peer(name, fn):
        def run():
            entry = peers[name]
            if isinstance(entry, Exception):
                raise entry
            return fn(entry, k, v, q, bits, scaling, expected)

        return run

    cells, errors = [], []
    for run in [
        partial(tqlab_decode, k, v, q, bits, scaling, expected),
        peer("fused-tq", fused_decode),
        peer("tq-vllm", vllm_paged_decode),
        peer("tq-vllm", vllm_contiguous_decode),
    ]:
        result = attempt(run)
        if isinstance(result, str):
            cells.append(result)
            errors.append("—")
        else:
            cells.append(f"{result[0]:.1f}")
            errors.append(f"{result[1]:.1e}")
        empty_cache()
    return (
        f"| {batch} | {tokens(context)} | K{bits}V{bits} | {sdpa_us:.1f} | {' | '.join(cells)} | "
        f"{' / '.join(errors)} |"
    )


# -- main ----------------------------------------------------------------------------------------------


def empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def device_line() -> str:
    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, torch {torch.__version__}, triton {triton.__version__}"


def peer_versions() -> str:
    found = []
    for dist in ("fused-turboquant", "turboquant-vllm"):
        try:
            found.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{dist} not found")
    return ", ".join(found)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--site", type=Path, required=True, help="where the wheels were installed with pip --target"
    )
    parser.add_argument("--quant-bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--mib", type=int, default=256, help="bf16 input per quantize call")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--heads", default="32/8", help="query heads/KV heads")
    parser.add_argument(
        "--bits", type=int, nargs="+", default=[3, 4], help="K and V bits of the decode table"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/bench/benchmarks.md"), help="'-' to print only"
    )
    args = parser.parse_args()
    peers = load_peers(args.site)
    for name, entry in peers.items():
        if isinstance(entry, Exception):
            print(f"{name}: {failure(entry)}", flush=True)
    torch.manual_seed(0)

    quant = [
        "| bits | implementation | bytes/vector | GB/s | % of copy | D_mse | bytes differing over 5 runs |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    print("\n".join(quant), flush=True)
    x = torch.randn(args.mib * 2**20 // (2 * DIM), DIM, device=DEVICE, dtype=DTYPE)
    vectors = x.shape[0]
    copy = torch.empty_like(x)
    copy_s = seconds(partial(copy.copy_, x))
    del copy
    for bits in args.quant_bits:
        for name, make in quantizers(peers, bits):
            quant.append(quantize_rows(name, bits, make, x, copy_s))
            print(quant[-1], flush=True)
            empty_cache()
        for row in reference_rows(bits):
            quant.append(row)
            print(row, flush=True)
    del x
    empty_cache()

    q_heads, kv_heads = map(int, args.heads.split("/"))
    decode = [
        "| batch | context | bits | SDPA bf16 µs | tqlab µs | fused-tq µs | tq-vllm paged µs | "
        "tq-vllm contiguous µs | max rel Δ vs SDPA (tqlab / fused-tq / paged / contiguous) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    print("\n" + "\n".join(decode), flush=True)
    for batch in args.batches:
        for context in args.contexts:
            for bits in args.bits:
                decode.append(decode_row(peers, batch, q_heads, kv_heads, context, bits))
                print(decode[-1], flush=True)
                empty_cache()

    section = "\n".join(
        [
            "## TurboQuant peers on a GPU: quantize and decode attention against fused-turboquant and "
            "turboquant-vllm",
            "",
            f"`python {' '.join(sys.argv)}` — {datetime.date.today()}, {device_line()}; {peer_versions()}. "
            f"d = {DIM}. Quantize: median of triton do_bench over {vectors} bf16 vectors; bytes/vector "
            "counts codes and norms; D_mse over 65536 Gaussian vectors. tq-vllm stores 2 and 3 bits in "
            "nibbles.",
            "",
            *quant,
            "",
            f"Decode: one layer, one step, {q_heads}/{kv_heads} heads, head_dim {DIM}; medians of CUDA-graph "
            "replays with the L2 flushed. tqlab and fused-tq exclude the query (and output) rotation, which "
            "folds into the projections; tq-vllm's wrappers include theirs. fused-tq has no fused attention: "
            "its step is scores kernel + softmax + full value decode + GQA repeat + matmul. K/V: Gaussian, "
            "quantized by each implementation's own quantizer; the last column is max |Δ| / max |out| "
            "against SDPA on the bf16 cache (quantization error; a broken kernel shows ≳ 1 or nan).",
            "",
            *decode,
        ]
    )
    if str(args.out) != "-":
        write_section(args.out, "peer_turboquant", section)


if __name__ == "__main__":
    main()
