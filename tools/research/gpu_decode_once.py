"""Launch the decode kernel a few times on one case, for a profiler to attach to (one H200 run):

    ncu -k regex:_attend_chunk -c 1 --section SpeedOfLight --section SchedulerStats --section WarpStateStats \
        --section Occupancy python3 tools/research/gpu_decode_once.py --bits 4 --batch 1 --context 131072
"""

from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, "benchmarks")  # run from the repository root
from gpu_decode import decode_inputs  # noqa: E402

from tqlab.kernels import decode_attention  # noqa: E402


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
    inputs, _ = decode_inputs(args.batch, q_heads, kv_heads, args.context, args.bits, args.dim)
    for _ in range(3):
        decode_attention(*inputs)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
