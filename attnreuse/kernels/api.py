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


def _use_triton(backend: str, values: tuple[torch.Tensor, ...], heads: int, fmt: formats.MapFormat) -> bool:
    """Whether to run the Triton kernels; ``"triton"`` on tensors or a format they cannot take is an error."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: pass one of {BACKENDS}")
    if backend == "torch":
        return False
    head_dim = values[0].shape[-1] // heads
    usable = (all(t.device.type in KERNEL_DEVICES and t.dtype in VALUE_DTYPES.values() for t in values)
              and fmt.kernel is not None and head_dim <= MAX_HEAD_DIM)
    if backend == "triton" and not usable:
        raise ValueError("backend='triton' needs CUDA activations in fp16 or bf16, head dims up to "
                         f"{MAX_HEAD_DIM} and a map format with kernels ({', '.join(formats.kernel_formats())}); got "
                         f"{sorted({f'{t.device.type} {t.dtype}' for t in values})}, head dim {head_dim} and "
                         f"{fmt.name} maps: use backend='auto' (the PyTorch path where the kernels cannot go) "
                         "or 'torch'")
    return usable and (values[0].device.type == "meta" or backend_available())


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
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_heads(x, heads, name)
    if k.shape[:2] != v.shape[:2] or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: k and v need the same batch "
                         "and tokens, q and k the same batch and width")
    fmt = formats.get(map_format)
    if mask is None and _use_triton(backend, (q, k, v), heads, fmt):
        if torch.compiler.is_compiling():
            out, data, block_max, row_lse = torch.ops.attnreuse.capture(q, k, v, heads, float(scale), fmt.name)
            return out, CachedMap(data.view(fmt.dtype), block_max, row_lse, k.shape[1], fmt)
        out, data, block_max, row_lse = _ops().capture(q, k, v, heads, scale, fmt)
        return out, CachedMap.laid_out(data.view(fmt.dtype), block_max, row_lse, k.shape[1], fmt)
    return capture_reference(q, k, v, heads, scale, fmt, mask)


def cached_pv(cmap: CachedMap, v: torch.Tensor, heads: int, backend: str = "auto") -> torch.Tensor:
    """``A · V`` for the cached map ``A``; ``v``: ``[B, Nk, H·D]`` -> ``[B, Nq, H·D]`` in ``v.dtype``."""
    _check_heads(v, heads, "v")
    b, nk, _ = v.shape
    shape = cmap.shape
    if shape[0] != b or shape[1] != heads or shape[3] != nk:
        raise ValueError(
            f"cached map of shape {tuple(shape)} cannot multiply values of shape {tuple(v.shape)} "
            f"with {heads} heads: the map belongs to another batch, resolution or layer")
    if cmap.data.device != v.device:
        raise ValueError(f"cached map on {cmap.data.device}, values on {v.device}: move one of them")
    if _use_triton(backend, (v,), heads, cmap.format):
        data = cmap.data.view(cmap.format.op_dtype)
        if torch.compiler.is_compiling():
            return torch.ops.attnreuse.cached_pv(data, cmap.block_max, cmap.row_lse, v, heads, cmap.format.name)
        return _ops().cached_pv(data, cmap.block_max, cmap.row_lse, v, heads, cmap.format)
    return cached_pv_reference(cmap, v, heads)
