"""Triton kernels against float64 math (Triton's interpreter on the CPU, the real thing on a GPU)."""
from __future__ import annotations

import io
import re
from copy import deepcopy
from types import SimpleNamespace

import pytest
import torch

from attnreuse.kernels import KEY_BLOCK, CachedMap, cached_pv, capture, formats, storage_nbytes
from attnreuse.kernels.storage import data_shape, num_blocks
from attnreuse.kernels import custom_ops
from attnreuse.kernels.custom_ops import cached_pv_op, capture_op
from attnreuse.kernels.launchers import launch_cached_pv, launch_capture
from tests.helpers import out64, probs64, random_qkv, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (batch, heads, q tokens, kv tokens, head dim): odd token counts, cross-attention's 77 keys, kv lengths
# that are not multiples of KEY_BLOCK (partial last block), SD head dims 40/80 and 64, the largest the kernels
# take (128), and one shape with whole tiles only (the kernels' unmasked path)
SHAPES = [(2, 2, 37, 77, 40), (1, 3, 61, 200, 80), (1, 1, 19, 150, 128), (1, 2, 33, 300, 64), (1, 2, 32, 256, 40)]
FORMATS = ["fp16", "bf16", "fp8", "fp4"]  # with fp16 activations (the interpreter's bf16 dot is wrong): dots in fp16
BOUND = {"fp16": 1e-3, "bf16": 8e-3, "fp8": 3e-2, "fp4": 0.15}


def poisoned(shape, fmt):
    """Output and map buffers full of NaN (0x7F is e4m3's NaN byte; 0xFF two 4-bit codes of 7)."""
    fmt = formats.get(fmt)
    b, h, nq, nk, d = shape
    dshape = data_shape(b, h, nq, nk, fmt)
    if fmt.bits <= 8:
        data = torch.full(dshape, 0x7F if fmt.name == "fp8" else 0xFF, dtype=torch.uint8, device=DEVICE)
    else:
        data = torch.full(dshape, float("nan"), dtype=fmt.dtype, device=DEVICE)
    nan = float("nan")
    return (torch.full((b, nq, h * d), nan, dtype=torch.float16, device=DEVICE), data,
            torch.full((b, h, num_blocks(nk), nq), nan, device=DEVICE), torch.full((b, h, nq), nan, device=DEVICE))


def as_items(cmap: CachedMap) -> torch.Tensor:
    """The map's data as the ops take it (fp8 and 4-bit as bytes)."""
    return cmap.data.view(cmap.format.op_dtype)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_cached_pv(shape, fmt):
    b, h, nq, nk, d = shape
    q, k, v = random_qkv(shape, device=DEVICE, seed=sum(shape))
    p = probs64(q, k, h, d ** -0.5)
    cmap = CachedMap.from_probs(p, fmt)
    out = poisoned(shape, fmt)[0]
    launch_cached_pv(out, as_items(cmap), cmap.block_max, cmap.row_lse, v, h, fmt)
    assert not out.isnan().any()
    assert rel_err(out, out64(p, v, h)) < BOUND[fmt]
    assert rel_err(out, cached_pv(cmap, v, h, backend="torch")) < 1e-3  # the kernel is the reference's product


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_capture(shape, fmt):
    b, h, nq, nk, d = shape
    q, k, v = random_qkv(shape, device=DEVICE, seed=sum(shape) + 1)
    scale = d ** -0.5
    out, data, block_max, row_lse = poisoned(shape, fmt)
    launch_capture(out, data, block_max, row_lse, q, k, v, h, scale, fmt)
    p = probs64(q, k, h, scale)
    assert not out.isnan().any()
    assert rel_err(out, out64(p, v, h)) < 2e-3  # fp16 attention tolerance
    f = formats.get(fmt)
    cmap = CachedMap(data.view(f.dtype), block_max, row_lse, nk, f)
    back = cmap.dequantize(torch.float64)
    assert not back.isnan().any()
    assert rel_err(back, p) < BOUND[fmt]
    # every key block is stored relative to its own maximum: each block's largest entry is the format's top
    values = cmap.values()
    blocks = torch.nn.functional.pad(values[..., :nk], (0, num_blocks(nk) * KEY_BLOCK - nk)).unflatten(-1, (-1, KEY_BLOCK))
    assert (blocks.amax(-1) == f.top).all()
    assert (values[..., nk:] == 0).all()  # the row's padding is written, as zeros
    if f.stored_sums:  # row-sum correction: the stored row sums to one
        assert (back.sum(-1) - 1).abs().max() < 1e-5
    # and the reuse kernel reads what the capture kernel wrote
    v2 = torch.randn_like(v)
    assert rel_err(cached_pv_op(data, block_max, row_lse, v2, h, fmt), out64(p, v2, h)) < BOUND[fmt]


