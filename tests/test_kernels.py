"""Triton kernels against float64 math (Triton's interpreter on the CPU, the real thing on a GPU)."""
from __future__ import annotations

import pytest
import torch

from attnreuse.kernels import FP8, CachedMap
from attnreuse.kernels.reference import merge_heads, split_heads
from attnreuse.kernels.triton_ops import cached_pv_into, cached_pv_op, capture_into, capture_op, capture_triton
from tests.helpers import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (batch, heads, q tokens, kv tokens, head dim): odd token counts, cross-attention's 77 keys, SD head dims
SHAPES = [(2, 2, 37, 77, 40), (1, 3, 61, 45, 80), (1, 1, 19, 33, 160), (2, 1, 16, 16, 64)]
BOUND = {torch.float16: 1e-3, FP8: 3e-2}


def inputs(shape, dtype=torch.float16, seed=0):
    b, h, nq, nk, d = shape
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, n, h * d, generator=g) * s).to(DEVICE, dtype)
            for n, s in ((nq, 1.5), (nk, 1.5), (nk, 1.0))]


def probs64(q, k, heads, scale):
    return (split_heads(q.double(), heads) @ split_heads(k.double(), heads).transpose(-1, -2) * scale).softmax(-1)


def poisoned_map(b, h, nq, nk, map_dtype):
    """A map buffer full of NaN (0x7F is e4m3fn's NaN byte) and NaN row scales."""
    if map_dtype == FP8:
        return (torch.full((b, h, nq, nk), 0x7F, dtype=torch.uint8, device=DEVICE),
                torch.full((b, h, nq), float("nan"), device=DEVICE))
    return torch.full((b, h, nq, nk), float("nan"), dtype=map_dtype, device=DEVICE), torch.empty(0, device=DEVICE)


def as_cached_map(amap, rscale):
    return CachedMap(amap.view(FP8), rscale) if amap.dtype == torch.uint8 else CachedMap(amap, None)


@pytest.mark.parametrize("map_dtype", [torch.float16, FP8])
@pytest.mark.parametrize("shape", SHAPES)
def test_cached_pv(shape, map_dtype):
    b, h, nq, nk, d = shape
    q, k, v = inputs(shape, seed=sum(shape))
    p = probs64(q, k, h, d ** -0.5)
    cmap = CachedMap.from_probs(p.float(), map_dtype)
    fp8 = map_dtype == FP8
    out = torch.full((b, nq, h * d), float("nan"), dtype=v.dtype, device=DEVICE)
    cached_pv_into(out, cmap.data.view(torch.uint8) if fp8 else cmap.data, cmap.scale, v, h)
    assert not out.isnan().any()
    assert rel_err(out, merge_heads(p @ split_heads(v.double(), h))) < BOUND[map_dtype]


@pytest.mark.parametrize("map_dtype", [torch.float16, FP8])
@pytest.mark.parametrize("shape", SHAPES)
def test_capture(shape, map_dtype):
    b, h, nq, nk, d = shape
    q, k, v = inputs(shape, seed=sum(shape) + 1)
    scale = d ** -0.5
    out = torch.full((b, nq, h * d), float("nan"), dtype=v.dtype, device=DEVICE)
    amap, rscale = poisoned_map(b, h, nq, nk, map_dtype)
    capture_into(out, amap, rscale, q, k, v, h, scale)
    p = probs64(q, k, h, scale)
    assert not out.isnan().any()
    assert rel_err(out, merge_heads(p @ split_heads(v.double(), h))) < 2e-3  # fp16 attention tolerance
    cmap = as_cached_map(amap, rscale)
    back = cmap.dequantize(torch.float64)
    assert not back.isnan().any()
    assert rel_err(back, p) < BOUND[map_dtype]
    if map_dtype == FP8:  # the row maximum sits at the top of the e4m3 range
        assert (cmap.data.float().amax(-1) == 448).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_capture_then_reuse_in_model_dtype(dtype):
    """The pair as attnreuse runs it: store at one step, multiply fresh values at the next."""
    shape = (2, 2, 24, 40, 40)
    b, h, nq, nk, d = shape
    q, k, v = inputs(shape, dtype=dtype, seed=5)
    out, cmap = capture_triton(q, k, v, h, d ** -0.5, FP8)
    v2 = torch.randn_like(v)
    data, scale = cmap.data.view(torch.uint8), cmap.scale
    reused = cached_pv_op(data, scale, v2, h)
    assert reused.dtype == dtype and reused.shape == out.shape
    assert rel_err(reused, merge_heads(probs64(q, k, h, d ** -0.5) @ split_heads(v2.double(), h))) < 3e-2


def test_strided_inputs():
    """q/k/v straight out of a fused projection (row stride 3·H·D) need no copy."""
    shape = (1, 2, 20, 20, 40)
    b, h, n, _, d = shape
    qkv = torch.randn(b, n, 3 * h * d, device=DEVICE).half()
    q, k, v = qkv.chunk(3, dim=-1)
    out, cmap = capture_triton(q, k, v, h, d ** -0.5, torch.float16)
    p = probs64(q, k, h, d ** -0.5)
    assert rel_err(out, merge_heads(p @ split_heads(v.double(), h))) < 2e-3


def test_custom_ops_registration():
    shape = (1, 2, 16, 16, 16)
    q, k, v = inputs(shape)
    torch.library.opcheck(capture_op, (q, k, v, 2, 0.25, FP8), test_utils=("test_schema", "test_faketensor"))
    out, amap, rscale = capture_op(q, k, v, 2, 0.25, FP8)
    torch.library.opcheck(cached_pv_op, (amap, rscale, v, 2), test_utils=("test_schema", "test_faketensor"))


def test_rejects_unsupported_dtypes():
    q, k, v = inputs((1, 1, 16, 16, 16))
    with pytest.raises(TypeError, match="fp16, bf16 or fp32 activations"):
        capture_triton(q.double(), k.double(), v.double(), 1, 0.25, torch.float16)
    with pytest.raises(TypeError, match="store maps as"):
        capture_triton(q, k, v, 1, 0.25, torch.int8)
