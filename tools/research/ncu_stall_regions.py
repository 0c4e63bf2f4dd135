"""Where a kernel's warps spend their time, instruction by instruction, from Nsight Compute's warp-state samples:
the share of samples before the main loop (each program's prologue), in it and after it, the stall reasons of
each part, and the instructions with the most samples, each with the global load it waits on where there is one.
It reads the CSV of a report's source page (no GPU needed); on the GPU, for the decode kernel:

    ncu -k regex:_attend_chunk_mma --launch-skip 1 -c 1 --warp-sampling-interval 0 --section SourceCounters \
        --section WarpStateStats --section SpeedOfLight -o /tmp/k4 -f \
        python3 tools/research/gpu_decode_once.py --bits 4 --context 32768 --layout 12/2
    ncu -i /tmp/k4.ncu-rep --page source --csv --print-source sass > k4_sass.csv
    python tools/research/ncu_stall_regions.py k4_sass.csv

The loop is the span of instructions executed more than half as often as the most executed one (a program's
blocks run it several times, its prologue once); the load behind a stall on the long scoreboard is the latest
`LDG` before it that writes one of its source registers (a static guess, not a dependence the profiler reports).
"""

from __future__ import annotations

import argparse
import collections
import csv
import re

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def count(value: str) -> int:
    return int(value.replace(",", "")) if value not in ("", "-") else 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    parser.add_argument("--top", type=int, default=12, help="instructions listed, most samples first")
    args = parser.parse_args()
    with open(args.csv, newline="") as file:
        rows = list(csv.reader(file))
    header = next(row for row in rows if "Source" in row and SAMPLES in row)
    column = {name: i for i, name in enumerate(header)}
    body = [row for row in rows[rows.index(header) + 1 :] if len(row) == len(header)]
    reasons = [name for name in header if name.startswith("stall_") and "Not Issued" not in name]
    samples = [count(row[column[SAMPLES]]) for row in body]
    executed = [count(row[column[EXECUTED]]) for row in body]
    source = [row[column["Source"]].strip() for row in body]
    total = sum(samples)
    hot = [i for i, n in enumerate(executed) if n > max(executed) // 2]
    parts = {
        "before the loop": range(0, hot[0]),
        "the loop": range(hot[0], hot[-1] + 1),
        "after the loop": range(hot[-1] + 1, len(body)),
    }
    print(f"{total} samples over {len(body)} instructions")
    for name, span in parts.items():
        part = sum(samples[i] for i in span)
        why = collections.Counter()
        for i in span:
            for reason in reasons:
                why[reason] += count(body[i][column[reason]])
        shares = ", ".join(f"{r[len('stall_') :]} {n / max(part, 1):.0%}" for r, n in why.most_common(6))
        print(f"{name}: {part / total:.0%} of samples ({shares})")
    print("\ninstructions with the most samples (share of all; main reason; the load it waits on):")
    for i in sorted(range(len(body)), key=lambda i: -samples[i])[: args.top]:
        reason = max(reasons, key=lambda r: count(body[i][column[r]]))
        load = ""
        if reason == "stall_long_sb":
            registers = set(re.findall(r"\bR\d+\b", source[i].split(",", 1)[-1]))
            for j in range(i - 1, -1, -1):
                written = re.search(r"LDG[.\w]*\s+(R\d+)", source[j])
                if written and written.group(1) in registers:
                    load = f"  <- {j}: {source[j]}"
                    break
        print(f"{i:5d} {samples[i] / total:5.1%} {reason[len('stall_') :]:12s} {source[i][:60]}{load}")


if __name__ == "__main__":
    main()
