"""Kernel launches: layout, launch constants, one cached launch per shape, and the first-use check.

A launch shape (kernel, tensor shapes, strides and dtypes, map format, config, device) is resolved once into a
:class:`_Launch`: its grid, every kernel argument but the tensors, and, after its first launch through Triton's
JIT, the compiled kernel. Later launches of the shape go straight to the compiled kernel's launcher (what
``JITFunction.run`` ends with) and skip the JIT's argument binding and specialisation, which cost more host
time than the kernel itself at small shapes. Only CUDA tensors take that path, and only on the Triton versions
whose launcher signature this module was written against (:data:`DIRECT_LAUNCH`); anything else, Triton's
interpreter included, launches through the JIT every time.

Every kernel variant (:class:`.selfcheck.Variant`) is compared with the PyTorch reference at its first launch
in the process (:mod:`.selfcheck`); a variant that fails runs the reference from then on.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime import driver

from . import formats, selfcheck
from . import triton_kernels as tk
from .formats import KEY_BLOCK, num_blocks
from .storage import CachedMap, Layout, data_shape
from .tuning import INTERPRET, Config, block_d, cached_pv_config, capture_config, split_block_d

ALIGN = 16  # bytes
# Triton versions whose CompiledKernel.run(grid..., stream, function, metadata, launch metadata, hooks, *args)
# this module calls directly, as JITFunction.run does after binding the arguments (read in 3.6-3.9's source).
DIRECT_LAUNCH = tuple(triton.__version__.split(".")[:2]) in {("3", "6"), ("3", "7"), ("3", "8"), ("3", "9")}


def target_arch() -> int:
    """The compute capability Triton compiles for (``90`` for sm_90a): the config rule and decodes depend on it.
    0 under the interpreter, which has no target: its decodes take the integer paths (its fp32 -> fp8
    rounding drops the carry into the exponent)."""
    if INTERPRET:
        return 0
    active = driver.active  # bench/sass.py swaps in a fake driver per target
    return _arch(active, active.get_current_device())


@functools.cache  # per driver and device, as Triton's JIT keeps its targets
def _arch(active, device) -> int:
    return active.get_current_target().arch


def _units(stride: int, item: int) -> int:
    """A stride in 16-byte units (the kernels multiply back, so the compiler sees a multiple of 16 bytes)."""
    if stride * item % ALIGN:
        raise ValueError(f"a stride of {stride * item} bytes: the kernels take rows that start every 16 bytes")
    return stride * item // ALIGN


def aligned_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, N, W]`` itself if its rows are 16-byte aligned with a unit stride along W, else a copy in a
    buffer whose rows are padded to 16 bytes (the kernels read whole 16-byte vectors)."""
    item = x.element_size()
    s = x.stride()
    if s[2] == 1 and x.data_ptr() % ALIGN == 0 and s[0] * item % ALIGN == 0 and s[1] * item % ALIGN == 0:
        return x
    out = empty_rows(*x.shape, dtype=x.dtype, device=x.device)
    return out.copy_(x)


