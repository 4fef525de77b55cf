"""How a cached attention map is stored: per key block, relative to the block's own maximum, in a map format.

A map ``A = softmax(S)`` (``S = Q Kᵀ · scale``) of shape ``[batch, heads, q_tokens, kv_tokens]`` is cut into
key blocks of ``KEY_BLOCK`` keys and stored, whatever its format (:mod:`.formats`), as three tensors:

* ``data`` ``[B, H, Nq, items]``: each key's ``exp2(s − m_blk)`` (in [0, 1]; ``s = S·log2 e``, ``m_blk`` the
  maximum of ``s`` over the row's key block) encoded by the format: times ``TOP`` (448 for fp8 e4m3, 1
  otherwise) in the format's dtype, or packed codes. Each block is relative to ITS OWN maximum, so no block
  loses range to a larger block elsewhere in the row. Rows are padded with zeros to a multiple of 16 bytes
  (``MapFormat.row_items``): every row starts 16-byte aligned, so kernels load it in 16-byte vectors (a
  77-key cross-attention row of fp16 takes 80 keys).
* ``block_max`` ``[B, H, NB, Nq]`` fp32: ``m_blk`` (log2 domain, ``-inf`` for a block of zeros), with
  ``NB = ceil(Nk / KEY_BLOCK)``; query rows innermost, so a kernel tile loads its rows' values of one key
  block as one contiguous vector.
* ``row_lse`` ``[B, H, Nq]`` fp32: ``log2 Σ exp2(s)`` over the whole row (formats with ``stored_sums``: over the
  stored values, so that every stored row sums to exactly one).

so that ``A[.., j] = value[.., j] · exp2(block_max[blk(j)] − row_lse) / TOP``: one factor per (row, key block),
applied to each block's partial product ``value_blk · V_blk`` in fp32 (never inside low-precision operands,
where ``1/l`` would underflow). A capture kernel produces this in one pass over K (flash-style): each block's
maximum is local, the row's log-sum-exp is known at the end. ``from_probs`` encodes normalised probabilities
the same way (``block_max = log2(block max)``, ``row_lse = 0``).

``KEY_BLOCK = 128``: a tile row of an fp8 map is then one 128-byte line; the statistics cost 4 B per 128 keys
(3 % of an fp8 map); 128 is the key tile of one-pass attention kernels for head dims up to 128; and one
scale per 128 keys keeps long diffuse rows as accurate as fp16 scaling would (see bench/KERNEL_NOTES.md).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import formats
from .formats import KEY_BLOCK, MapFormat, num_blocks


def data_shape(batch: int, heads: int, q_tokens: int, kv_tokens: int, fmt) -> tuple:
    """Shape of ``CachedMap.data`` for a map of this shape in format ``fmt`` (anything :func:`formats.get` takes)."""
    return (batch, heads, q_tokens, formats.get(fmt).row_items(kv_tokens))


def storage_nbytes(batch: int, heads: int, q_tokens: int, kv_tokens: int, fmt) -> int:
    """Bytes one map of this shape occupies: data (rows padded to 16 bytes) and its statistics."""
    return formats.get(fmt).nbytes(batch, heads, q_tokens, kv_tokens)


@dataclass(frozen=True)
class Layout:
    """Where a map's three tensors lie in one byte buffer: ``data``, then ``block_max`` and ``row_lse``, each
    starting 16-byte aligned. An eager capture allocates one buffer (an allocation is host time an eager UNet
    pays per layer) and the tensors exist only when something reads them."""

    shape: tuple[int, int, int, int]  # [B, H, Nq, Nk]
    format: MapFormat
    offsets: tuple[int, int]  # bytes: block_max's, row_lse's
    buffer_bytes: int
    nbytes: int  # the three tensors' (what storage_nbytes counts)

    @staticmethod
    @functools.cache
    def of(batch: int, heads: int, q_tokens: int, kv_tokens: int, fmt: MapFormat) -> "Layout":
        rows = batch * heads * q_tokens
        stats = fmt.stats_dtype.itemsize
        data = rows * fmt.row_items(kv_tokens) * fmt.dtype.itemsize  # rows are whole 16-byte units
        lse = _align(data + rows * num_blocks(kv_tokens) * stats)
        return Layout((batch, heads, q_tokens, kv_tokens), fmt, (data, lse), _align(lse + rows * stats),
                      fmt.nbytes(batch, heads, q_tokens, kv_tokens))

    def views(self, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(data, block_max, row_lse)`` in ``buffer`` (uint8, ``buffer_bytes`` long)."""
        b, h, nq, nk = self.shape
        fmt, (bm, lse) = self.format, self.offsets
        sd = fmt.stats_dtype
        return (buffer[:bm].view(fmt.dtype).view(b, h, nq, fmt.row_items(nk)),
                buffer[bm:bm + b * h * num_blocks(nk) * nq * sd.itemsize].view(sd).view(b, h, num_blocks(nk), nq),
                buffer[lse:lse + b * h * nq * sd.itemsize].view(sd).view(b, h, nq))


