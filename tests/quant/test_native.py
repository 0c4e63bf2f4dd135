"""The compiled CPU encode (`tqlab.quant.native`) against a float64 reference of the same codec, the bit-stream
reference of the packing, and the PyTorch path it stands in for."""

import logging
import multiprocessing
import shutil

import pytest
import torch
from test_packing import reference_pack

from tqlab.quant import TurboQuantMSE, TurboQuantProd, codes, native, unpack_bits

pytestmark = pytest.mark.skipif(
    native.library() is None, reason="no C compiler: the codecs use their torch path"
)

NEAR_TIE = 1e-5  # float32 rounding of a unit vector's coordinates is ~1e-7: a code may differ only this close


def rows(n: int, dim: int, seed: int) -> torch.Tensor:
    """Gaussian rows, with a zero row, a tiny one (its squares underflow float32) and a huge one among them."""
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    x[1] = 0
    x[2] *= 1e-30
    x[3] *= 1e30
    return x


def reference(codec: TurboQuantMSE, x: torch.Tensor):
    """Unit vectors rotated by the dense rotation in float64, their codes and distance to the nearest boundary."""
    x64 = x.double()
    norms = x64.norm(dim=-1)
    y = (x64 / norms.clamp_min(torch.finfo(torch.float32).tiny)[:, None]) @ codec.rotation.dense().double().T
    boundaries = codec.boundaries.double()
    codes = (y[..., None] > boundaries).sum(-1)
    margin = (y[..., None] - boundaries).abs().amin(-1)
    return norms, y, codes, margin


@pytest.fixture
def native_calls(monkeypatch):
    """How many times the codecs went through the native encode (so a silent fallback fails the test)."""
    calls, encode = [], native.encode
    monkeypatch.setattr(native, "encode", lambda *args: calls.append(len(args[0])) or encode(*args))
    return calls


def torch_path(monkeypatch, quantize, *args):
    with monkeypatch.context() as patch:
        patch.setattr(native, "library", lambda: None)
        return quantize(*args)


@pytest.mark.parametrize("dim", [8, 16, 64, 128, 256, 1024])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_fast_hadamard_codes_and_norms_match_float64(dim, bits, native_calls):
    """Norms in double: a tiny row (whose float32 squares underflow) and a huge one (overflow) keep theirs."""
    codec = TurboQuantMSE(dim, bits, rotation="fast_hadamard", seed=dim + bits, norm_dtype=torch.float32)
    x = rows(37, dim, seed=bits)
    code = codec.quantize(x)
    norms, _, expected, margin = reference(codec, x)
    codes = unpack_bits(code.indices, bits, dim)
    clear = margin > NEAR_TIE
    assert clear.float().mean() > 0.95  # the zero row lies on the middle boundary
    assert torch.equal(codes[clear], expected[clear])
    for r in range(len(x)):  # the layout: pack_bits' little-endian bit stream
        assert code.indices[r].tolist() == reference_pack(codes[r].tolist(), bits)
    torch.testing.assert_close(code.norms.double(), norms, rtol=1e-6, atol=0)
    assert native_calls == [37]