@pytest.mark.parametrize("dtype,head_dim", [(torch.float32, 40), (torch.float16, 160)])
def test_what_the_kernels_do_not_take_runs_the_reference_path(monkeypatch, dtype, head_dim):
    """The kernels take fp16/bf16 activations and head dims up to 128; the rest runs PyTorch's path with backend
    'auto', and asking for the kernels names the fix."""
    from attnreuse.kernels import api
    monkeypatch.setattr(api, "backend_available", lambda: True)
    monkeypatch.setattr(api, "KERNEL_DEVICES", {"cuda", DEVICE})  # as if these were CUDA tensors
    monkeypatch.setattr(api, "_ROUTES", {})  # routes decided before this patch
    launched = []
    monkeypatch.setattr(custom_ops, "capture", lambda *a: launched.append(a))
    shape = (1, 2, 24, 140, head_dim)
    b, h, nq, nk, d = shape
    q, k, v = (x.to(dtype) for x in random_qkv(shape, device=DEVICE, seed=5))
    out, cmap = capture(q, k, v, h, d ** -0.5, "fp8")
    assert not launched and rel_err(out, out64(probs64(q, k, h, d ** -0.5), v, h)) < 1e-3
    with pytest.raises(ValueError, match="fp16 or bf16 of one width, head dims up to 128"):
        cached_pv(cmap, v, h, backend="triton")


def test_values_wider_than_queries_and_tracked_inputs(monkeypatch):
    """A V wider than Q and K takes the PyTorch path (the kernels read one head dim); inputs autograd tracks go
    through the custom ops, whose backward is an error naming them, not a result cut off from the graph."""
    from attnreuse.kernels import api
    monkeypatch.setattr(api, "backend_available", lambda: True)
    monkeypatch.setattr(api, "KERNEL_DEVICES", {"cuda", DEVICE})
    monkeypatch.setattr(api, "_ROUTES", {})  # routes decided before this patch
    q, k, _ = random_qkv((1, 2, 20, 30, 16), device=DEVICE, seed=6)
    v = torch.randn(1, 30, 64, device=DEVICE).half()
    out, _ = capture(q, k, v, 2, 0.25, "fp8")
    assert rel_err(out, out64(probs64(q, k, 2, 0.25), v, 2)) < 2e-3
    q.requires_grad_(True)
    out, _ = capture(q, k, k, 2, 0.25, "fp8")
    with pytest.raises(RuntimeError, match="attnreuse.capture"):
        out.float().sum().backward()


def test_zero_blocks_read_as_zero():
    """A block whose probabilities all underflowed (block max -inf) adds nothing, never NaN."""
    shape = (1, 2, 17, 3 * KEY_BLOCK, 40)
    b, h, nq, nk, d = shape
    p = torch.rand(b, h, nq, nk, dtype=torch.float64, device=DEVICE)
    p[..., KEY_BLOCK:2 * KEY_BLOCK] = 0
    p /= p.sum(-1, keepdim=True)
    v = random_qkv(shape, device=DEVICE)[2]
    for fmt in FORMATS:
        cmap = CachedMap.from_probs(p, fmt)
        assert torch.isneginf(cmap.block_max[:, :, 1]).all()
        assert cmap.dequantize()[..., KEY_BLOCK:2 * KEY_BLOCK].eq(0).all()
        out = poisoned(shape, fmt)[0]
        launch_cached_pv(out, as_items(cmap), cmap.block_max, cmap.row_lse, v, h, fmt)
        assert not out.isnan().any()
        assert rel_err(out, out64(p, v, h)) < BOUND[fmt]


