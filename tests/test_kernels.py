"""Triton kernels against float64 math (Triton's interpreter on the CPU, the real thing on a GPU)."""
from __future__ import annotations

import pytest
import torch

from attnreuse.kernels import FP4, FP8, CachedMap, cached_pv, capture
from attnreuse.kernels.reference import merge_heads, split_heads
from attnreuse.kernels.storage import KEY_BLOCK, _unpack_fp4, data_shape, num_blocks, top
from attnreuse.kernels.triton_ops import cached_pv_op, capture_op, launch_cached_pv, launch_capture
from tests.helpers import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (batch, heads, q tokens, kv tokens, head dim): odd token counts, cross-attention's 77 keys, kv lengths
# that are not multiples of KEY_BLOCK (partial last block), SD head dims 40/80/160 and 64
SHAPES = [(2, 2, 37, 77, 40), (1, 3, 61, 200, 80), (1, 1, 19, 150, 160), (1, 2, 33, 300, 64)]
BOUND = {torch.float16: 1e-3, FP8: 3e-2, FP4: 0.15}
MAP_DTYPES = [torch.float16, FP8, FP4]


def inputs(shape, dtype=torch.float16, seed=0):
    b, h, nq, nk, d = shape
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, n, h * d, generator=g) * s).to(DEVICE, dtype)
            for n, s in ((nq, 1.5), (nk, 1.5), (nk, 1.0))]


def probs64(q, k, heads, scale):
    return (split_heads(q.double(), heads) @ split_heads(k.double(), heads).transpose(-1, -2) * scale).softmax(-1)


def out64(p, v, heads):
    return merge_heads(p @ split_heads(v.double(), heads))


def poisoned(shape, map_dtype):
    """Output and map buffers full of NaN (0x7F is e4m3fn's NaN byte; 0xFF two E2M1 codes of -6)."""
    b, h, nq, nk, d = shape
    dshape = data_shape(b, h, nq, nk, map_dtype)
    if map_dtype in (FP8, FP4):
        data = torch.full(dshape, 0x7F if map_dtype == FP8 else 0xFF, dtype=torch.uint8, device=DEVICE).view(map_dtype)
    else:
        data = torch.full(dshape, float("nan"), dtype=map_dtype, device=DEVICE)
    nan = float("nan")
    return (torch.full((b, nq, h * d), nan, dtype=torch.float16, device=DEVICE), data,
            torch.full((b, h, num_blocks(nk), nq), nan, device=DEVICE), torch.full((b, h, nq), nan, device=DEVICE))


