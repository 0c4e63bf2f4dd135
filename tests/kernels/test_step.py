"""A step's two ends in one launch each (rotate the query in; rotate back, join the own exact token) against
float64."""

import pytest
import torch

pytest.importorskip("triton")

from tqlab.kernels.step import finish_step, rotate_queries  # noqa: E402
from tqlab.quant import TurboQuantMSE  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def case(batch, kv_heads, group, dim, seed):
    g = torch.Generator().manual_seed(seed)
    rotations = torch.stack(
        [
            TurboQuantMSE(dim, 2, rotation="random_haar", seed=seed + h).rotation.matrix()
            for h in range(kv_heads)
        ]
    ).float()
    out = torch.randn(batch, kv_heads * group, 1, dim, generator=g)
    lse = 3 * torch.randn(batch, kv_heads * group, 1, generator=g)
    lse[0, -1] = float("-inf")  # a row that saw no code
    query = torch.randn(batch, kv_heads * group, 1, dim, generator=g)
    keys, values = (torch.randn(batch, kv_heads, 1, dim, generator=g).bfloat16() for _ in "kv")
    return rotations, out, lse, query, keys, values


@pytest.mark.parametrize(  # the model's dtype for the query, and a strided view of it
    "batch,kv_heads,group,dim,model_query",
    [(1, 2, 6, 128, True), (2, 1, 4, 64, False), (2, 2, 16, 256, True)],
)
def test_rotated_back_and_joined_as_one_float64_softmax(batch, kv_heads, group, dim, model_query):
    rotations, out, lse, query, keys, values = case(batch, kv_heads, group, dim, seed=dim + group)
    scaling = dim**-0.5
    on = [t.to(DEVICE) for t in (out, lse, rotations, query, keys, values)]
    if model_query:
        query = query.bfloat16()  # the float64 reference below reads the same bf16 values
        wide = torch.zeros(*query.shape[:-1], 2 * dim, dtype=query.dtype)
        wide[..., ::2] = query
        on[3] = wide.to(DEVICE)[..., ::2]
        assert not on[3].is_contiguous()
    rotated = finish_step(*on[:3]).cpu().double()
    joined = finish_step(*on, scaling=scaling).cpu().double()
    heads = out.double().unflatten(1, (kv_heads, group))  # [B, KVH, G, 1, d]
    back = torch.einsum("bhgtd,hde->bhgte", heads, rotations.double())
    torch.testing.assert_close(rotated, back.flatten(1, 2), rtol=0, atol=1e-5)
    q = query.double().unflatten(1, (kv_heads, group))
    logit = torch.einsum("bhgtd,bhnd->bhgtn", q, keys.double()) * scaling
    weights = torch.softmax(
        torch.cat([lse.double().unflatten(1, (kv_heads, group))[..., None], logit], -1), -1
    )
    want = weights[..., :1] * back + weights[..., 1:] * values.double()[:, :, None]
    torch.testing.assert_close(joined, want.flatten(1, 2), rtol=0, atol=1e-5)
    assert torch.equal(joined[0, -1], values[0, -1, 0].double()[None].expand(1, dim))  # no codes: v alone


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_models_dtype_is_stored_as_a_cast_of_the_fp32_result_rounds(dtype):
    rotations, out, lse, query, keys, values = case(2, 2, 6, 128, seed=5)
    on = [t.to(DEVICE) for t in (out, lse, rotations, query, keys, values)]
    for joined in (on[3:], [None] * 3):
        wide = finish_step(*on[:3], *joined, scaling=0.1)
        assert torch.equal(finish_step(*on[:3], *joined, scaling=0.1, dtype=dtype), wide.to(dtype))


def test_bfloat16_rounds_to_nearest_even_as_torch_does():
    """Through an identity rotation (exact in fp32): ties at the 16th bit, values that overflow to ±inf, NaN."""
    g = torch.Generator().manual_seed(0)
    sign = torch.randint(0, 2, (16, 32), generator=g, dtype=torch.int32) << 31
    exponent = torch.randint(100, 150, (16, 32), generator=g, dtype=torch.int32) << 23
    bits = sign | exponent | torch.randint(0, 1 << 23, (16, 32), generator=g, dtype=torch.int32)
    bits[::2] = bits[::2] & ~0xFFFF | 0x8000  # exact ties: half round up, half down (to the even one)
    out = bits.view(torch.float32).clone()
    out[1, :2] = torch.finfo(torch.float32).max * torch.tensor([1.0, -1.0])  # rounds to ±inf
    tiny = torch.finfo(torch.float32).tiny
    out[2, :4] = torch.tensor([tiny, -tiny, tiny / 3, -tiny / 1000])  # the smallest normal, subnormals
    out[3, 5] = float("nan")  # the dot spreads it over its row
    out = out.reshape(1, 16, 1, 32).to(DEVICE)
    identity = torch.eye(32)[None].to(DEVICE)
    wide = finish_step(out, None, identity)
    assert torch.equal(wide[:, 4:], out[:, 4:])  # the ties reach the rounding as they are
    stored = finish_step(out, None, identity, dtype=torch.bfloat16)
    torch.testing.assert_close(stored, wide.to(torch.bfloat16), rtol=0, atol=0, equal_nan=True)
    assert torch.isinf(stored[0, 1, 0, :2]).all() and torch.isnan(stored[0, 3]).all()


@pytest.mark.parametrize("batch,kv_heads,group,dim", [(1, 2, 6, 128), (2, 4, 1, 64), (1, 1, 16, 256)])
def test_queries_rotated_per_kv_head(batch, kv_heads, group, dim):
    rotations, _, _, query, _, _ = case(batch, kv_heads, group, dim, seed=3 * dim + group)
    query = query.bfloat16()  # as a model hands it over: read as fp32 inside
    rotated = rotate_queries(query.to(DEVICE), rotations.to(DEVICE)).cpu().double()
    heads = query.double().unflatten(1, (kv_heads, group))  # [B, KVH, G, 1, d]
    want = torch.einsum("bhgtd,hed->bhgte", heads, rotations.double())  # Πq per head: R_h @ q
    torch.testing.assert_close(rotated, want.flatten(1, 2), rtol=0, atol=1e-5)


def test_shapes_it_cannot_take_are_refused():
    rotations, out, lse, query, keys, values = case(1, 2, 2, 64, seed=0)
    with pytest.raises(ValueError, match="one query token"):
        finish_step(out.expand(1, 4, 2, 64), lse, rotations)
    with pytest.raises(ValueError, match="KVH dividing"):
        rotate_queries(query[:, :3], rotations)
    with pytest.raises(ValueError, match="and a scaling"):
        finish_step(out, lse, rotations, query, keys, values)
    with pytest.raises(ValueError, match="stores float32, bfloat16 or float16"):
        finish_step(out, lse, rotations, dtype=torch.float64)
    with pytest.raises(ValueError, match="one exact key"):
        finish_step(out, lse, rotations, query, keys.expand(1, 2, 2, 64), values, scaling=1.0)
