"""The storage format and the PyTorch reference path, against float64 math."""
from __future__ import annotations

import pytest
import torch

from attnreuse.kernels import FP8, CachedMap, cached_pv, capture, storage_nbytes
from attnreuse.kernels.reference import merge_heads, split_heads
from tests.helpers import rel_err


def random_qkv(b, h, nq, nk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, nq, h * d, generator=g)
    k = torch.randn(b, nk, h * d, generator=g)
    v = torch.randn(b, nk, h * d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def attention64(q, k, v, heads, scale):
    qh, kh, vh = (split_heads(x.double(), heads) for x in (q, k, v))
    probs = (qh @ kh.transpose(-1, -2) * scale).softmax(-1)
    return probs, merge_heads(probs @ vh)


@pytest.mark.parametrize("map_dtype,bound", [(torch.float32, 1e-6), (torch.float16, 1e-3),
                                             (torch.bfloat16, 8e-3), (FP8, 3e-2)])
@pytest.mark.parametrize("shape", [(2, 3, 33, 77, 40), (1, 2, 64, 64, 80), (1, 1, 5, 3, 16)])
def test_capture_then_reuse_matches_float64(shape, map_dtype, bound):
    b, h, nq, nk, d = shape
    q, k, v = random_qkv(b, h, nq, nk, d, seed=sum(shape))
    scale = d ** -0.5
    out, cmap = capture(q, k, v, h, scale, map_dtype)
    probs64, out64 = attention64(q, k, v, h, scale)
    assert rel_err(out, out64) < 1e-6  # the capture step's own output uses the unquantised map
    assert cmap.dtype == map_dtype and cmap.nbytes == storage_nbytes(b, h, nq, nk, map_dtype)
    assert rel_err(cmap.dequantize(torch.float64), probs64) < bound
    v2 = torch.randn_like(v)  # a later step: fresh values, the cached map
    reused = cached_pv(cmap, v2, h)
    assert reused.shape == (b, nq, h * d) and reused.dtype == v2.dtype
    assert rel_err(reused, merge_heads(probs64 @ split_heads(v2.double(), h))) < bound


def test_fp8_keeps_small_probabilities():
    """Row-max scaling keeps probabilities far below e4m3's smallest normal number (2**-6).

    Relative to the row maximum, e4m3 keeps 3 mantissa bits down to 2**-6 / 448 = 3.5e-5 and stays
    non-zero (subnormal) down to 2**-9 / 448 = 4.4e-6."""
    top = 0.9
    probs = torch.tensor([[[[top, 0.09, 1e-2, 1e-4, 4e-5 * top, 5e-6 * top]]]], dtype=torch.float64)
    back = CachedMap.from_probs(probs, FP8).dequantize(torch.float64)
    assert (back > 0).all()
    assert ((back - probs).abs() / probs)[..., :5].max().item() <= 2 ** -4  # half an ulp of 3 bits


def test_fp16_model_with_fp8_map_does_not_overflow():
    """Scaled fp8 rows sum to ~448·Nk; the product must be formed before casting to fp16."""
    b, h, n, d = 1, 2, 512, 16
    probs = torch.full((b, h, n, n), 1.0 / n)  # uniform rows: every entry is the row maximum
    v = torch.randn(b, n, h * d).half()
    out = cached_pv(CachedMap.from_probs(probs, FP8), v, h)
    assert torch.isfinite(out).all()
    assert rel_err(out, merge_heads(probs.double() @ split_heads(v.double(), h))) < 3e-2


def test_storage_validation():
    data = torch.rand(1, 2, 3, 4)
    with pytest.raises(ValueError, match="needs a per-row scale"):
        CachedMap(data.to(FP8), None)
    with pytest.raises(ValueError, match="only an fp8 map"):
        CachedMap(data, torch.ones(1, 2, 3))
    with pytest.raises(ValueError, match="contiguous"):
        CachedMap(data.transpose(2, 3), None)
    with pytest.raises(TypeError, match="not one of"):
        CachedMap(data.to(torch.int8), None)
    with pytest.raises(ValueError, match="scale must be"):
        CachedMap(data.to(FP8), torch.ones(1, 2, 4))


def test_map_never_applied_to_other_shapes():
    q, k, v = random_qkv(2, 2, 16, 16, 8)
    _, cmap = capture(q, k, v, 2, 0.3, torch.float16)
    for bad_v, heads in ((v[:1], 2), (v[:, :8], 2), (v, 4)):
        with pytest.raises(ValueError, match="another batch, resolution or layer"):
            cached_pv(cmap, bad_v, heads)
