"""Launch the decode kernel a few times on one case, for a profiler to attach to (one H200 run):

    ncu -k regex:_attend_chunk -c 1 --section SpeedOfLight --section SchedulerStats --section WarpStateStats \
        --section Occupancy python3 tools/research/gpu_decode_once.py --bits 4 --batch 1 --context 131072
"""

from __future__ import annotations

import argparse

import torch

from tqlab.kernels import centroid_table, decode_attention
from tqlab.quant import TurboQuantMSE


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--layout", default="32/8", help="query heads/KV heads")
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args()
    q_heads, kv_heads = map(int, args.layout.split("/"))
    codec = TurboQuantMSE(args.dim, args.bits, rotation="fast_hadamard").to("cuda")
    shape = (args.batch, kv_heads, args.context)
    codes = [
        torch.randint(0, 256, (*shape, args.dim // 8 * args.bits), dtype=torch.uint8, device="cuda")
        for _ in "kv"
    ]
    norms = [(torch.rand(shape, device="cuda") + 0.5).half() for _ in "kv"]
    table = centroid_table(codec.centroids)
    q = torch.randn(args.batch, q_heads, 1, args.dim, device="cuda")
    lengths = torch.full((args.batch,), args.context, dtype=torch.int32, device="cuda")
    for _ in range(3):
        decode_attention(q, codes[0], norms[0], codes[1], norms[1], table, table, lengths, args.dim**-0.5)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
