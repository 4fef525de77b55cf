"""The one storage format for cached attention maps, shared by the PyTorch reference and the kernels.

A map ``A = softmax(Q Kᵀ · scale)`` of shape ``[batch, heads, q_tokens, kv_tokens]`` is stored as

* ``data``: ``A`` itself in fp64/fp32/fp16/bf16 (``scale is None``), or
* ``data``: ``A / rowmax(A) · 448`` in fp8 e4m3 and ``scale = rowmax(A) / 448`` (fp32, one per row),
  so that ``A = data · scale[..., None]``. Factoring out the row maximum puts every row's largest
  probability at the top of the e4m3 range, so probabilities down to ~1e-5 of the row maximum survive
  instead of flushing to zero.

Both tensors are contiguous. The fp8 scale makes ``A·V = (data·V) · scale``: kernels apply it once per
output row, after the matmul.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
STORAGE_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, FP8)


@dataclass(frozen=True)
class CachedMap:
    """An attention map in storage format: see the module docstring."""

    data: torch.Tensor  # [batch, heads, q_tokens, kv_tokens]
    scale: torch.Tensor | None  # [batch, heads, q_tokens] fp32 for fp8 data, else None

    def __post_init__(self):
        if self.data.dtype not in STORAGE_DTYPES:
            raise TypeError(f"cached map dtype {self.data.dtype} is not one of {STORAGE_DTYPES}")
        if self.data.dim() != 4 or not self.data.is_contiguous():
            raise ValueError("cached map data must be a contiguous [batch, heads, q_tokens, kv_tokens] tensor")
        if (self.data.dtype == FP8) != (self.scale is not None):
            raise ValueError("an fp8 map needs a per-row scale, and only an fp8 map has one")
        if self.scale is not None and (
            self.scale.shape != self.data.shape[:3] or self.scale.dtype != torch.float32
            or not self.scale.is_contiguous()
        ):
            raise ValueError("scale must be a contiguous fp32 [batch, heads, q_tokens] tensor")

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def nbytes(self) -> int:
        scale_bytes = 0 if self.scale is None else self.scale.nbytes
        return self.data.nbytes + scale_bytes

    @classmethod
    def from_probs(cls, probs: torch.Tensor, dtype: torch.dtype) -> "CachedMap":
        """Store normalised probabilities ``probs`` ([B, H, Nq, Nk], any float dtype) as ``dtype``."""
        if dtype != FP8:
            return cls(probs.to(dtype).contiguous(), None)
        rowmax = probs.float().amax(dim=-1)  # > 0: a softmax row sums to one
        data = (probs.float() * (FP8_MAX / rowmax).unsqueeze(-1)).to(FP8).contiguous()
        return cls(data, (rowmax / FP8_MAX).contiguous())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The map as probabilities in ``dtype`` (materialises a full copy: for tests and references)."""
        if self.scale is None:
            return self.data.to(dtype)
        return (self.data.float() * self.scale.unsqueeze(-1)).to(dtype)


def storage_nbytes(batch: int, heads: int, q_tokens: int, kv_tokens: int, dtype: torch.dtype) -> int:
    """Bytes one map of this shape occupies in storage format (data plus fp8 row scales)."""
    rows = batch * heads * q_tokens
    elem = torch.empty((), dtype=dtype).element_size()
    return rows * kv_tokens * elem + (rows * 4 if dtype == FP8 else 0)