def empty_rows(b: int, n: int, w: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised ``[B, N, W]`` tensor whose rows start 16-byte aligned (padded when ``W`` needs it)."""
    per = ALIGN // dtype.itemsize
    padded = -(-w // per) * per
    buf = torch.empty(b, n, padded, dtype=dtype, device=device)
    return buf if padded == w else buf[..., :w]


def capture_buffers(q, k, v, heads: int, fmt):
    """Uninitialised ``(out, data, block_max, row_lse)`` for a capture (fp8/4-bit data as uint8)."""
    fmt = formats.get(fmt)
    b, nq, _ = q.shape
    nk = k.shape[1]
    return (empty_rows(b, nq, v.shape[2], v.dtype, v.device),
            q.new_empty(data_shape(b, heads, nq, nk, fmt), dtype=fmt.op_dtype),
            q.new_empty(b, heads, num_blocks(nk), nq, dtype=torch.float32),
            q.new_empty(b, heads, nq, dtype=torch.float32))


def _constexprs(config: Config, fmt: formats.MapFormat, d: int, nq: int, nk: int, dtypes: tuple, arch: int) -> dict:
    """The constexprs and launch options of a launch; ``dtypes``: the activations'."""
    block_ds = split_block_d(d) if config.split_d else (block_d(d), 0)
    return dict(HEAD_DIM=d, MAP_FORMAT=fmt.kernel, FRAGMENT=fmt.in_fragment_order(nk),
                FP8_CVT=arch >= 89,  # hardware e4m3/e5m2 conversions
                # the activations' dtype: a map is decoded into it, so V never needs converting (ptxas 12.8 builds the
                # descriptors of a split dot whose operand is converted in the loop from registers nothing wrote)
                DOT_DTYPE=tl.bfloat16 if torch.bfloat16 in dtypes else tl.float16,
                EVEN_M=nq % config.block_m == 0, EVEN_N=nk % KEY_BLOCK == 0,
                BLOCK_I=KEY_BLOCK // fmt.keys_per_item,  # stored items per row and key block
                BLOCK_D=block_ds[0], BLOCK_D2=block_ds[1], **config.launch_args())


_OPTIONS = ("num_warps", "num_stages")


@dataclass
class _Launch:
    """One launch shape: the kernel, its grid, every argument in the kernel's parameter order (the tensors lead,
    ``None`` in their place) and, once launched through the JIT, the compiled kernel."""

    fn: object  # the @triton.jit function
    grid: tuple[int, int, int]
    args: list
    n_tensors: int  # the leading arguments that are tensors
    options: dict  # num_warps, num_stages
    variant: selfcheck.Variant  # with every pointer 16-byte aligned (the launchers' own buffers are)
    block_m: int
    n_values: int  # arguments before the constexprs
    compiled: object = None  # Triton's CompiledKernel, launched directly
    verdict: object = None  # the aligned variant's first-use check, once made
    ready: bool = False  # compiled and checked right: ``direct`` may launch it
    tail: tuple = ()  # the arguments after the tensors

    @classmethod
    def make(cls, fn, grid, values: list, meta: dict, variant: selfcheck.Variant) -> "_Launch":
        """``values``: the non-constexpr arguments in order, tensors first as ``None``; ``meta``: constexprs and
        options."""
        n_tensors = values.count(None)
        assert values[:n_tensors] == [None] * n_tensors
        args = values + [meta[name] for name in fn.arg_names[len(values):]]
        return cls(fn, (*grid, 1), args, n_tensors, {k: meta[k] for k in _OPTIONS}, variant, meta["BLOCK_M"],
                   len(values), tail=tuple(args[n_tensors:]))

    def variant_of(self, aligned: bool) -> selfcheck.Variant:
        """The variant a launch runs: Triton compiles another kernel where a pointer is not 16-byte aligned."""
        return self.variant if aligned else dataclasses.replace(self.variant, flags=self.variant.flags + ("UNALIGNED",))

    def __call__(self, tensors: tuple, aligned: bool) -> None:
        """Launch on ``tensors``; ``aligned``: every pointer 16-byte aligned (:func:`aligned`)."""
        if self.compiled is not None and aligned:  # the compiled kernel assumes it, as Triton specialised it
            self.direct(tensors, tensors[0].device)
            return
        args = [*tensors, *self.tail]
        n = self.n_values
        kernel = self.fn[self.grid](*args[:n], **dict(zip(self.fn.arg_names[n:], args[n:])), **self.options)
        if DIRECT_LAUNCH and aligned and tensors[0].is_cuda:
            self.compiled = kernel  # every later call of this shape has the same arguments but the tensors
            self.ready = self.verdict is not None and self.verdict.ok

    def checked(self, verdict) -> None:
        self.verdict = verdict
        self.ready = self.compiled is not None and verdict.ok

    def direct(self, pointers: tuple, device: torch.device) -> None:
        """What ``JITFunction.run`` does once it has the compiled kernel: launch it on ``device``'s current stream,
        ``device`` made current where it is not. ``pointers``: tensors or their addresses, 16-byte aligned."""
        if device.type == "cuda" and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):
                return self.direct(pointers, device)
        kernel, grid = self.compiled, self.grid
        args = (*pointers, *self.tail)
        enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        stream = driver.active.get_current_stream(device.index)
        metadata = kernel.launch_metadata(grid, stream, *args) if getattr(enter, "calls", True) else None
        kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, metadata, enter, leave,
                   *args)


def aligned(tensors) -> bool:
    """Whether every tensor starts 16-byte aligned (Triton specialises pointers on it)."""
    return all(t.data_ptr() % ALIGN == 0 for t in tensors)


def _on_device(device: torch.device):
    """The tensors' CUDA device made current where it is not (Triton's JIT compiles, loads and launches on the
    current device, whatever the tensors' is), else nothing."""
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


