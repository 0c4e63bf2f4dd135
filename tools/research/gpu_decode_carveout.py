"""How many one-warp programs of the register-fragment decode kernel an SM holds once it keeps a table in
shared memory, and whether the L1/shared-memory carveout the driver picks limits them: occupancy from the
CUDA driver, and the kernel timed with the driver's default carveout and with all of L1 given to shared
memory (`CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT` = 100).

    PYTHONPATH=src python tools/research/gpu_decode_carveout.py --bits 4
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import sys

import torch

sys.path.insert(0, "benchmarks")  # run from the repository root
from gpu_decode import bench, decode_inputs  # noqa: E402

from tqlab.kernels import decode_attention, decode_mma  # noqa: E402

CARVEOUT = 9  # CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT
CUDA = ctypes.CDLL("libcuda.so.1")


def compiled_kernels():
    for cache in decode_mma._attend_chunk_mma.device_caches.values():
        yield from cache[0].values()


def occupancy(kernel) -> int:
    blocks = ctypes.c_int()
    CUDA.cuOccupancyMaxActiveBlocksPerMultiprocessor(
        ctypes.byref(blocks), ctypes.c_void_p(kernel.function), ctypes.c_int(32),
        ctypes.c_size_t(kernel.metadata.shared),
    )  # fmt: skip
    return blocks.value


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bits", type=int, nargs="+", default=[4])
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--layouts", nargs="+", default=["32/8", "12/2"])
    args = parser.parse_args()
    print(
        "| batch | q/KV heads | context | bits | default µs | carveout 100 µs | registers | shared B | programs/SM |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for layout in args.layouts:
        q_heads, kv_heads = map(int, layout.split("/"))
        for batch in args.batches:
            for context in args.contexts:
                for bits in args.bits:
                    inputs, _ = decode_inputs(batch, q_heads, kv_heads, context, bits)
                    decode_attention(*inputs)
                    kernel = max(compiled_kernels(), key=lambda k: k.metadata.shared)
                    for k in compiled_kernels():
                        CUDA.cuFuncSetAttribute(ctypes.c_void_p(k.function), CARVEOUT, ctypes.c_int(-1))
                    default = bench(functools.partial(decode_attention, *inputs))
                    for k in compiled_kernels():
                        CUDA.cuFuncSetAttribute(ctypes.c_void_p(k.function), CARVEOUT, ctypes.c_int(100))
                    full = bench(functools.partial(decode_attention, *inputs))
                    print(f"| {batch} | {layout} | {context // 1024}k | K{bits}V{bits} | {default:.1f} | {full:.1f} | "
                          f"{kernel.n_regs} | {kernel.metadata.shared} | {occupancy(kernel)} |", flush=True)  # fmt: skip
                    del inputs
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
