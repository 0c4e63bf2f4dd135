"""Launch the decode kernel a few times on one case, for a profiler to attach to (one H200 run):

    ncu -k regex:_attend_chunk -c 1 --section SpeedOfLight --section SchedulerStats --section WarpStateStats \
        --section Occupancy python3 tools/research/gpu_decode_once.py --bits 4 --batch 1 --context 131072

Issue rate, pipes and stalls of the register kernel at batch 1 with 2 KV heads, with S chunks per KV head:

    S=""; for r in long_scoreboard wait math_pipe_throttle no_instruction not_selected short_scoreboard \
        barrier lg_throttle branch_resolving dispatch_stall mio_throttle selected; do
        S="${S}smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio,"; done
    ncu -k regex:_attend_chunk_mma --launch-skip 1 -c 1 --metrics "${S}gpu__time_duration.sum,\
    sm__cycles_active.avg,sm__warps_active.avg.per_cycle_active,smsp__issue_active.avg.pct_of_peak_sustained_active,\
    sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,sm__ctas_launched.max" \
        python3 tools/research/gpu_decode_once.py --bits 3 --context 32768 --layout 12/2 --splits 256
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
    parser.add_argument("--splits", type=int, help="chunks per (sequence, KV head) (default: the library's)")
    args = parser.parse_args()
    q_heads, kv_heads = map(int, args.layout.split("/"))
    inputs, _ = decode_inputs(args.batch, q_heads, kv_heads, args.context, args.bits, args.dim)
    for _ in range(3):
        decode_attention(*inputs, num_splits=args.splits)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
