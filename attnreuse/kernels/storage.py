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

4-bit maps (``FP4``, torch's ``float4_e2m1fn_x2``): ``data`` holds E2M1 codes of ``exp2(s − m_blk) · 6`` (values
{0, .5, 1, 1.5, 2, 3, 4, 6}, round to nearest even), two per byte, as ``[B, H, Nq, NB · KEY_BLOCK / 2]``; byte
``i`` of key block ``k`` holds key ``k·KEY_BLOCK + i`` in its low nibble and key ``k·KEY_BLOCK + KEY_BLOCK/2 + i``
in its high nibble (block-planar, so a kernel unpacks a block into its two halves without shuffling keys);
keys past ``Nk`` in the last block are code 0. ``CachedMap.kv_tokens`` keeps ``Nk``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
FP4 = torch.float4_e2m1fn_x2
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # code c (3 bits, sign 0) -> value
KEY_BLOCK = 128
STORAGE_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, FP8, FP4)


def top(dtype: torch.dtype) -> float:
    """The value a block's largest entry is stored as."""
    return {FP8: FP8_MAX, FP4: E2M1_VALUES[-1]}.get(dtype, 1.0)


def num_blocks(kv_tokens: int) -> int:
    return -(-kv_tokens // KEY_BLOCK)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def data_shape(batch: int, heads: int, q_tokens: int, kv_tokens: int, dtype: torch.dtype) -> tuple:
    """Shape of ``CachedMap.data``: ``[B, H, Nq, Nk]``, for FP4 ``[B, H, Nq, NB · KEY_BLOCK / 2]`` bytes."""
    last = num_blocks(kv_tokens) * KEY_BLOCK // 2 if dtype == FP4 else kv_tokens
    return (batch, heads, q_tokens, last)


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code (ties to even) of ``x`` in [0, 6], as uint8 0..7."""
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=x.dtype, device=x.device)
    c = torch.bucketize(x, mids)  # a tie goes to the lower code ...
    tie = (c < len(mids)) & (x == mids[c.clamp(max=len(mids) - 1)])
    return (c + (tie & (c % 2 == 1))).to(torch.uint8)  # ... unless that code is odd


def _pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """``[..., NB, KEY_BLOCK]`` codes -> ``[..., NB · KEY_BLOCK / 2]`` bytes, block-planar (see the docstring)."""
    half = KEY_BLOCK // 2
    return (codes[..., :half] | (codes[..., half:] << 4)).flatten(-2)


def _unpack_fp4(data: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_pack_fp4`: ``[..., NB · KEY_BLOCK / 2]`` bytes -> ``[..., NB · KEY_BLOCK]`` values."""
    b = data.view(torch.uint8).unflatten(-1, (-1, KEY_BLOCK // 2))
    codes = torch.cat([b & 15, b >> 4], dim=-1).flatten(-2)
    return torch.tensor(E2M1_VALUES, device=data.device)[codes.long()]


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
        if dtype == FP4:
            data = _pack_fp4(e2m1_codes(rel)).view(FP4)
        else:
            data = rel.view(b, h, nq, nb * KEY_BLOCK)[..., :nk].to(dtype).contiguous()
        block_max = torch.log2(bmax.squeeze(-1)).transpose(2, 3).contiguous()  # -inf for a zero block
        return cls(data, block_max, probs.new_zeros((b, h, nq), dtype=sd), nk)

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

