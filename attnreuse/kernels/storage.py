"""The one storage format for cached attention maps, shared by the PyTorch reference and the kernels.

A map ``A = softmax(S)`` (``S = Q Kᵀ · scale``) of shape ``[batch, heads, q_tokens, kv_tokens]`` is cut into
key blocks of ``KEY_BLOCK`` keys and stored, for every map dtype, as three tensors:

* ``data`` ``[B, H, Nq, Nk]``: ``exp2(s − m_blk) · TOP[dtype]`` in the map dtype, where ``s = S·log2 e`` and
  ``m_blk`` is the maximum of ``s`` over the row's key block. Each block is relative to ITS OWN maximum, so
  its largest entry sits at the top of the dtype's range (``TOP`` = 448 for fp8 e4m3, 1 otherwise) and no
  block loses range to a larger block elsewhere in the row.
* ``block_max`` ``[B, H, NB, Nq]`` fp32: ``m_blk`` (log2 domain, ``-inf`` for a block of zeros), with
  ``NB = ceil(Nk / KEY_BLOCK)``; query rows innermost, so a kernel tile loads its rows' values of one key
  block as one contiguous vector.
* ``row_lse`` ``[B, H, Nq]`` fp32: ``log2 Σ exp2(s)`` over the whole row.

so that ``A[.., j] = data[.., j] · exp2(block_max[blk(j)] − row_lse) / TOP``: one factor per (row, key block),
applied to each block's partial product ``data_blk · V_blk`` in fp32 (never inside fp16 operands, where
``1/l`` would underflow). A capture kernel produces this in one pass over K (flash-style): each block's
maximum is local, the row's log-sum-exp is known at the end. ``from_probs`` encodes normalised
probabilities the same way (``block_max = log2(block max)``, ``row_lse = 0``).

``KEY_BLOCK = 128``: a tile row of an fp8 map is then one 128-byte line; the statistics cost 4 B per 128 keys
(3 % of an fp8 map); 128 is the key tile of one-pass attention kernels for head dims up to 128; and one
scale per 128 keys keeps long diffuse rows as accurate as fp16 scaling would (see bench/KERNEL_NOTES.md).
fp64 maps (statistics in fp64) are for the PyTorch reference only.

4-bit maps (``FP4``; torch's ``float4_e2m1fn_x2`` is only the one-byte container of two codes): third-octave
log codes ("log⅓", chosen by fidelity, docs/fidelity.md): ``c = round(3·(m_blk − s))`` for ``3·(m_blk − s) < 17``
(at most 14), else 15; value ``2^(−c/3)`` (1 down to 1/25.4; 15 = zero), relative to the block's maximum
(``TOP`` = 1). Row-sum correction: ``row_lse`` is the log2 of the sum of the *stored* values
(``Σ_blk exp2(m_blk) · Σ_j v(c_j)``), so every stored row sums to exactly one. Two codes per byte,
block-planar: byte ``i`` of key block ``k`` holds key ``k·KEY_BLOCK + i`` in its low nibble and key
``k·KEY_BLOCK + KEY_BLOCK/2 + i`` in its high nibble (a kernel unpacks a block into its two halves without
shuffling keys); data ``[B, H, Nq, NB · KEY_BLOCK / 2]``, keys past ``Nk`` are code 15; ``CachedMap.kv_tokens``
keeps ``Nk``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
FP4 = torch.float4_e2m1fn_x2  # container of two 4-bit log⅓ codes
LOG3_ZERO = 15  # the code of 0
KEY_BLOCK = 128
STORAGE_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, FP8, FP4)


def top(dtype: torch.dtype) -> float:
    """The value a block's largest entry is stored as."""
    return FP8_MAX if dtype == FP8 else 1.0