_LAUNCHES: dict[tuple, _Launch] = {}
_LOCK = threading.Lock()


def _launch_for(key: tuple, make) -> _Launch:
    launch = _LAUNCHES.get(key)
    if launch is None:
        with _LOCK:
            launch = _LAUNCHES.setdefault(key, make())
    return launch


def _shape_key(*tensors: torch.Tensor) -> tuple:
    """What a launch's arguments depend on, besides the format, config and scalars: shapes, strides, dtypes."""
    return tuple((t.shape, t.stride(), t.dtype) for t in tensors)


def launch_cached_pv(out, data, block_max, row_lse, v, heads: int, fmt, config: Config | None = None) -> _Launch:
    """``out`` ``[B, Nq, H·D]`` = the map (``data``, ``block_max``, ``row_lse``) in format ``fmt`` times ``v``
    ``[B, Nk, H·D]``. ``data``: in the format's dtype, or its uint8 bytes. Returns the launch (its shape's)."""
    fmt = formats.get(fmt)
    if data.dtype != fmt.op_dtype:
        data = data.view(fmt.op_dtype)
    v = aligned_rows(v)
    key = ("cached_pv", fmt.name, config, heads, v.device, *_shape_key(data, block_max, row_lse, v, out))
    with _on_device(v.device):
        launch = _launch_for(key, lambda: _make_cached_pv(out, data, block_max, row_lse, v, heads, fmt, config))
        _run_cached_pv(launch, (data, block_max, row_lse, v, out), heads, fmt)
    return launch


def _run_cached_pv(launch: _Launch, tensors: tuple, heads: int, fmt, is_aligned: bool | None = None) -> None:
    data, block_max, row_lse, v, out = tensors
    selfcheck.run(launch, tensors, aligned(tensors) if is_aligned is None else is_aligned,
                  lambda: selfcheck.cached_pv_errors(out, data, block_max, row_lse, v, heads, fmt, launch.block_m),
                  lambda: _cached_pv_reference(out, data, block_max, row_lse, v, heads, fmt))


@dataclass(frozen=True)
class _Eager:
    """An eager call's input layout: its launch, its output's ``empty_rows`` arguments and, for a capture, the
    map's layout."""

    launch: _Launch
    out: tuple  # batch, tokens, width, dtype
    layout: Layout | None = None

    def output(self, device) -> torch.Tensor:
        return empty_rows(*self.out, device=device)


# Eager calls by input layout (api's key), for inputs the kernels read as they are (16-byte rows)
_EAGER: dict[tuple, _Eager] = {}


def capture_eager(q, k, v, heads: int, scale: float, fmt: formats.MapFormat, key: tuple) -> tuple:
    """``(out, CachedMap)``: attention and its map, the map in one new buffer (an eager call: after the first call
    of an input layout, what to allocate and the launch come from a table). ``key``: the layout's (shapes,
    strides, dtypes, devices, heads, scale, format)."""
    found = _EAGER.get(key)
    if found is None or (q.data_ptr() | k.data_ptr() | v.data_ptr()) % ALIGN:
        return _capture_first(q, k, v, heads, scale, fmt, key)
    device, layout, launch = v.device, found.layout, found.launch
    out = found.output(device)
    buffer = torch.empty(layout.buffer_bytes, dtype=torch.uint8, device=device)
    cmap = CachedMap.packed(buffer, layout)
    if launch.ready:  # compiled and checked: straight to the kernel, the map's tensors never made
        base = buffer.data_ptr()
        launch.direct((q, k, v, out, base, base + layout.offsets[0], base + layout.offsets[1]), device)
        return out, cmap
    with _on_device(device):
        _run_capture(launch, (q, k, v, out, cmap.data.view(fmt.op_dtype), cmap.block_max, cmap.row_lse), heads, scale,
                     fmt, True)  # fresh buffers are aligned
    return out, cmap


def _capture_first(q, k, v, heads, scale, fmt, key) -> tuple:
    layout = Layout.of(q.shape[0], heads, q.shape[1], k.shape[1], fmt)
    out_args = (q.shape[0], q.shape[1], v.shape[2], v.dtype)
    out = empty_rows(*out_args, device=v.device)
    cmap = CachedMap.packed(torch.empty(layout.buffer_bytes, dtype=torch.uint8, device=v.device), layout)
    launch = launch_capture(out, cmap.data, cmap.block_max, cmap.row_lse, q, k, v, heads, scale, fmt)
    if all(aligned_rows(x) is x for x in (q, k, v)):
        _EAGER[key] = _Eager(launch, out_args, layout)
    return out, cmap


