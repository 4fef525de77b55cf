"""Public entry points: pick the Triton kernels for CUDA tensors, the PyTorch reference otherwise.

``backend``: ``"auto"`` (Triton on CUDA when importable and the format has kernels, else reference),
``"triton"`` or ``"torch"``. Every input check happens here, once.
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


def _use_triton(backend: str, values: tuple[torch.Tensor, ...], heads: int, fmt: formats.MapFormat) -> bool:
    """Whether to run the Triton kernels; ``"triton"`` on tensors or a format they cannot take is an error."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: pass one of {BACKENDS}")
    if backend == "torch":
        return False
    head_dim = values[0].shape[-1] // heads
    usable = (all(t.is_cuda and t.dtype in VALUE_DTYPES.values() for t in values) and fmt.kernel is not None
              and head_dim <= MAX_HEAD_DIM)
    if backend == "triton" and not usable:
        raise ValueError("backend='triton' needs CUDA activations in fp16 or bf16, head dims up to "
                         f"{MAX_HEAD_DIM} and a map format with kernels ({', '.join(formats.kernel_formats())}); got "
                         f"{sorted({f'{t.device.type} {t.dtype}' for t in values})}, head dim {head_dim} and "
                         f"{fmt.name} maps: use backend='auto' (the PyTorch path where the kernels cannot go) "
                         "or 'torch'")
    return usable and backend_available()


def _check_heads(x: torch.Tensor, heads: int, what: str) -> None:
    if x.dim() != 3 or x.shape[-1] % heads:
        raise ValueError(f"{what}: expected [batch, tokens, heads*head_dim] with {heads} heads, got {tuple(x.shape)}")


@torch.compiler.assume_constant_result  # torch.compile takes the answer as a constant instead of tracing it
@functools.cache
def backend_available() -> bool:
    """Whether the Triton kernels can run here (Triton importable and a CUDA device present)."""
    try:
        from . import custom_ops  # noqa: F401  (imports triton)
    except ImportError:
        return False
    return torch.cuda.is_available()


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
        out, data, block_max, row_lse = torch.ops.attnreuse.capture(q, k, v, heads, float(scale), fmt.name)
        return out, CachedMap(data.view(fmt.dtype), block_max, row_lse, k.shape[1], fmt)
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
        return torch.ops.attnreuse.cached_pv(data, cmap.block_max, cmap.row_lse, v, heads, cmap.format.name)
    return cached_pv_reference(cmap, v, heads)
