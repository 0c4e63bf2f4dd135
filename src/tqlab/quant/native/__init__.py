"""The compiled CPU encode: TurboQuant's quantize of a vector in one pass instead of a dozen tensor passes.

`encode.c` (plain C, no Python or torch headers) takes a row from x to its packed codes: norm, fast Hadamard
rotation, nearest-centroid codes, `pack_bits`' layout and Prod's Stage-1 residual, whose QJL projection stays a
torch product (MKL's, at the core's peak) and whose signs C packs after it. It is compiled once per source,
compiler flags and CPU model with the system C compiler ($CC, else `cc`, else `gcc`) into $TQLAB_CACHE/native
(default ~/.cache/tqlab/native) and loaded with ctypes. Where no compiler works, the codecs keep their PyTorch
path and say so once in the log; TQLAB_NATIVE=0 chooses that path outright. With several torch threads the pass runs on torch's own OpenMP team
(`_openmp`), whose threads would otherwise spin through it between the QJL products (docs/benchmarks.md, "The
CPU target").
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ...paths import cache_root
from .. import codes

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("encode.c")
MAX_DIM = 8192  # encode.c's MAX_DIM: its per-row buffers live on the stack
MAX_BITS = 4  # up to 15 boundaries: one compare pass each
# -march=native first (the library is built where it runs, and keyed by the CPU below); plain -O3 where a
# compiler refuses it
FLAG_SETS = (("-O3", "-march=native"), ("-O3",))
CHUNK_ELEMENTS = 1 << 14  # rows a thread claims at a time: 64 at d = 256, ~16 µs of work
# smaller passes stay on the calling thread (a parallel region costs a few µs)
PARALLEL_MIN_ELEMENTS = 1 << 15

_pointer, _i64 = ctypes.c_void_p, ctypes.c_int64


def _cpu_identity() -> str:
    """The CPU's model and instruction sets: a library built with -march=native must not run on another CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def build(directory: Path | None = None, compiler: str | None = None) -> Path:
    """Compile encode.c (or find it compiled) and return the shared library's path. Raises RuntimeError, with
    the compiler's output, where no flag set compiles. The file is written under a temporary name and renamed,
    so processes building at once never load a half-written library. compiler: a command ($CC, e.g. "ccache
    gcc"), default `cc`, else `gcc`."""
    compiler = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or "cc"
    directory = directory or cache_root() / "native"
    source = SOURCE.read_bytes()

    def target(flags: tuple[str, ...]) -> Path:
        key = b"\0".join([source, compiler.encode(), " ".join(flags).encode(), _cpu_identity().encode()])
        return directory / f"encode-{hashlib.sha256(key).hexdigest()[:16]}.so"

    built = [target(flags) for flags in FLAG_SETS if target(flags).exists()]
    if built:  # the first flag set that compiled here before
        return built[0]
    errors = []
    for flags in FLAG_SETS:
        directory.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=directory, suffix=".so.partial")
        os.close(handle)
        command = [*shlex.split(compiler), *flags, "-shared", "-fPIC", "-o", partial, str(SOURCE), "-lm"]
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as error:
            run = None
            errors.append(f"{compiler} {' '.join(flags)}: {error}")
        if run is not None and run.returncode == 0:
            os.replace(partial, target(flags))
            return target(flags)
        Path(partial).unlink(missing_ok=True)
        if run is not None:
            errors.append(f"{compiler} {' '.join(flags)}: {run.stderr.strip()[-2000:]}")
    raise RuntimeError("could not compile " + str(SOURCE) + ":\n" + "\n".join(errors))


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded library, or None (TQLAB_NATIVE=0, or no compiler: logged once). Decided once per process:
    set TQLAB_NATIVE before the first quantize."""
    if os.environ.get("TQLAB_NATIVE", "1") == "0":
        return None
    try:
        path = build()
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError) as error:
        log.warning(
            "tqlab's compiled CPU encode is unavailable, the codecs use their PyTorch path: %s", error
        )
        return None
    lib.tq_encode_job.restype = None
    lib.tq_encode_job.argtypes = [_pointer]
    lib.tq_pack_signs.restype = None
    lib.tq_pack_signs.argtypes = [_pointer, _i64, _i64, _pointer]
    return lib


class _Job(ctypes.Structure):
    """encode.c's job_t: one encode of `rows` rows, in chunks of `chunk` rows that threads claim (`next`)."""

    _fields_ = [
        ("x", _pointer), ("rows", _i64), ("d", _i64), ("signs_in", _pointer), ("scaled_signs_out", _pointer),
        ("boundaries", _pointer), ("n_boundaries", _i64), ("centroids", _pointer), ("bits", _i64),
        ("packed", _pointer), ("row_bytes", _i64), ("norms", _pointer), ("residual", _pointer),
        ("residual_norms", _pointer), ("chunk", _i64), ("next", _i64),
    ]  # fmt: skip


