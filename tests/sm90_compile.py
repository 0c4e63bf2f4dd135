"""The sm_90 compile behind tests/kernels/test_decode_mma_compiles.py. It runs in a fresh process (the test
session runs Triton in its interpreter, which cannot compile Gluon), once per session, and takes ~25 s with a cold
Triton cache: tests/conftest.py starts it at the session's first test, so that it runs beside the other tests
rather than holding a pytest-xdist worker, and the tests' fixture waits for it (`compiled`)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Compiled in a fresh process, all at once (each process spends seconds importing): the test session runs
# Triton in its interpreter, which cannot compile Gluon. Each job: the attention kernel's constants (its cubin
# and shared memory written to out/i.cubin and out/i.json), {"merge_wait": bool} (the merge's PTX to out/i.ptx),
# or {"tiles": constants} (the Triton-language attention kernel's cubin to out/i.cubin).
COMPILE = """
import json, os, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource
from tqlab.kernels import decode, decode_mma

pointers = {
    "query": "*fp32", "k_codes": "*u8", "k_norms": "*fp16", "v_codes": "*u8", "v_norms": "*fp16",
    "k_table": "*fp16", "v_table": "*fp16", "lengths": "*i32", "starts": "*i32", "part_out": "*fp32",
    "part_lse": "*fp32", "scale_log2": "fp32", "key_mean": "*fp32", "value_mean": "*fp32", "out": "*fp32",
    "out_lse": "*fp32", "q_sketch": "*fp32", "k_signs": "*u8", "k_residual_norms": "*fp16", "v_signs": "*u8",
    "v_residual_norms": "*fp16", "k_qjl_scale": "fp32",
}
target = GPUTarget("cuda", 90, 32)
for number, job in enumerate(json.loads(sys.argv[1])):
    out = os.path.join(sys.argv[2], str(number))
    if "merge_wait" in job:
        constants = dict(
            KV_HEADS=8, GROUP=4, Q_LEN=1, DIM=128, BLOCK_M=8, BLOCK_S=256, BLOCK_D=32, WAIT=job["merge_wait"]
        )
        names = decode._merge_chunks.arg_names
        signature = {n: "constexpr" if n in constants else pointers.get(n, "i32") for n in names}
        source = ASTSource(fn=decode._merge_chunks, signature=signature, constexprs=constants)
        open(out + ".ptx", "w").write(triton.compile(source, target=target, options=dict(launch_pdl=True)).asm["ptx"])
        continue
    if "tiles" in job:
        constants = job["tiles"]
        names = decode._attend_chunk.arg_names
        signature = {n: "constexpr" if n in constants else pointers.get(n, "i32") for n in names}
        source = ASTSource(fn=decode._attend_chunk, signature=signature, constexprs=constants)
        options = dict(num_warps=decode.NUM_WARPS, num_stages=decode.NUM_STAGES)
        open(out + ".cubin", "wb").write(triton.compile(source, target=target, options=options).asm["cubin"])
        continue
    names = decode_mma._attend_chunk_mma.arg_names
    signature = {n: "constexpr" if n in job else pointers.get(n, "i32") for n in names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if "stride" in n or "codes" in n}
    source = GluonASTSource(fn=decode_mma._attend_chunk_mma, signature=signature, constexprs=job, attrs=aligned)
    kernel = triton.compile(source, target=target, options={**decode_mma.LAUNCH, "num_warps": job.get("WARPS", 1)})
    open(out + ".cubin", "wb").write(kernel.asm["cubin"])
    open(out + ".json", "w").write(json.dumps({"shared": kernel.metadata.shared}))