@pytest.mark.parametrize("map_dtype", MAP_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cached_pv(shape, map_dtype):
    b, h, nq, nk, d = shape
    q, k, v = inputs(shape, seed=sum(shape))
    p = probs64(q, k, h, d ** -0.5)
    cmap = CachedMap.from_probs(p, map_dtype)
    out = poisoned(shape, map_dtype)[0]
    launch_cached_pv(out, cmap.data, cmap.block_max, cmap.row_lse, v, h)
    assert not out.isnan().any()
    assert rel_err(out, out64(p, v, h)) < BOUND[map_dtype]


@pytest.mark.parametrize("map_dtype", MAP_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_capture(shape, map_dtype):
    b, h, nq, nk, d = shape
    q, k, v = inputs(shape, seed=sum(shape) + 1)
    scale = d ** -0.5
    out, data, block_max, row_lse = poisoned(shape, map_dtype)
    launch_capture(out, data, block_max, row_lse, q, k, v, h, scale)
    p = probs64(q, k, h, scale)
    assert not out.isnan().any()
    assert rel_err(out, out64(p, v, h)) < 2e-3  # fp16 attention tolerance
    cmap = CachedMap(data, block_max, row_lse, nk)  # launch_capture wrote FP8/FP4 data (the ops pass uint8)
    back = cmap.dequantize(torch.float64)
    assert not back.isnan().any()
    assert rel_err(back, p) < BOUND[map_dtype]
    # every key block is stored relative to its own maximum: each block's largest entry is the dtype's top
    values = _unpack_fp4(data) if map_dtype == FP4 else data.float()
    padded = torch.nn.functional.pad(values[..., :nk], (0, num_blocks(nk) * KEY_BLOCK - nk))
    blocks = padded.unflatten(-1, (-1, KEY_BLOCK))
    assert (blocks.amax(-1) == top(map_dtype)).all()
    if map_dtype == FP4:  # row-sum correction: the stored row sums to one
        assert (back.sum(-1) - 1).abs().max() < 1e-5
    # and the reuse kernel reads what the capture kernel wrote
    v2 = torch.randn_like(v)
    bytes_ = data.view(torch.uint8) if map_dtype in (FP8, FP4) else data
    assert rel_err(cached_pv_op(bytes_, block_max, row_lse, v2, h, map_dtype), out64(p, v2, h)) < BOUND[map_dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_capture_then_reuse_in_model_dtype(dtype):
    """The pair as attnreuse runs it: store at one step, multiply fresh values at the next."""
    shape = (2, 2, 24, 140, 40)
    b, h, nq, nk, d = shape
    q, k, v = inputs(shape, dtype=dtype, seed=5)
    out, data, block_max, row_lse = capture_op(q, k, v, h, d ** -0.5, FP8)
    v2 = torch.randn_like(v)
    reused = cached_pv_op(data, block_max, row_lse, v2, h, FP8)
    assert reused.dtype == dtype and reused.shape == out.shape
    assert rel_err(reused, out64(probs64(q, k, h, d ** -0.5), v2, h)) < 3e-2


def test_zero_blocks_read_as_zero():
    """A block whose probabilities all underflowed (block max -inf) adds nothing, never NaN."""
    shape = (1, 2, 17, 3 * KEY_BLOCK, 40)
    b, h, nq, nk, d = shape
    p = torch.rand(b, h, nq, nk, dtype=torch.float64, device=DEVICE)
    p[..., KEY_BLOCK:2 * KEY_BLOCK] = 0
    p /= p.sum(-1, keepdim=True)
    v = inputs(shape)[2]
    for dtype in MAP_DTYPES:
        cmap = CachedMap.from_probs(p, dtype)
        assert torch.isneginf(cmap.block_max[:, :, 1]).all()
        assert cmap.dequantize()[..., KEY_BLOCK:2 * KEY_BLOCK].eq(0).all()
        out = poisoned(shape, dtype)[0]
        launch_cached_pv(out, cmap.data, cmap.block_max, cmap.row_lse, v, h)
        assert not out.isnan().any()
        assert rel_err(out, out64(p, v, h)) < BOUND[dtype]


def test_strided_inputs():
    """q/k/v straight out of a fused projection (row stride 3·H·D) need no copy."""
    shape = (1, 2, 20, 20, 40)
    b, h, n, _, d = shape
    qkv = torch.randn(b, n, 3 * h * d, device=DEVICE).half()
    q, k, v = qkv.chunk(3, dim=-1)
    out, data, block_max, row_lse = capture_op(q, k, v, h, d ** -0.5, torch.float16)
    p = probs64(q, k, h, d ** -0.5)
    assert rel_err(out, out64(p, v, h)) < 2e-3
    assert rel_err(cached_pv_op(data, block_max, row_lse, v, h, torch.float16), out64(p, v, h)) < 1e-3


def test_custom_ops_registration():
    shape = (1, 2, 16, 16, 16)
    q, k, v = inputs(shape)
    for map_dtype in (FP8, FP4):
        torch.library.opcheck(capture_op, (q, k, v, 2, 0.25, map_dtype), test_utils=("test_schema", "test_faketensor"))
        _, data, block_max, row_lse = capture_op(q, k, v, 2, 0.25, map_dtype)
        torch.library.opcheck(cached_pv_op, (data, block_max, row_lse, v, 2, map_dtype),
                              test_utils=("test_schema", "test_faketensor"))


def test_public_api_checks_inputs_once():
    q, k, v = inputs((1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="backend='triton' needs CUDA activations"):
        capture(q.double().cpu(), k.double().cpu(), v.double().cpu(), 1, 0.25, torch.float16, backend="triton")
    with pytest.raises(TypeError, match="maps are stored as one of"):
        capture(q, k, v, 1, 0.25, torch.int8)
    with pytest.raises(ValueError, match="with 3 heads"):
        capture(q, k, v, 3, 0.25, torch.float16)
    _, cmap = capture(q.float().cpu(), k.float().cpu(), v.float().cpu(), 1, 0.25, torch.float16)
    with pytest.raises(ValueError, match="another batch, resolution or layer"):
        cached_pv(cmap, v[:, :8].float().cpu(), 1)


@pytest.mark.parametrize("map_dtype", [FP8, FP4])
def test_public_api_compiles_without_graph_breaks(monkeypatch, map_dtype):
    """The path a patched UNet takes under torch.compile: validation, the ops, CachedMap, in one graph."""
    from attnreuse.kernels import ops
    monkeypatch.setattr(ops, "_use_triton", lambda *args: True)  # the Triton path on CPU tensors (interpreter)
    shape = (1, 2, 20, 30, 16)
    q, k, v = inputs(shape)

    def step(q, k, v):
        _, cmap = capture(q, k, v, 2, 0.25, map_dtype)
        return cached_pv(cmap, v, 2)

    assert torch.equal(torch.compile(step, fullgraph=True, backend="eager")(q, k, v), step(q, k, v))


def test_warmup_needs_cuda_and_checks_arguments(monkeypatch, capsys):
    from attnreuse import warmup
    with pytest.raises(SystemExit):
        warmup.main(["--resolution", "500"])
    assert "multiple of 64" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        warmup.main(["--model", "sdxl", "--resolution", "1024", "--cache-dtype", "fp8", "fp16"])


@pytest.mark.parametrize("variant", ["no_split", "native_fp8"])
def test_cached_pv_variants(variant):
    """The config variants a GPU sweep may pick compute the same product."""
    from attnreuse.kernels.tuning import VARIANTS, cached_pv_config
    shape = (1, 2, 33, 150, 80)
    b, h, nq, nk, d = shape
    q, k, v = inputs(shape, seed=3)
    p = probs64(q, k, h, d ** -0.5)
    cmap = CachedMap.from_probs(p, FP8)
    out = poisoned(shape, FP8)[0]
    launch_cached_pv(out, cmap.data, cmap.block_max, cmap.row_lse, v, h,
                     config=VARIANTS["cached_pv"][variant](cached_pv_config(d, nq, FP8)))
    assert rel_err(out, out64(p, v, h)) < BOUND[FP8]