def capture_new(q, k, v, heads: int, scale: float, fmt: formats.MapFormat) -> tuple:
    """``(out, data, block_max, row_lse)`` in new buffers of their own (the custom op's: its outputs may not share
    one)."""
    bufs = capture_buffers(q, k, v, heads, fmt)
    launch_capture(*bufs, q, k, v, heads, scale, fmt)
    return bufs


def cached_pv_eager(cmap: CachedMap, v: torch.Tensor, heads: int, key: tuple) -> torch.Tensor:
    """A cached map times ``v`` in a new buffer (an eager call; as :func:`capture_eager`)."""
    found = _EAGER.get(key)
    if found is not None and found.launch.ready and cmap.buffer is not None and not (
            cmap.buffer.data_ptr() | v.data_ptr()) % ALIGN:
        device = v.device
        out = found.output(device)
        base, (bm, lse) = cmap.buffer.data_ptr(), cmap.layout.offsets
        found.launch.direct((base, base + bm, base + lse, v, out), device)
        return out
    fmt = cmap.format
    out_args = (v.shape[0], cmap.shape[2], v.shape[2], v.dtype)
    out = empty_rows(*out_args, device=v.device)
    launch = launch_cached_pv(out, cmap.data.view(fmt.op_dtype), cmap.block_max, cmap.row_lse, v, heads, fmt)
    if found is None and cmap.buffer is not None and aligned_rows(v) is v:  # only a packed map launches directly
        _EAGER[key] = _Eager(launch, out_args)
    return out


def cached_pv_new(data, block_max, row_lse, v, heads: int, fmt: formats.MapFormat) -> torch.Tensor:
    """A cached map (its three tensors) times ``v`` in a new buffer (the custom op's)."""
    out = empty_rows(v.shape[0], data.shape[2], v.shape[2], v.dtype, v.device)
    launch_cached_pv(out, data, block_max, row_lse, v, heads, fmt)
    return out


def _make_cached_pv(out, data, block_max, row_lse, v, heads, fmt, config) -> _Launch:
    b, h, nq, items = data.shape
    nk, d = v.shape[1], v.shape[2] // heads
    arch = target_arch()
    config = config or cached_pv_config(d, nq, nk, fmt, arch)
    meta = _constexprs(config, fmt, d, nq, nk, (v.dtype,), arch)
    meta.update(INV_TOP=1.0 / fmt.top, ASM=not INTERPRET)
    a, o = data.element_size(), out.element_size()
    values = [None] * 5 + [
        _units(data.stride(0), a), _units(data.stride(1), a), _units(data.stride(2), a),
        block_max.stride(0), block_max.stride(1), row_lse.stride(0), row_lse.stride(1),
        _units(v.stride(0), v.element_size()), _units(v.stride(1), v.element_size()),
        _units(out.stride(0), o), _units(out.stride(1), o), h, nq, nk, items]
    variant = selfcheck.Variant.of("cached_pv", fmt, meta, (v.dtype, out.dtype), arch,
                                   _specialised(tk.cached_pv_kernel, values))
    return _Launch.make(tk.cached_pv_kernel, (triton.cdiv(nq, meta["BLOCK_M"]), b * h), values, meta, variant)


def launch_capture(out, data, block_max, row_lse, q, k, v, heads: int, scale: float, fmt,
                   config: Config | None = None) -> _Launch:
    """Attention of ``q``, ``k``, ``v`` into ``out``, its map in format ``fmt`` into ``data`` (as for
    :func:`launch_cached_pv`), ``block_max``, ``row_lse``. Returns the launch (its shape's)."""
    fmt = formats.get(fmt)
    if data.dtype != fmt.op_dtype:
        data = data.view(fmt.op_dtype)
    q, k, v = aligned_rows(q), aligned_rows(k), aligned_rows(v)
    scale = float(scale)
    key = ("capture", fmt.name, config, heads, scale, q.device, *_shape_key(q, k, v, out, data, block_max, row_lse))
    with _on_device(q.device):
        launch = _launch_for(key, lambda: _make_capture(out, data, block_max, row_lse, q, k, v, heads, scale, fmt,
                                                        config))
        _run_capture(launch, (q, k, v, out, data, block_max, row_lse), heads, scale, fmt)
    return launch