open(os.path.join(sys.argv[2], "done"), "w").close()
"""


CASES = [  # dim, k_bits, v_bits, group, q_len, means, lookup, launch_merge
    (128, 4, 4, 4, 1, False, False, True),
    (128, 3, 2, 6, 1, False, False, False),
    (256, 2, 4, 8, 1, False, False, True),
    (64, 4, 2, 4, 4, True, False, False),  # centered codes: the means' terms after the loop
    (64, 3, 3, 4, 1, False, False, True),
    (256, 3, 3, 4, 1, False, False, False),
    (128, 4, 4, 4, 1, False, True, True),  # 3- and 4-bit keys from the pair table
    (128, 4, 3, 8, 1, True, True, False),
    (256, 4, 2, 4, 1, False, True, True),
    (128, 3, 3, 4, 1, False, True, False),
    (256, 3, 4, 2, 2, False, True, True),
]
# Programs of two warps, head_dim 128: bits of keys and values, group, means, launch_merge
TWO_WARP_CASES = [(4, 6, False, True), (3, 6, False, False), (2, 8, True, True)]
MERGE_WAITS = [True, False]
TILES = dict(  # the Triton-language kernel, launched ahead of its merge
    KV_HEADS=8, GROUP=4, Q_LEN=1, DIM=128, K_BITS=4, V_BITS=4, BLOCK_M=16, BLOCK_N=128, PERMUTE=True, PADDED=True,
    K_SKETCH=False, V_SKETCH=False, KEY_MEAN=False, VALUE_MEAN=False, LAUNCH_MERGE=True,
)  # fmt: skip


def tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def available() -> bool:
    """Gluon, and the CUDA tools that compile and disassemble the kernels."""
    try:
        import triton.experimental.gluon  # noqa: F401
    except ImportError:
        return False
    return os.path.exists(tool("ptxas")) and os.path.exists(tool("nvdisasm"))


def jobs() -> list[dict]:
    """`COMPILE`'s jobs: CASES first, then the merges of MERGE_WAITS, then TILES, then TWO_WARP_CASES."""
    from tqlab.kernels import decode_mma

    return [
        dict(
            KV_HEADS=8, GROUP=group, Q_LEN=q_len, DIM=dim, K_BITS=k_bits, V_BITS=v_bits, ROWS=max(8, group * q_len),
            BLOCK_N=decode_mma.block_keys(dim), PADDED=True, KEY_MEAN=means, VALUE_MEAN=means, LOOKUP_KEYS=lookup,
            LAUNCH_MERGE=launch_merge, WARPS=1,
        )
        for dim, k_bits, v_bits, group, q_len, means, lookup, launch_merge in CASES
    ] + [{"merge_wait": wait} for wait in MERGE_WAITS] + [{"tiles": TILES}] + [
        dict(
            KV_HEADS=2, GROUP=group, Q_LEN=1, DIM=128, K_BITS=bits, V_BITS=bits, ROWS=8, BLOCK_N=32, PADDED=True,
            KEY_MEAN=means, VALUE_MEAN=means, LOOKUP_KEYS=False, LAUNCH_MERGE=launch_merge, WARPS=2,
        )
        for bits, group, means, launch_merge in TWO_WARP_CASES
    ]  # fmt: skip


def folder(tmp_path_factory) -> Path:
    """One per test session: pytest-xdist's workers share the folder above their own temporary ones."""
    session = tmp_path_factory.getbasetemp()
    return (session.parent if os.environ.get("PYTEST_XDIST_WORKER") else session) / "decode_mma_compiled"


_started = []  # the compile's process, kept so that it is not collected while it runs


def start(out: Path) -> None:
    """Starts the compile into `out` unless a process of this session has (whichever creates `out` first)."""
    try:
        out.mkdir()
    except FileExistsError:
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with open(out / "log", "w") as log:
        command = [sys.executable, "-c", COMPILE, json.dumps(jobs()), str(out)]
        _started.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env))


def wait(out: Path, timeout: float = 900) -> None:
    """Until the compile into `out` has written its last file; its log on failure (seen in the log by any
    process, or by its exit status in the process that started it)."""
    start(out)  # unless started already
    deadline = time.monotonic() + timeout
    while not (out / "done").exists():
        log = (out / "log").read_text() if (out / "log").exists() else ""
        exited = [p.returncode for p in _started if p.poll() is not None and p.returncode != 0]
        assert not exited and "Traceback" not in log, f"the compile failed ({exited}): {log[-3000:]}"
        assert time.monotonic() < deadline, f"no compile within {timeout:.0f} s; its log: {log[-3000:]}"
        time.sleep(0.2)