@pytest.mark.parametrize(("dim", "qjl_dim"), [(16, 16), (128, 13), (256, 256)])
@pytest.mark.parametrize("bits", [2, 3, 5])
def test_prod_residual_norms_and_signs_match_float64(dim, qjl_dim, bits, native_calls, monkeypatch):
    """Signs of S·r at any sketch width (13 pads its last byte), over blocks of 128 rows of the product."""
    monkeypatch.setattr(codes, "CPU_BLOCK_ELEMENTS", (128 * dim) // torch.get_num_threads())
    codec = TurboQuantProd(
        dim, bits, rotation="fast_hadamard", seed=dim, qjl_dim=qjl_dim, norm_dtype=torch.float32
    )
    # without the zero, tiny and huge rows: Stage 1's test has them
    x = rows(1200 if dim == 256 else 41, dim, seed=dim + bits)[4:]
    code = codec.quantize(x)
    _, y, idx, margin = reference(codec.mse, x)
    residual = y - codec.mse.centroids.double()[idx]
    projected = residual @ codec.projection.double().T
    clear_rows = (margin > NEAR_TIE).all(-1)  # a row's residual changes wherever one of its codes does
    assert clear_rows.float().mean() > 0.6
    signs = unpack_bits(code.signs, 1, qjl_dim).bool()
    clear = clear_rows[:, None] & (projected.abs() > 1e-4)
    assert torch.equal(signs[clear], (projected >= 0)[clear])
    for r in range(0, len(x), 97):  # the layout, padding bits included
        assert code.signs[r].tolist() == reference_pack(signs[r].int().tolist(), 1)
    assert native_calls == [len(x)]
    torch.testing.assert_close(
        code.residual_norms[clear_rows].double(), residual.norm(dim=-1)[clear_rows], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("codec_class", [TurboQuantMSE, TurboQuantProd])
@pytest.mark.parametrize(
    ("dim", "rotation"), [(96, "random_haar"), (100, "random_haar"), (64, "block_so8_static")]
)
def test_other_rotations_give_the_torch_path_codes_exactly(
    monkeypatch, codec_class, dim, rotation, native_calls
):
    """Rotated by torch either way, so the codes, norms and signs are equal bit for bit (d = 100 pads its codes);
    the residual norms up to their summation order."""
    codec = codec_class(dim, 3, rotation=rotation, seed=1)
    x = torch.randn(5, 7, dim, generator=torch.Generator().manual_seed(2), dtype=torch.bfloat16)
    compiled = codec.quantize(x)
    assert native_calls == [35]
    tensors = torch_path(monkeypatch, codec.quantize, x)
    for name in ("indices", "signs", "norms"):
        if hasattr(compiled, name):
            assert torch.equal(getattr(compiled, name), getattr(tensors, name)), name
    if codec_class is TurboQuantProd:
        torch.testing.assert_close(
            compiled.residual_norms.float(), tensors.residual_norms.float(), rtol=1e-3, atol=0
        )


def test_a_zero_vector_codes_as_on_the_torch_path(monkeypatch, native_calls):
    codec = TurboQuantProd(64, 3, rotation="fast_hadamard")
    x = torch.zeros(3, 64)
    compiled, tensors = codec.quantize(x), torch_path(monkeypatch, codec.quantize, x)
    assert native_calls == [3]
    for name in ("indices", "signs", "norms", "residual_norms"):
        assert torch.equal(getattr(compiled, name), getattr(tensors, name)), name


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_are_refused_as_on_the_torch_path(bad):
    x = torch.randn(4, 64)
    x[2, 5] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        TurboQuantProd(64, 3, rotation="fast_hadamard").quantize(x)


def test_a_failed_compile_names_the_source_and_the_compiler_output(tmp_path):
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: fatal error: no input files' >&2\nexit 1\n")
    broken.chmod(0o755)
    with pytest.raises(RuntimeError, match=r"encode\.c(.|\n)*no input files"):
        native.build(tmp_path / "cache", compiler=str(broken))
    assert not list((tmp_path / "cache").glob("*"))  # no half-written library left behind


def test_a_build_is_reused_and_keyed_by_compiler(tmp_path):
    first = native.build(tmp_path / "cache")
    assert native.build(tmp_path / "cache") == first
    assert {p.name for p in (tmp_path / "cache").iterdir()} == {first.name}
    wrapper = tmp_path / "my cc"  # another compiler command (with a space in its path: split as a command)
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("cc") or "gcc"} "$@"\n')
    wrapper.chmod(0o755)
    other = native.build(tmp_path / "cache", compiler=f"'{wrapper}'")
    assert other != first and other.exists()


def test_without_a_compiler_the_codecs_say_so_once_and_keep_the_torch_path(monkeypatch, tmp_path, caplog):
    codec = TurboQuantMSE(64, 2, rotation="fast_hadamard")
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(0))
    expected = codec.quantize(x)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TQLAB_CACHE", str(tmp_path))
    native.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="tqlab.quant.native"):
            assert native.library() is None
            code = codec.quantize(x)
            codec.quantize(x)
        said = [r.message for r in caplog.records if "PyTorch path" in r.message]
        assert len(said) == 1 and "no-such-compiler" in said[0]
        assert torch.equal(unpack_bits(code.indices, 2, 64), unpack_bits(expected.indices, 2, 64))
        monkeypatch.setenv("TQLAB_NATIVE", "0")
        monkeypatch.delenv("CC")
        native.library.cache_clear()
        assert native.library() is None  # chosen outright, nothing built
        assert not list(tmp_path.rglob("*.so"))
    finally:
        native.library.cache_clear()


