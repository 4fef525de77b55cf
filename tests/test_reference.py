"""The storage format and the PyTorch reference path, against float64 math."""
from __future__ import annotations

import pytest
import torch

from attnreuse.kernels import FP4, FP8, CachedMap, cached_pv, capture, storage_nbytes
from attnreuse.kernels.reference import merge_heads, split_heads
from attnreuse.kernels.storage import KEY_BLOCK, log3_codes, log3_values
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
                                             (torch.bfloat16, 8e-3), (FP8, 3e-2), (FP4, 0.15)])
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
    """Block-max scaling keeps probabilities far below e4m3's smallest normal number (2**-6).

    Relative to its block's maximum, e4m3 keeps 3 mantissa bits down to 2**-6 / 448 = 3.5e-5 and stays
    non-zero (subnormal) down to 2**-9 / 448 = 4.4e-6."""
    top = 0.9
    probs = torch.tensor([[[[top, 0.09, 1e-2, 1e-4, 4e-5 * top, 5e-6 * top]]]], dtype=torch.float64)
    back = CachedMap.from_probs(probs, FP8).dequantize(torch.float64)
    assert (back > 0).all()
    assert ((back - probs).abs() / probs)[..., :5].max().item() <= 2 ** -4  # half an ulp of 3 bits


def test_fp16_model_with_fp8_map_does_not_overflow():
    """Stored fp8 rows sum to ~448·Nk; the product must be formed before casting to fp16."""
    b, h, n, d = 1, 2, 512, 16
    probs = torch.full((b, h, n, n), 1.0 / n)  # uniform rows: every entry is its block's maximum
    v = torch.randn(b, n, h * d).half()
    out = cached_pv(CachedMap.from_probs(probs, FP8), v, h)
    assert torch.isfinite(out).all()
    assert rel_err(out, merge_heads(probs.double() @ split_heads(v.double(), h))) < 3e-2


def per_row_fp8(probs):
    """The previous format, for comparison: e4m3 scaled by the row maximum."""
    rowmax = probs.amax(-1, keepdim=True)
    return (probs * (448 / rowmax)).to(FP8).double() * (rowmax / 448)


def synthetic_rows(kind, rows=64, keys=4096, seed=0):
    """Softmax rows of Gaussian logits: diffuse (std 1) or peaked (std 4: a few keys hold most mass)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 1, rows, keys, generator=g, dtype=torch.float64) * {"diffuse": 1.0, "peaked": 4.0}[kind]
            ).softmax(-1)


@pytest.mark.parametrize("kind", ["diffuse", "peaked"])
def test_block_format_at_least_as_accurate_as_row_scaling(kind):
    """On long rows (4096 keys) each key block keeps its own range: the map and A·V are no worse than with
    one fp8 scale per row, and fp16 stays at fp16's own rounding."""
    p = synthetic_rows(kind)
    v = torch.randn(1, 4096, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = p @ v
    old = per_row_fp8(p)
    new = CachedMap.from_probs(p, FP8).dequantize(torch.float64)
    assert rel_err(new, p) <= rel_err(old, p) and rel_err(new @ v, ref) <= 1.05 * rel_err(old @ v, ref)
    assert rel_err(new, p) < 3e-2
    assert rel_err(CachedMap.from_probs(p, torch.float16).dequantize(torch.float64), p) < 3e-4


def test_fp4_per_block_scales_keep_the_tail():
    """4-bit log⅓ codes: one scale per key block instead of per row keeps the tail of long diffuse rows, and
    the row-sum correction makes every stored row sum to one."""
    p = synthetic_rows("diffuse")
    v = torch.randn(1, 4096, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rowmax = p.amax(-1, keepdim=True)
    per_row = log3_values()[log3_codes(p / rowmax).long()].double() * rowmax
    cmap = CachedMap.from_probs(p, FP4)
    back = cmap.dequantize(torch.float64)
    assert cmap.data.shape[-1] == 4096 // 2 and cmap.shape == p.shape
    assert (back.sum(-1) - 1).abs().max() < 1e-6
    assert rel_err(back @ v, p @ v) < 0.6 * rel_err(per_row @ v, p @ v)


def test_log3_code():
    """Nearest level 2^(−c/3) in the log domain, zero from 3·log2(max/p) ≥ 17 on; decoded as the kernels do."""
    rel = torch.tensor([1.0, 2 ** (-1 / 3), 2 ** (-1.4 / 3), 2 ** (-1.6 / 3), 2 ** (-14 / 3), 2 ** (-16.9 / 3),
                        2 ** (-17.1 / 3), 0.0], dtype=torch.float64)
    assert log3_codes(rel).tolist() == [0, 1, 1, 2, 14, 14, 15, 15]
    c = torch.arange(16)
    q = (11 * c) >> 5
    bits = 0x3C00 - (q << 10) - torch.tensor([0, 0x1A7, 0x2F6])[c - 3 * q]  # the kernels' decode
    assert torch.equal(torch.where(c == 15, 0, bits).to(torch.int16).view(torch.float16), log3_values())


def test_zero_blocks_and_stats():
    probs = torch.zeros(1, 1, 2, 3 * KEY_BLOCK - 5, dtype=torch.float64)
    probs[..., :KEY_BLOCK] = 1.0 / KEY_BLOCK  # the other blocks underflowed to zero
    for dtype in (torch.float32, torch.float16, FP8, FP4):
        cmap = CachedMap.from_probs(probs, dtype)
        assert cmap.block_max.shape == (1, 1, 3, 2) and cmap.row_lse.shape == (1, 1, 2)
        assert torch.isneginf(cmap.block_max[:, :, 1:]).all()
        assert torch.equal(cmap.dequantize(torch.float64), probs)  # powers of two: exact in every dtype


def test_storage_validation():
    data = torch.rand(1, 2, 3, 4)
    bmax, lse = torch.zeros(1, 2, 1, 3), torch.zeros(1, 2, 3)
    CachedMap(data.to(FP8), bmax, lse)
    with pytest.raises(ValueError, match="block_max must be"):
        CachedMap(data, torch.zeros(1, 2, 3, 1), lse)
    with pytest.raises(ValueError, match="row_lse must be"):
        CachedMap(data, bmax, lse.double())
    with pytest.raises(ValueError, match="contiguous"):
        CachedMap(data.transpose(2, 3), bmax, lse)
    with pytest.raises(TypeError, match="not one of"):
        CachedMap(data.to(torch.int8), bmax, lse)
    packed = torch.zeros(1, 2, 3, KEY_BLOCK // 2, dtype=torch.uint8).view(FP4)
    with pytest.raises(ValueError, match="needs kv_tokens"):
        CachedMap(packed, bmax, lse)
    with pytest.raises(ValueError, match="does not fit"):
        CachedMap(packed, bmax, lse, KEY_BLOCK + 1)
    assert CachedMap(packed, bmax, lse, 77).shape == (1, 2, 3, 77)


def test_map_never_applied_to_other_shapes():
    q, k, v = random_qkv(2, 2, 16, 16, 8)
    _, cmap = capture(q, k, v, 2, 0.3, torch.float16)
    for bad_v, heads in ((v[:1], 2), (v[:, :8], 2), (v, 4)):
        with pytest.raises(ValueError, match="another batch, resolution or layer"):
            cached_pv(cmap, bad_v, heads)