def num_blocks(kv_tokens: int) -> int:
    return -(-kv_tokens // KEY_BLOCK)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def data_shape(batch: int, heads: int, q_tokens: int, kv_tokens: int, dtype: torch.dtype) -> tuple:
    """Shape of ``CachedMap.data``: ``[B, H, Nq, Nk]``, for FP4 ``[B, H, Nq, NB · KEY_BLOCK / 2]`` bytes."""
    last = num_blocks(kv_tokens) * KEY_BLOCK // 2 if dtype == FP4 else kv_tokens
    return (batch, heads, q_tokens, last)


def log3_codes(rel: torch.Tensor) -> torch.Tensor:
    """4-bit codes of ``rel`` = value / block maximum in [0, 1]: nearest level ``2^(−c/3)`` in the log domain,
    zero below half the smallest level (``3·log2(1/rel) ≥ 17``); uint8 0..15."""
    t = -3.0 * torch.log2(rel)  # +inf for 0
    c = torch.floor(t + 0.5).clamp(max=14)
    return torch.where(t < 17, c, LOG3_ZERO).to(torch.uint8)


def log3_values(device=None) -> torch.Tensor:
    """Decoded value of each code, as the kernels decode it: fp16(2^(−c/3)), and 0 for code 15."""
    return torch.tensor([2.0 ** (-c / 3) for c in range(LOG3_ZERO)] + [0.0], device=device).half()


def _pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """``[..., NB, KEY_BLOCK]`` codes -> ``[..., NB · KEY_BLOCK / 2]`` bytes, block-planar (see the docstring)."""
    half = KEY_BLOCK // 2
    return (codes[..., :half] | (codes[..., half:] << 4)).flatten(-2)


def _unpack_fp4(data: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_pack_fp4`: ``[..., NB · KEY_BLOCK / 2]`` bytes -> ``[..., NB · KEY_BLOCK]`` values."""
    b = data.view(torch.uint8).unflatten(-1, (-1, KEY_BLOCK // 2))
    codes = torch.cat([b & 15, b >> 4], dim=-1).flatten(-2)
    return log3_values(data.device)[codes.long()]


@dataclass(frozen=True)
class CachedMap:
    """An attention map in storage format: see the module docstring."""

    data: torch.Tensor  # [batch, heads, q_tokens, kv_tokens] (FP4: packed, see the module docstring)
    block_max: torch.Tensor  # [batch, heads, key blocks, q_tokens], log2 domain
    row_lse: torch.Tensor  # [batch, heads, q_tokens], log2 domain
    kv_tokens: int | None = None  # Nk; needed for FP4, whose data is padded to whole key blocks

    def __post_init__(self):
        if self.data.dtype not in STORAGE_DTYPES:
            raise TypeError(f"cached map dtype {self.data.dtype} is not one of {STORAGE_DTYPES}")
        if self.data.dim() != 4 or not self.data.is_contiguous():
            raise ValueError("cached map data must be a contiguous [batch, heads, q_tokens, kv_tokens] tensor")
        b, h, nq, last = self.data.shape
        fp4 = self.data.dtype == FP4
        if fp4 and self.kv_tokens is None:
            raise ValueError("an FP4 map needs kv_tokens (its data is padded to whole key blocks)")
        nk = self.kv_tokens if fp4 else last
        if (fp4 and last != data_shape(b, h, nq, nk, FP4)[-1]) or self.kv_tokens not in (None, nk):
            raise ValueError(f"kv_tokens={self.kv_tokens} does not fit data of shape {tuple(self.data.shape)}")
        object.__setattr__(self, "kv_tokens", nk)
        sd = _stats_dtype(self.data.dtype)
        for name, t, shape in (("block_max", self.block_max, (b, h, num_blocks(nk), nq)),
                               ("row_lse", self.row_lse, (b, h, nq))):
            if tuple(t.shape) != shape or t.dtype != sd or not t.is_contiguous() or t.device != self.data.device:
                raise ValueError(f"{name} must be a contiguous {sd} tensor of shape {shape} on {self.data.device}, "
                                 f"got {t.dtype} {tuple(t.shape)} on {t.device}")

    @property
    def shape(self) -> torch.Size:
        """The map's shape ``[B, H, Nq, Nk]``."""
        return torch.Size((*self.data.shape[:3], self.kv_tokens))

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.block_max.nbytes + self.row_lse.nbytes

    def factors(self) -> torch.Tensor:
        """``exp2(block_max − row_lse) / TOP`` as ``[B, H, Nq, NB]``: what multiplies each block's data."""
        f = torch.exp2(self.block_max - self.row_lse.unsqueeze(2)) / top(self.dtype)
        return f.transpose(2, 3)

    @classmethod
    def from_probs(cls, probs: torch.Tensor, dtype: torch.dtype) -> "CachedMap":
        """Store normalised probabilities ``probs`` ([B, H, Nq, Nk], any float dtype) as ``dtype``."""
        if dtype not in STORAGE_DTYPES:
            raise TypeError(f"cached map dtype {dtype} is not one of {STORAGE_DTYPES}")
        b, h, nq, nk = probs.shape
        nb = num_blocks(nk)
        sd = _stats_dtype(dtype)
        p = torch.nn.functional.pad(probs.to(sd), (0, nb * KEY_BLOCK - nk)).view(b, h, nq, nb, KEY_BLOCK)
        bmax = p.amax(-1, keepdim=True)  # 0 for a block whose probabilities all underflowed
        rel = torch.where(bmax > 0, p / bmax, 0.0) * top(dtype)
        row_lse = probs.new_zeros((b, h, nq), dtype=sd)  # normalised rows: log2 of the sum is 0
        if dtype == FP4:
            codes = log3_codes(rel)
            data = _pack_fp4(codes).view(FP4)
            stored = (log3_values(probs.device)[codes.long()].to(sd) * bmax).sum((-1, -2))
            row_lse = torch.log2(stored)  # the row-sum correction: stored rows sum to one
        else:
            data = rel.view(b, h, nq, nb * KEY_BLOCK)[..., :nk].to(dtype).contiguous()
        block_max = torch.log2(bmax.squeeze(-1)).transpose(2, 3).contiguous()  # -inf for a zero block
        return cls(data, block_max, row_lse, nk)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The map as probabilities in ``dtype`` (materialises a full copy: for tests and references)."""
        nk = self.shape[-1]
        sd = _stats_dtype(self.dtype)
        f = self.factors().repeat_interleave(KEY_BLOCK, dim=-1)[..., :nk]
        values = _unpack_fp4(self.data)[..., :nk] if self.dtype == FP4 else self.data
        return (values.to(sd) * f).to(dtype)


def storage_nbytes(batch: int, heads: int, q_tokens: int, kv_tokens: int, dtype: torch.dtype) -> int:
    """Bytes one map of this shape occupies in storage format (data plus per-block and per-row statistics)."""
    rows = batch * heads * q_tokens
    elem = torch.empty((), dtype=dtype).element_size()
    stat = torch.empty((), dtype=_stats_dtype(dtype)).element_size()
    return rows * data_shape(1, 1, 1, kv_tokens, dtype)[-1] * elem + rows * (num_blocks(kv_tokens) + 1) * stat