@functools.cache
def _openmp():
    """GOMP_parallel as torch's CPU library binds it, or None (not Linux, or torch's threads are not OpenMP's).

    The pass runs on torch's own thread team (GOMP_parallel: libgomp's entry, which LLVM's and Intel's runtimes
    export too; looked up through libtorch_cpu's handle, whose search covers the libraries it was linked
    against): the threads that torch's products leave spinning for their next region take rows of the pass
    instead of competing with threads of ours for the cores."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)  # address, permissions, offset, device, inode, path
        path = fields[5].removesuffix(" (deleted)") if len(fields) == 6 else ""
        if Path(path).name.startswith("libtorch_cpu."):
            try:
                parallel = ctypes.CDLL(path).GOMP_parallel
            except (OSError, AttributeError):
                return None
            parallel.restype, parallel.argtypes = None, [_pointer, _pointer, ctypes.c_uint, ctypes.c_uint]
            return parallel
    return None


# a forked child: libgomp's thread team does not survive fork, so the child stays on one thread
_forked = False


def _after_fork_in_child() -> None:
    global _forked
    _forked = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def _run(job: _Job) -> None:
    """tq_encode_job over the job, on torch's threads where there are several and the job is big enough."""
    lib, threads = library(), torch.get_num_threads()
    big = job.rows * job.d >= PARALLEL_MIN_ELEMENTS
    if threads > 1 and big and not _forked and (parallel := _openmp()) is not None:
        parallel(ctypes.cast(lib.tq_encode_job, _pointer).value, ctypes.addressof(job), threads, 0)
    else:
        lib.tq_encode_job(ctypes.addressof(job))


def applies(x: torch.Tensor, bits: int) -> bool:
    """Whether `encode` takes x ([rows, d] float32 on the CPU) at this many bits per code."""
    return (
        x.device.type == "cpu" and x.dtype == torch.float32 and x.ndim == 2
        and 1 <= bits <= MAX_BITS and 0 < x.shape[1] <= MAX_DIM and library() is not None
    )  # fmt: skip


def encode(
    x: torch.Tensor,
    bits: int,
    boundaries: torch.Tensor,
    centroids: torch.Tensor,
    hadamard: tuple[torch.Tensor, torch.Tensor] | None,
    projection: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Codes of x [rows, d] (`applies(x, bits)`): packed [rows, packed_row_bytes(d, bits)] uint8, norms, and
    with a QJL projection S [m, d] (Prod) the packed signs of S·r [rows, ⌈m/8⌉] and ‖r‖ of the Stage-1 residual
    r = y − c[idx] (float32; else None).

    hadamard = (D1, D2/√d): x is raw, rotated here by fast Hadamard (d a power of two), and its norms returned;
    None: x holds rotated unit vectors already, and norms is None.
    The product S·r runs in torch over blocks of rows whose residual and product stay in a core's L2
    (`codes.CPU_BLOCK_ELEMENTS`), in buffers reused from block to block.
    """
    lib = library()  # for the signs
    rows, d = x.shape
    x = x.detach().float().contiguous()
    row_bytes = (d + 7) // 8 * bits
    packed = torch.empty(rows, row_bytes, dtype=torch.uint8)
    norms = torch.empty(rows, dtype=torch.float32) if hadamard else None
    boundaries, centroids = boundaries.float().contiguous(), centroids.float().contiguous()
    signs_in, signs_out = (t.float().contiguous() for t in hadamard) if hadamard else (None, None)

    def encode_rows(first: int, count: int, residual=None, residual_norms=None) -> None:
        _run(_Job(
            x.data_ptr() + 4 * first * d, count, d, _address(signs_in), _address(signs_out), boundaries.data_ptr(),
            len(boundaries), centroids.data_ptr(), bits, packed.data_ptr() + first * row_bytes, row_bytes,
            None if norms is None else norms.data_ptr() + 4 * first, _address(residual),
            None if residual_norms is None else residual_norms.data_ptr() + 4 * first,
            max(1, CHUNK_ELEMENTS // d), 0,
        ))  # fmt: skip

    if projection is None:
        encode_rows(0, rows)
        return packed, norms, None, None
    m = projection.shape[0]
    signs = torch.empty(rows, (m + 7) // 8, dtype=torch.uint8)
    residual_norms = torch.empty(rows, dtype=torch.float32)
    block = max(1, min(rows, codes.CPU_BLOCK_ELEMENTS * torch.get_num_threads() // d))
    residual, projected = (torch.empty(block, n, dtype=torch.float32) for n in (d, m))
    weights = projection.detach().float().T
    for first in range(0, rows, block):
        count = min(block, rows - first)
        encode_rows(first, count, residual, residual_norms)
        torch.mm(residual[:count], weights, out=projected[:count])
        lib.tq_pack_signs(projected.data_ptr(), count, m, signs.data_ptr() + first * signs.shape[1])
    return packed, norms, signs, residual_norms


def _address(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