def test_strided_and_unaligned_inputs():
    """q/k/v straight out of a fused projection (row stride 3·H·D) need no copy; rows that are not 16-byte
    aligned (a view into wider rows; a head dim whose output rows are 40 bytes) are copied or padded, never
    misread."""
    shape = (1, 2, 20, 20, 40)
    b, h, n, _, d = shape
    qkv = torch.randn(b, n, 3 * h * d, device=DEVICE).half()
    q, k, v = qkv.chunk(3, dim=-1)
    out, data, block_max, row_lse = capture_op(q, k, v, h, d ** -0.5, "fp16")
    p = probs64(q, k, h, d ** -0.5)
    assert rel_err(out, out64(p, v, h)) < 2e-3
    assert rel_err(cached_pv_op(data, block_max, row_lse, v, h, "fp16"), out64(p, v, h)) < 1e-3
    wide = torch.randn(b, n, h * d + 3, device=DEVICE).half()[..., :h * d]  # row stride 83 halves: 166 bytes
    assert rel_err(cached_pv_op(data, block_max, row_lse, wide, h, "fp16"), out64(p, wide, h)) < 1e-3
    q, k, v = random_qkv((1, 1, 20, 20, 20), device=DEVICE, seed=2)  # H·D = 20 halves: 40-byte rows
    out, data, block_max, row_lse = capture_op(q, k, v, 1, 20 ** -0.5, "fp8")
    p = probs64(q, k, 1, 20 ** -0.5)
    assert rel_err(out, out64(p, v, 1)) < 2e-3
    assert rel_err(cached_pv_op(data, block_max, row_lse, v, 1, "fp8"), out64(p, v, 1)) < BOUND["fp8"]


def test_custom_ops_registration():
    shape = (1, 2, 16, 16, 16)
    q, k, v = random_qkv(shape, device=DEVICE)
    for fmt in FORMATS:
        torch.library.opcheck(capture_op, (q, k, v, 2, 0.25, fmt), test_utils=("test_schema", "test_faketensor"))
        _, data, block_max, row_lse = capture_op(q, k, v, 2, 0.25, fmt)
        torch.library.opcheck(cached_pv_op, (data, block_max, row_lse, v, 2, fmt),
                              test_utils=("test_schema", "test_faketensor"))


def test_public_api_checks_inputs_once():
    q, k, v = random_qkv((1, 1, 16, 16, 16), device=DEVICE)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA activations"):
        capture(q.double().cpu(), k.double().cpu(), v.double().cpu(), 1, 0.25, torch.float16, backend="triton")
    with pytest.raises(ValueError, match="is not a map format"):
        capture(q, k, v, 1, 0.25, torch.int8)
    with pytest.raises(ValueError, match="with 3 heads"):
        capture(q, k, v, 3, 0.25, torch.float16)
    _, cmap = capture(q.float().cpu(), k.float().cpu(), v.float().cpu(), 1, 0.25, torch.float16)
    with pytest.raises(ValueError, match="another batch, resolution or layer"):
        cached_pv(cmap, v[:, :8].float().cpu(), 1)


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_public_api_compiles_without_graph_breaks(monkeypatch, fmt):
    """The path a patched UNet takes under torch.compile: validation, the ops, CachedMap, in one graph."""
    from attnreuse.kernels import api
    monkeypatch.setattr(api, "_use_triton", lambda *args: True)  # the Triton path on CPU tensors (interpreter)
    shape = (1, 2, 20, 30, 16)
    q, k, v = random_qkv(shape, device=DEVICE)

    def step(q, k, v):
        _, cmap = capture(q, k, v, 2, 0.25, fmt)
        return cached_pv(cmap, v, 2)

    assert torch.equal(torch.compile(step, fullgraph=True, backend="eager")(q, k, v), step(q, k, v))


