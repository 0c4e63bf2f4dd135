"""One fused quantize call of 256 MiB of bf16 rows (after two warm-up calls), for Nsight Compute:

    ncu -k regex:_quantize_rows -s 2 -c 1 --metrics smsp__inst_executed.sum,\
sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active,\
l1tex__data_pipe_lsu_wavefronts_mem_shared.avg.pct_of_peak_sustained_elapsed,launch__registers_per_thread \
python3 tools/research/gpu_quantize_once.py 128 4          # d, bits
"""

from __future__ import annotations

import sys

import torch

from tqlab.kernels import quantize_mse, quantize_tables
from tqlab.quant import TurboQuantMSE


def main() -> None:
    dim, bits = int(sys.argv[1]), int(sys.argv[2])
    x = torch.randn(256 * 2**20 // (2 * dim), dim, device="cuda", dtype=torch.bfloat16)
    codec = TurboQuantMSE(dim, bits, rotation="fast_hadamard").cuda()
    matrix = codec.rotation.matrix()
    tables = quantize_tables(matrix, codec.boundaries, x.dtype)
    for _ in range(3):
        quantize_mse(x, matrix, codec.boundaries, tables=tables)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
