"""Public entry points: pick the Triton kernels for CUDA tensors, the PyTorch reference otherwise.

``backend``: ``"auto"`` (Triton on CUDA when importable and the format has kernels, else reference),
``"triton"`` or ``"torch"``. Every input check happens here, once. Eager calls go straight to the launch
functions; under ``torch.compile`` the same work goes through the ``torch.library`` ops, which the compiler sees.
"""
from __future__ import annotations

import functools

import torch

from . import formats
from .reference import cached_pv_reference, capture_reference
from .storage import CachedMap
from .tuning import MAX_HEAD_DIM

BACKENDS = ("auto", "triton", "torch")
# The kernels' activations, by the names warmup's --dtype takes; fp32 models take the PyTorch path.
VALUE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Devices whose tensors take the kernels. bench/launches.py adds "meta" for a while: a UNet on the meta device then
# makes, without a GPU, every launch it would make on one (compiled for a target, never run).
KERNEL_DEVICES = {"cuda"}
# The GPU architectures CI compiles every launch of SD1.5, SD2.1 and SDXL for (bench/launches.py): A100 (sm_80),
# Ada (sm_89: L4, L40S, RTX 4090) and Hopper (sm_90: H100, H200). Others take the PyTorch path: their shared memory
# and code generation are unchecked (a T4 or an RTX 50 would not fit some tiles).
KERNEL_ARCHS = {(8, 0), (8, 9), (9, 0)}


def _use_triton(backend: str, values: tuple[torch.Tensor, ...], heads: int, fmt: formats.MapFormat) -> bool:
    """Whether to run the Triton kernels; ``"triton"`` on tensors or a format they cannot take is an error."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: pass one of {BACKENDS}")
    if backend == "torch":
        return False
    head_dim = values[0].shape[-1] // heads
    usable = (all(t.device.type in KERNEL_DEVICES and t.dtype in VALUE_DTYPES.values() for t in values)
              and fmt.kernel is not None and head_dim <= MAX_HEAD_DIM and all(t.shape[-1] == values[0].shape[-1]
                                                                             for t in values))
    if backend == "triton" and not usable:
        raise ValueError("backend='triton' needs CUDA activations in fp16 or bf16 of one width, head dims up to "
                         f"{MAX_HEAD_DIM} and a map format with kernels ({', '.join(formats.kernel_formats())}); got "
                         f"{sorted({f'{t.device.type} {t.dtype}' for t in values})}, head dim {head_dim} and "
                         f"{fmt.name} maps: use backend='auto' (the PyTorch path where the kernels cannot go) "
                         "or 'torch'")
    device = values[0].device
    if not usable or device.type == "meta":
        return usable
    if not backend_available():
        return False
    if device.type == "cuda" and not kernel_gpu(device.index):  # a tensor's CUDA device always has its index
        if backend == "triton":
            raise ValueError(f"backend='triton': the kernels are built and checked for "
                             f"{', '.join(f'sm_{a}{b}' for a, b in sorted(KERNEL_ARCHS))}, not for "
                             f"{torch.cuda.get_device_name(device)}: use backend='auto' (the PyTorch path there)")
        return False
    return True


@torch.compiler.assume_constant_result
@functools.cache
def kernel_gpu(index: int) -> bool:
    """Whether CUDA device ``index`` is one the kernels are built and checked for (not ROCm, not another arch)."""
    return torch.version.hip is None and torch.cuda.get_device_capability(index) in KERNEL_ARCHS


def _needs_grad(*tensors: torch.Tensor) -> bool:
    """Inputs that autograd tracks take the custom ops, whose missing backward then raises a clear error (the eager
    launch functions would return outputs silently cut off from the graph)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _check_heads(x: torch.Tensor, heads: int, what: str) -> None:
    if x.dim() != 3 or x.shape[-1] % heads:
        raise ValueError(f"{what}: expected [batch, tokens, heads*head_dim] with {heads} heads, got {tuple(x.shape)}")


@torch.compiler.assume_constant_result  # torch.compile takes the answer as a constant instead of tracing it
@functools.cache
def backend_available() -> bool:
    """Whether the Triton kernels can run here (Triton importable and a CUDA device present)."""
    try:
        _ops()
    except ImportError:
        return False
    return torch.cuda.is_available()


@functools.cache
def _ops():
    from . import custom_ops  # imports triton
    return custom_ops