def test_warmup_needs_cuda_and_checks_arguments(monkeypatch, capsys):
    from attnreuse import warmup
    with pytest.raises(SystemExit):
        warmup.main(["--resolution", "500"])
    assert "multiple of 64" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        warmup.main(["--cache-dtype", "fp32"])  # no kernels for fp32 maps
    assert "invalid choice" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        warmup.main(["--model", "sdxl", "--resolution", "1024", "--cache-dtype", "fp8", "fp16"])


@pytest.mark.parametrize("variant", ["no_split", "m64"])
def test_cached_pv_variants(variant):
    """The config variants a GPU sweep may pick compute the same product."""
    from attnreuse.kernels.tuning import VARIANTS, cached_pv_config
    shape = (1, 2, 33, 150, 80)
    b, h, nq, nk, d = shape
    q, k, v = random_qkv(shape, device=DEVICE, seed=3)
    p = probs64(q, k, h, d ** -0.5)
    for fmt in ("fp8", "fp4"):
        cmap = CachedMap.from_probs(p, fmt)
        out = poisoned(shape, fmt)[0]
        launch_cached_pv(out, as_items(cmap), cmap.block_max, cmap.row_lse, v, h, fmt,
                         config=VARIANTS["cached_pv"][variant](cached_pv_config(d, nq, nk, cmap.format)))
        assert rel_err(out, out64(p, v, h)) < BOUND[fmt]


# ---- the 4-bit decode's inline PTX, executed by a small PTX interpreter ---------------------------------------

def _run_ptx(asm: str, word: int) -> list[int]:
    """Run the kernels' E2M2 decode (``shr``, ``prmt``, ``and`` on .b32 registers) on one packed word."""
    regs = {"$4": word}

    def val(x):
        return regs[x] if x in regs else int(x, 0)

    for line in asm.replace("{", ";").replace("}", ";").split(";"):
        parts = re.split(r"[\s,]+", line.strip())
        op, args = parts[0], parts[1:]
        if op == "shr.b32":
            regs[args[0]] = val(args[1]) >> val(args[2])
        elif op == "and.b32":
            regs[args[0]] = val(args[1]) & val(args[2])
        elif op == "prmt.b32":
            src = val(args[1]).to_bytes(4, "little") + val(args[2]).to_bytes(4, "little")
            sel = val(args[3])
            out = []
            for i in range(4):
                nib = (sel >> (4 * i)) & 15
                byte = src[nib & 7]
                out.append((0xFF if byte & 0x80 else 0) if nib & 8 else byte)
            regs[args[0]] = int.from_bytes(bytes(out), "little")
        elif op and not op.startswith(".reg"):
            raise AssertionError(f"the test's PTX interpreter does not know {op}")
    return [regs[f"${i}"] for i in range(4)]


def test_e2m2_decode_ptx_matches_the_integer_path_for_every_byte():
    """The interpreter runs the integer decode, never the inline PTX: this runs the PTX (an exact model of shr,
    prmt and and.b32) on every byte value in every position of a packed word, and asserts it yields the fp16
    patterns the integer path gives (code << 8 for the low nibble, then the high one), which are the format's
    values times 2⁻¹⁴. Triton's ``pack=4`` puts element j of four in byte j of $4 and takes output j from $j."""
    from attnreuse.kernels.triton_kernels import _E2M2_TO_FP16
    values = formats.e2m2_values(torch.arange(16, dtype=torch.uint8))
    g = torch.Generator().manual_seed(0)
    for j in range(4):
        for byte in range(256):
            word = torch.randint(0, 256, (4,), generator=g).tolist()
            word[j] = byte
            pairs = _run_ptx(str(_E2M2_TO_FP16.value), int.from_bytes(bytes(word), "little"))
            for i, pair in enumerate(pairs):  # every output, not only j: the other bytes are random
                lo, hi = (word[i] & 15) << 8, (word[i] >> 4) << 8  # the integer path of _decode
                assert pair == lo | hi << 16
                halves = torch.tensor([lo, hi], dtype=torch.int32).to(torch.int16).view(torch.float16)
                assert torch.equal(halves.float() * 2.0 ** 14, values[[word[i] & 15, word[i] >> 4]])