def _align(nbytes: int, to: int = 16) -> int:
    return -(-nbytes // to) * to


@dataclass(frozen=True)
class CachedMap:
    """An attention map in storage format (see the module docstring)."""

    data: torch.Tensor  # [batch, heads, q_tokens, items]: encoded values, rows padded to 16 bytes
    block_max: torch.Tensor  # [batch, heads, key blocks, q_tokens], log2 domain
    row_lse: torch.Tensor  # [batch, heads, q_tokens], log2 domain
    kv_tokens: int  # Nk: the row's keys (data rows are padded beyond them)
    format: MapFormat = None  # None: the format registered for data.dtype
    # A map in one buffer (:meth:`packed`): the buffer and its layout; the three tensors made at first read
    buffer = None
    layout = None

    def __post_init__(self):
        fmt = formats.get(self.data.dtype if self.format is None else self.format)
        object.__setattr__(self, "format", fmt)
        if self.data.dtype != fmt.dtype:
            raise TypeError(f"a {fmt.name} map stores {fmt.dtype}, not {self.data.dtype}")
        if self.data.dim() != 4 or not self.data.is_contiguous():
            raise ValueError("cached map data must be a contiguous [batch, heads, q_tokens, items] tensor")
        b, h, nq, items = self.data.shape
        nk = self.kv_tokens
        if not isinstance(nk, int) or nk < 1 or items != fmt.row_items(nk):
            raise ValueError(f"kv_tokens={nk!r} does not fit {fmt.name} data of shape {tuple(self.data.shape)}: "
                             f"{nk} keys take {fmt.row_items(nk) if isinstance(nk, int) and nk > 0 else '?'} items")
        sd = fmt.stats_dtype
        for name, t, shape in (("block_max", self.block_max, (b, h, num_blocks(nk), nq)),
                               ("row_lse", self.row_lse, (b, h, nq))):
            if tuple(t.shape) != shape or t.dtype != sd or not t.is_contiguous() or t.device != self.data.device:
                raise ValueError(f"{name} must be a contiguous {sd} tensor of shape {shape} on {self.data.device}, "
                                 f"got {t.dtype} {tuple(t.shape)} on {t.device}")

    @classmethod
    def packed(cls, buffer: torch.Tensor, layout: Layout) -> "CachedMap":
        """A map the kernels just wrote into ``buffer`` as ``layout`` places it: right by construction, so not
        checked again (a capture's host time counts in an eager UNet)."""
        cmap = object.__new__(cls)
        cmap.__dict__.update(buffer=buffer, layout=layout, kv_tokens=layout.shape[3], format=layout.format)
        return cmap

    def __getstate__(self) -> dict:  # a packed map saves its buffer alone (torch.save refuses views of other dtypes)
        state = dict(self.__dict__)
        if self.layout is not None:
            for name in ("data", "block_max", "row_lse"):
                state.pop(name, None)
        return state

    def __getattr__(self, name: str):  # only reached for what the instance lacks: a packed map's tensors
        layout = self.__dict__.get("layout")
        if layout is None or name not in ("data", "block_max", "row_lse"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        data, block_max, row_lse = layout.views(self.buffer)
        self.__dict__.update(data=data, block_max=block_max, row_lse=row_lse)
        return self.__dict__[name]

    @property
    def shape(self) -> torch.Size:
        """The map's shape ``[B, H, Nq, Nk]``."""
        if self.layout is not None:
            return torch.Size(self.layout.shape)
        return torch.Size((*self.data.shape[:3], self.kv_tokens))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of ``data`` (``FP8``, ``FP4``, ...); ``format`` says how it is encoded."""
        return self.format.dtype

    @property
    def device(self) -> torch.device:
        return (self.data if self.buffer is None else self.buffer).device

    @property
    def nbytes(self) -> int:
        if self.layout is not None:
            return self.layout.nbytes
        return self.data.nbytes + self.block_max.nbytes + self.row_lse.nbytes

    def factors(self) -> torch.Tensor:
        """``exp2(block_max − row_lse) / TOP`` as ``[B, H, Nq, NB]``: what multiplies each block's values."""
        f = torch.exp2(self.block_max - self.row_lse.unsqueeze(2)) / self.format.top
        return f.transpose(2, 3)

    @classmethod
    def from_probs(cls, probs: torch.Tensor, fmt) -> "CachedMap":
        """Store normalised probabilities ``probs`` ([B, H, Nq, Nk], any float dtype) in format ``fmt``."""
        fmt = formats.get(fmt)
        b, h, nq, nk = probs.shape
        nb = num_blocks(nk)
        sd = fmt.stats_dtype
        p = torch.nn.functional.pad(probs.to(sd), (0, nb * KEY_BLOCK - nk)).view(b, h, nq, nb, KEY_BLOCK)
        bmax = p.amax(-1, keepdim=True)  # 0 for a block whose probabilities all underflowed
        rel = torch.where(bmax > 0, p / bmax, 0.0).flatten(-2)[..., :nk]
        items = fmt.encode(torch.nn.functional.pad(rel, (0, fmt.row_items(nk) * fmt.keys_per_item - nk)))
        block_max = torch.log2(bmax.squeeze(-1)).transpose(2, 3).contiguous()  # -inf for a zero block
        if fmt.stored_sums:  # the row-sum correction: stored rows sum to one
            stored = _per_block(fmt.decode(items)[..., :nk].to(sd), nb) * bmax.squeeze(-1) / fmt.top
            row_lse = torch.log2(stored.sum(-1))
        else:  # normalised rows: log2 of the sum is 0
            row_lse = probs.new_zeros((b, h, nq), dtype=sd)
        data = _pairs(items, fmt, formats.to_fragment_order) if fmt.in_fragment_order(nk) else items
        return cls(data.contiguous(), block_max, row_lse, nk, fmt)

    def values(self) -> torch.Tensor:
        """The stored values times ``TOP``, keys in order (``[B, H, Nq, padded keys]``, float)."""
        data = self.data
        if self.format.in_fragment_order(self.kv_tokens):
            data = _pairs(data, self.format, formats.from_fragment_order)
        return self.format.decode(data)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The map as probabilities in ``dtype`` (materialises a full copy: for tests and references)."""
        nk = self.kv_tokens
        f = self.factors().repeat_interleave(KEY_BLOCK, dim=-1)[..., :nk]
        return (self.values()[..., :nk].to(f.dtype) * f).to(dtype)


def _pairs(data: torch.Tensor, fmt: MapFormat, reorder) -> torch.Tensor:
    """``reorder`` applied to the key pairs of ``data`` (a pair of ``fmt`` keys is ``fmt.bits / 4`` bytes)."""
    unit = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[fmt.bits // 4]
    return reorder(data.view(unit)).view(data.dtype)


def _per_block(values: torch.Tensor, nb: int) -> torch.Tensor:
    """``[..., Nk]`` -> per key block sums ``[..., NB]``."""
    return torch.nn.functional.pad(values, (0, nb * KEY_BLOCK - values.shape[-1])).unflatten(-1, (nb, KEY_BLOCK)).sum(-1)
