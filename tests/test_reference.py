"""The storage format and the PyTorch reference path, against float64 math."""
from __future__ import annotations

import pytest
import torch

from attnreuse.kernels import FP4, FP8, KEY_BLOCK, CachedMap, MapFormat, cached_pv, capture, formats, storage_nbytes
from tests.helpers import out64, probs64, random_qkv, rel_err


@pytest.mark.parametrize("map_dtype,bound", [(torch.float32, 1e-6), (torch.float16, 1e-3),
                                             (torch.bfloat16, 8e-3), (FP8, 3e-2), (FP4, 0.15)])
@pytest.mark.parametrize("shape", [(2, 3, 33, 77, 40), (1, 2, 64, 64, 80), (1, 1, 5, 3, 16)])
def test_capture_then_reuse_matches_float64(shape, map_dtype, bound):
    b, h, nq, nk, d = shape
    q, k, v = random_qkv(shape, torch.float32, seed=sum(shape))
    scale = d ** -0.5
    out, cmap = capture(q, k, v, h, scale, map_dtype)
    probs = probs64(q, k, h, scale)
    assert rel_err(out, out64(probs, v, h)) < 1e-6  # the capture step's own output uses the unquantised map
    assert cmap.dtype == map_dtype and cmap.nbytes == storage_nbytes(b, h, nq, nk, map_dtype)
    assert cmap.data.shape[-1] * cmap.data.element_size() % 16 == 0  # rows padded to 16 bytes
    assert rel_err(cmap.dequantize(torch.float64), probs) < bound
    v2 = torch.randn_like(v)  # a later step: fresh values, the cached map
    reused = cached_pv(cmap, v2, h)
    assert reused.shape == (b, nq, h * d) and reused.dtype == v2.dtype
    assert rel_err(reused, out64(probs, v2, h)) < bound


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
    assert rel_err(out, out64(probs.double(), v, h)) < 3e-2


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
    """4-bit E2M2 codes: one scale per key block instead of per row keeps the tail of long diffuse rows, and the
    row-sum correction makes every stored row sum to one."""
    p = synthetic_rows("diffuse")
    v = torch.randn(1, 4096, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rowmax = p.amax(-1, keepdim=True)
    per_row = formats.e2m2_values(formats.e2m2_codes(p / rowmax * 7)).double() / 7 * rowmax
    cmap = CachedMap.from_probs(p, FP4)
    back = cmap.dequantize(torch.float64)
    assert cmap.data.shape[-1] == 4096 // 2 and cmap.shape == p.shape
    assert (back.sum(-1) - 1).abs().max() < 1e-6
    assert rel_err(back @ v, p @ v) < 0.6 * rel_err(per_row @ v, p @ v)


def test_e2m2_code():
    """Nearest of 0, .25, .5, .75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7 (ties to even), decoded as the
    kernels decode it: the code shifted left by 8 is the fp16 pattern of its value times 2⁻¹⁴."""
    x = torch.tensor([0.0, 0.1, 0.125, 0.13, 0.9, 1.1, 1.125, 2.24, 2.26, 4.4, 4.6, 6.9, 7.0], dtype=torch.float64)
    assert formats.e2m2_codes(x).tolist() == [0, 0, 0, 1, 4, 4, 4, 8, 9, 12, 13, 15, 15]
    codes = torch.arange(16, dtype=torch.uint8)
    assert formats.e2m2_values(codes).tolist() == [0, .25, .5, .75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7]
    assert torch.equal(formats.e2m2_codes(formats.e2m2_values(codes)), codes)


def test_fragment_order():
    """Within a key block, pair 4j + c is stored at 16c + j (what a tensor-core lane c reads side by side);
    the inverse restores key order, and pairs never leave their block."""
    pairs = torch.arange(2 * KEY_BLOCK // 2)  # two blocks of 64 pairs
    stored = formats.to_fragment_order(pairs)
    assert stored[16 * 1 + 2].item() == 4 * 2 + 1 and stored[64 + 16 * 3].item() == 64 + 3
    assert torch.equal(formats.from_fragment_order(stored), pairs)
    assert set(stored[:64].tolist()) == set(range(64))


def test_zero_blocks_and_stats():
    probs = torch.zeros(1, 1, 2, 3 * KEY_BLOCK - 5, dtype=torch.float64)
    probs[..., :KEY_BLOCK] = 1.0 / KEY_BLOCK  # the other blocks underflowed to zero
    for dtype in (torch.float32, torch.float16, FP8, FP4):
        cmap = CachedMap.from_probs(probs, dtype)
        assert cmap.block_max.shape == (1, 1, 3, 2) and cmap.row_lse.shape == (1, 1, 2)
        assert torch.isneginf(cmap.block_max[:, :, 1:]).all()
        assert torch.equal(cmap.dequantize(torch.float64), probs)  # powers of two: exact in every dtype


def test_storage_validation():
    data = torch.rand(1, 2, 3, 8)
    bmax, lse = torch.zeros(1, 2, 1, 3), torch.zeros(1, 2, 3)
    CachedMap(data.half(), bmax, lse, 8)
    CachedMap(data.half(), bmax, lse, 5)  # 5 keys take 8 items: rows padded to 16 bytes
    with pytest.raises(ValueError, match="does not fit"):
        CachedMap(data.half(), bmax, lse, 9)
    with pytest.raises(ValueError, match="block_max must be"):
        CachedMap(data, torch.zeros(1, 2, 3, 1), lse, 8)
    with pytest.raises(ValueError, match="row_lse must be"):
        CachedMap(data, bmax, lse.double(), 8)
    with pytest.raises(ValueError, match="contiguous"):
        CachedMap(data.transpose(2, 3), bmax, lse, 3)
    with pytest.raises(ValueError, match="not a map format"):
        CachedMap(data.to(torch.int8), bmax, lse, 8)
    with pytest.raises(TypeError, match="stores torch.float8_e4m3fn"):
        CachedMap(data, bmax, lse, 4, formats.get("fp8"))
    fp8 = torch.zeros(1, 2, 3, 80, dtype=torch.uint8).view(FP8)  # 77 keys: 77 bytes, padded to 80
    assert CachedMap(fp8, bmax, lse, 77).shape == (1, 2, 3, 77)
    with pytest.raises(ValueError, match="does not fit"):
        CachedMap(fp8, bmax, lse, 100)
    fp8 = torch.zeros(1, 2, 3, 2 * KEY_BLOCK, dtype=torch.uint8).view(FP8)  # a key block or more: whole blocks
    assert CachedMap(fp8, torch.zeros(1, 2, 2, 3), lse, KEY_BLOCK + 1).shape == (1, 2, 3, KEY_BLOCK + 1)
    packed = torch.zeros(1, 2, 3, KEY_BLOCK // 2, dtype=torch.uint8).view(FP4)  # 4-bit rows: always whole blocks
    assert CachedMap(packed, bmax, lse, 77).shape == (1, 2, 3, 77)
    with pytest.raises(ValueError, match="does not fit"):
        CachedMap(packed, bmax, lse, KEY_BLOCK + 1)


def test_a_registered_format_runs_through_patch():
    """A new format is one registry entry: a torch-only 8-bit linear code runs through attnreuse.patch on the
    PyTorch path, its maps measure as it says, and it leaves the registry as it came."""
    import attnreuse
    from tests.helpers import make_unet, sample
    lin8 = MapFormat("lin8", torch.uint8, bits=8, top=255.0, encode=lambda rel: torch.round(rel * 255).to(torch.uint8),
                     decode=torch.Tensor.float)
    with formats.registered(lin8):
        assert formats.get("lin8") is lin8 and "lin8" in formats.names()
        with pytest.raises(ValueError, match="is taken"):
            formats.register(MapFormat("lin8", torch.uint8, 8, 1.0, lin8.encode, lin8.decode))
        unet = make_unet("sd15").double()
        reference = sample(unet, steps=6)
        with attnreuse.patch(unet, "111000", cache_dtype="lin8", backend="torch") as handle:
            images = sample(unet, steps=6)
            peak = handle.peak_cache_bytes
        fp16 = attnreuse.patch(unet, "111000", cache_dtype="fp16", backend="torch")
        with fp16:
            images16 = sample(unet, steps=6)
            assert peak < fp16.peak_cache_bytes  # one byte a key instead of two
        assert rel_err(images, images16) < 0.1 * rel_err(images16, reference)  # the map format is a small part
    assert "lin8" not in formats.names()


def test_map_never_applied_to_other_shapes():
    q, k, v = random_qkv((2, 2, 16, 16, 8), torch.float32)
    _, cmap = capture(q, k, v, 2, 0.3, torch.float16)
    for bad_v, heads in ((v[:1], 2), (v[:, :8], 2), (v, 4)):
        with pytest.raises(ValueError, match="another batch, resolution or layer"):
            cached_pv(cmap, bad_v, heads)