def test_eager_calls_launch_on_the_addresses_the_jit_path_passes(monkeypatch):
    """After an input layout's first call, eager calls launch the compiled kernel directly; a capture's map lies in
    one buffer and is passed as addresses into it: those of the tensors the map reads as, which the JIT path
    (every kernel test above) passes."""
    from attnreuse.kernels import api, launchers
    monkeypatch.setattr(api, "_use_triton", lambda *args: True)  # the Triton path on CPU tensors (interpreter)
    monkeypatch.setattr(api, "_ROUTES", {})
    monkeypatch.setattr(launchers, "_EAGER", {})
    q, k, v = random_qkv((2, 2, 37, 150, 40), device=DEVICE)
    out, cmap = capture(q, k, v, 2, 0.25, "fp8")  # through the JIT, checked
    reused = cached_pv(cmap, v, 2)
    assert len(launchers._EAGER) == 2 and all(not e.launch.ready for e in launchers._EAGER.values())
    ref = out64(probs64(q, k, 2, 0.25), v, 2)
    assert rel_err(out, ref) < 2e-3 and rel_err(reused, ref) < 3e-2

    passed = []

    class Compiled:  # what the direct path hands Triton's launcher, recorded instead of launched
        function = packed_metadata = None

        def launch_metadata(self, *args):
            return None

        def run(self, *args):
            passed.append(args[9:])  # grid (3), stream, function, metadata, launch metadata, hooks (2); then the args

    no_gpu = SimpleNamespace(get_current_stream=lambda index: 0)
    monkeypatch.setattr(launchers, "driver", SimpleNamespace(active=no_gpu))
    for eager in launchers._EAGER.values():
        eager.launch.compiled = Compiled()
        eager.launch.checked(eager.launch.verdict)
        assert eager.launch.ready
    out2, cmap2 = capture(q, k, v, 2, 0.25, "fp8")
    reused2 = cached_pv(cmap, v, 2)
    (captured, multiplied) = passed
    launch = {e.launch.fn.__name__: e.launch for e in launchers._EAGER.values()}
    assert captured[:7] == (q, k, v, out2, cmap2.data.data_ptr(), cmap2.block_max.data_ptr(), cmap2.row_lse.data_ptr())
    assert multiplied[:5] == (cmap.data.data_ptr(), cmap.block_max.data_ptr(), cmap.row_lse.data_ptr(), v, reused2)
    assert list(captured[7:]) == launch["capture_kernel"].args[7:]
    assert list(multiplied[5:]) == launch["cached_pv_kernel"].args[5:]
    assert cmap2.layout is cmap.layout and cmap.nbytes == storage_nbytes(2, 2, 37, 150, "fp8") <= cmap.buffer.numel()
    CachedMap(cmap.data, cmap.block_max, cmap.row_lse, 150, cmap.format)  # the views are what a map's tensors must be

    saved = io.BytesIO()
    torch.save(cmap, saved)  # its buffer alone: torch.save refuses views of one storage in several dtypes
    saved.seek(0)
    for copy in (torch.load(saved, weights_only=False), deepcopy(cmap)):
        assert copy.buffer.data_ptr() != cmap.buffer.data_ptr() and copy.layout == cmap.layout
        assert torch.equal(copy.dequantize(), cmap.dequantize())