def test_a_float64_default_dtype_or_codec_codes_as_float32(native_calls):
    """The native buffers are float32 whatever torch's default dtype; a codec moved to float64 still codes."""
    codec = TurboQuantProd(128, 3, rotation="fast_hadamard", seed=3)
    x = torch.randn(50, 128, generator=torch.Generator().manual_seed(4))
    expected = codec.quantize(x)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        code = codec.quantize(x)
    finally:
        torch.set_default_dtype(before)
    wide = codec.to(torch.float64).quantize(x)
    assert native_calls == [50, 50, 50]
    for other in (code, wide):
        for name in ("indices", "signs", "norms", "residual_norms"):
            assert torch.equal(getattr(other, name), getattr(expected, name)), name


@pytest.mark.parametrize(
    ("codec_class", "rotation"),
    [(TurboQuantProd, "fast_hadamard"), (TurboQuantProd, "random_haar"), (TurboQuantMSE, "fast_hadamard")],
)
def test_on_torchs_threads_every_row_codes_as_on_one(monkeypatch, codec_class, rotation):
    """With two torch threads the pass runs on torch's OpenMP team, its rows claimed in chunks that do not divide
    them: the same bytes as one thread writes, every row included (the team's run first, so that no output can
    be memory that the single-threaded run left behind)."""
    parallel = native._openmp()
    if parallel is None:
        pytest.skip("torch's parallel backend is not OpenMP here")
    monkeypatch.setattr(native, "CHUNK_ELEMENTS", 7 * 256)  # chunks of 7 rows
    codec = codec_class(256, 4, rotation=rotation, seed=5)
    x = torch.randn(3001, 256, generator=torch.Generator().manual_seed(6))
    teams = []
    monkeypatch.setattr(native, "_openmp", lambda: lambda *args: teams.append(args[2]) or parallel(*args))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        together = codec.quantize(x)
        torch.set_num_threads(1)
        alone = codec.quantize(x)
    finally:
        torch.set_num_threads(before)
    assert teams and set(teams) == {2}
    for name in ("indices", "signs", "norms", "residual_norms"):
        if hasattr(alone, name):
            assert torch.equal(getattr(together, name), getattr(alone, name)), name


def _quantize_in_a_forked_child(codec, x, results) -> None:
    torch.set_num_threads(2)
    results.put(codec.quantize(x).indices.numpy().tobytes())  # bytes: no tensor sharing across processes


def test_a_forked_child_codes_on_one_thread_instead_of_hanging():
    """libgomp's thread team does not survive fork: after the parent ran the pass on it, a forked child must
    not call into it (it would wait forever for threads that do not exist)."""
    if native._openmp() is None:
        pytest.skip("torch's parallel backend is not OpenMP here")
    codec = TurboQuantMSE(256, 3, rotation="fast_hadamard")
    x = torch.randn(2048, 256, generator=torch.Generator().manual_seed(7))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = codec.quantize(x).indices
    finally:
        torch.set_num_threads(before)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_quantize_in_a_forked_child, args=(codec, x, results))
    child.start()
    try:
        assert results.get(timeout=60) == expected.numpy().tobytes()
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