def _run_capture(launch: _Launch, tensors: tuple, heads: int, scale: float, fmt,
                 is_aligned: bool | None = None) -> None:
    q, k, v, out, data, block_max, row_lse = tensors
    selfcheck.run(launch, tensors, aligned(tensors) if is_aligned is None else is_aligned,
                  lambda: selfcheck.capture_errors(out, data, block_max, row_lse, q, k, v, heads, scale, fmt,
                                                   launch.block_m),
                  lambda: _capture_reference(out, data, block_max, row_lse, q, k, v, heads, scale, fmt))


def _make_capture(out, data, block_max, row_lse, q, k, v, heads, scale, fmt, config) -> _Launch:
    b, nq, hd = q.shape
    d, nk = hd // heads, k.shape[1]
    arch = target_arch()
    config = config or capture_config(d, nq, nk, fmt, arch)
    meta = _constexprs(config, fmt, d, nq, nk, (q.dtype, k.dtype, v.dtype), arch)
    meta.update(TOP=fmt.top, STORED_SUMS=fmt.stored_sums)
    a = data.element_size()
    values = [None] * 7 + [
        *(_units(x.stride(i), x.element_size()) for x in (q, k, v, out) for i in (0, 1)),
        _units(data.stride(0), a), _units(data.stride(1), a), _units(data.stride(2), a),
        block_max.stride(0), block_max.stride(1), row_lse.stride(0), row_lse.stride(1),
        scale * math.log2(math.e), heads, nq, nk, data.shape[-1]]
    variant = selfcheck.Variant.of("capture", fmt, meta, (q.dtype, k.dtype, v.dtype, out.dtype), arch,
                                   _specialised(tk.capture_kernel, values))
    return _Launch.make(tk.capture_kernel, (triton.cdiv(nq, meta["BLOCK_M"]), b * heads), values, meta, variant)


def _specialised(fn, values: list) -> list[int]:
    """The integer arguments Triton specialises (a compiled variant differs in them)."""
    return [v for name, v in zip(fn.arg_names, values) if type(v) is int and name not in tk.ROW_ARGS]


def _cached_pv_reference(out, data, block_max, row_lse, v, heads, fmt) -> None:
    """The PyTorch path into the kernel's output buffer (a variant that failed its check), a batch entry, head and
    block of rows at a time: a whole map dequantised at once would not fit where maps are largest."""
    from .reference import cached_pv_reference
    d, nk = v.shape[2] // heads, v.shape[1]
    for b, h, rows in _pieces(data.shape[0], heads, data.shape[2], nk):
        cmap = CachedMap(data[b:b + 1, h:h + 1, rows].view(fmt.dtype), block_max[b:b + 1, h:h + 1, :, rows].contiguous(),
                         row_lse[b:b + 1, h:h + 1, rows].contiguous(), nk, fmt)
        out[b:b + 1, rows, h * d:(h + 1) * d] = cached_pv_reference(cmap, v[b:b + 1, :, h * d:(h + 1) * d], 1)


def _capture_reference(out, data, block_max, row_lse, q, k, v, heads, scale, fmt) -> None:
    """As :func:`_cached_pv_reference`, for a capture: output and map."""
    from .reference import capture_reference
    d, nk = q.shape[2] // heads, k.shape[1]
    for b, h, rows in _pieces(q.shape[0], heads, q.shape[1], nk):
        cols = slice(h * d, (h + 1) * d)
        ref_out, cmap = capture_reference(q[b:b + 1, rows, cols], k[b:b + 1, :, cols], v[b:b + 1, :, cols], 1, scale,
                                          fmt)
        out[b:b + 1, rows, cols] = ref_out
        data[b:b + 1, h:h + 1, rows] = cmap.data.view(data.dtype)
        block_max[b:b + 1, h:h + 1, :, rows] = cmap.block_max
        row_lse[b:b + 1, h:h + 1, rows] = cmap.row_lse


def _pieces(batch: int, heads: int, q_tokens: int, kv_tokens: int):
    """``(batch entry, head, rows)`` pieces of at most 2²⁴ map entries each (64 MB in fp32)."""
    step = max(1, (1 << 24) // kv_tokens)
    for b in range(batch):
        for h in range(heads):
            for start in range(0, q_tokens, step):
                yield b, h, slice(start, min(q_tokens, start + step))