def capture(q, k, v, heads: int, scale: float, map_format, mask=None, backend: str = "auto"):
    """Attention ``softmax(q kᵀ·scale + mask) v`` and its map stored in ``map_format`` (a registered format,
    its name, or a torch dtype such as ``torch.float16``).

    ``q``: ``[B, Nq, H·D]``; ``k``, ``v``: ``[B, Nk, H·D]``. Returns ``(out [B, Nq, H·D], CachedMap)``.
    A ``mask`` always takes the reference path (diffusers UNets pass none to self/cross-attention).
    """
    compiling = torch.compiler.is_compiling()
    key = None if compiling or mask is not None else (
        "capture", q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype, q.device,
        k.device, v.device, heads, scale, map_format, backend)
    fmt, triton_path, key = _route(key, _capture_route, q, k, v, heads, map_format, mask, backend)
    if triton_path:
        if compiling or _needs_grad(q, k, v):  # the ops, registered by backend_available's import
            out, data, block_max, row_lse = torch.ops.attnreuse.capture(q, k, v, heads, float(scale), fmt.name)
            return out, CachedMap(data.view(fmt.dtype), block_max, row_lse, k.shape[1], fmt)
        return _ops().capture(q, k, v, heads, scale, fmt, key)
    return capture_reference(q, k, v, heads, scale, fmt, mask)


def _capture_route(q, k, v, heads, map_format, mask, backend) -> tuple[formats.MapFormat, bool]:
    """Every check of a capture's inputs: ``(format, whether the kernels run)``."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_heads(x, heads, name)
    if k.shape[:2] != v.shape[:2] or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: k and v need the same batch "
                         "and tokens, q and k the same batch and width")
    fmt = formats.get(map_format)
    return fmt, mask is None and _use_triton(backend, (q, k, v), heads, fmt)


def cached_pv(cmap: CachedMap, v: torch.Tensor, heads: int, backend: str = "auto") -> torch.Tensor:
    """``A · V`` for the cached map ``A``; ``v``: ``[B, Nk, H·D]`` -> ``[B, Nq, H·D]`` in ``v.dtype``."""
    compiling = torch.compiler.is_compiling()
    key = None if compiling else ("cached_pv", cmap.layout or (cmap.data.shape, cmap.kv_tokens, cmap.format),
                                  cmap.device, v.shape, v.stride(), v.dtype, v.device, heads, backend)
    triton_path, key = _route(key, _cached_pv_route, cmap, v, heads, backend)
    if triton_path:
        fmt = cmap.format
        if compiling or _needs_grad(v):  # the ops, registered by backend_available's import
            return torch.ops.attnreuse.cached_pv(cmap.data.view(fmt.op_dtype), cmap.block_max, cmap.row_lse, v, heads,
                                                 fmt.name)
        return _ops().cached_pv(cmap, v, heads, key)
    return cached_pv_reference(cmap, v, heads)


def _cached_pv_route(cmap: CachedMap, v: torch.Tensor, heads: int, backend: str) -> tuple[bool]:
    """Every check of a reuse's inputs: ``(whether the kernels run,)``."""
    _check_heads(v, heads, "v")
    b, nk, _ = v.shape
    shape = cmap.shape
    if shape[0] != b or shape[1] != heads or shape[3] != nk:
        raise ValueError(
            f"cached map of shape {tuple(shape)} cannot multiply values of shape {tuple(v.shape)} "
            f"with {heads} heads: the map belongs to another batch, resolution or layer")
    if cmap.device != v.device:
        raise ValueError(f"cached map on {cmap.device}, values on {v.device}: move one of them")
    return (_use_triton(backend, (v,), heads, cmap.format),)


# Each input layout's checks, made once (eager calls): the route they gave and the key itself (shape errors raise,
# never cached). The key also names the layout's launch in the launchers' table.
_ROUTES: dict[tuple, tuple] = {}


def _route(key: tuple | None, checks, *inputs) -> tuple:
    """``checks(*inputs)`` followed by the stored key (the launchers' table then finds it by identity), made once
    per key; ``key`` None (compiling, a mask): every time."""
    route = _ROUTES.get(key) if key is not None else None
    if route is None:
        route = (*checks(*inputs), key)
        if key is not None:
            _ROUTES[key] = route
    return route
