"""The map-format registry: every way a cached attention map can be stored, one :class:`MapFormat` each.

A format says how the values of one key block, relative to the block's maximum (``rel`` in [0, 1]), become
stored items and back; :mod:`.storage` adds the per-block and per-row statistics every format shares, and the
Triton kernels decode a format by its ``kernel`` code (the branches of ``_decode`` / ``_encode`` in
:mod:`.triton_kernels`). ``cache_dtype`` names, byte counts, launch configs, the planner's ``"auto"``, the
warm-up and the demo all read this table. A format with ``kernel=None`` runs on the PyTorch path only, so a
new format needs this file, plus its Triton branches to run on a GPU::

    register(MapFormat("int8", torch.uint8, bits=8, top=255.0, encode=..., decode=...))

fp8 (e4m3, a block's maximum stored as 448) and unsigned E2M2 ("fp4": 0, .25, .5, .75, 1, 1.25, ... 5, 6, 7 with
a block's maximum stored as 7, and rows normalised by their stored sums; chosen by bench/fidelity.py) are the
compressed formats. An E2M2 code shifted left by 8 bits is an fp16 bit pattern of its value times 2⁻¹⁴, so a
kernel decodes two codes with one byte permute and one AND; codes are packed two per byte, key ``2i`` in the
low nibble of byte ``i``. Rows of at least one key block keep each block's key pairs in tensor-core fragment
order (:func:`to_fragment_order`, applied by :mod:`.storage`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch

FP8 = torch.float8_e4m3fn
FP4 = torch.float4_e2m1fn_x2  # torch's one-byte container of two 4-bit codes (here unsigned E2M2, not E2M1)
KEY_BLOCK = 128  # keys per block of the storage format (see storage.py)
ROW_ALIGN = 16  # bytes: stored rows are padded to a multiple, so every row starts 16-byte aligned
E2M2_TOP = 7.0  # the largest unsigned E2M2 value: where a block's maximum is stored

# The kernels' format codes (the ``MAP_FORMAT`` constexpr): one per Triton decode/encode branch.
KERNEL_FP16, KERNEL_BF16, KERNEL_FP8, KERNEL_E2M2 = range(4)


def num_blocks(kv_tokens: int) -> int:
    """Key blocks of a row of ``kv_tokens`` keys (the last one may be partial)."""
    return -(-kv_tokens // KEY_BLOCK)


def e2m2_codes(x: torch.Tensor) -> torch.Tensor:
    """Unsigned E2M2 codes (uint8 0..15) of ``x`` in [0, 7], rounded to nearest, ties to even: the code is the
    e5m2 byte of ``x · 2⁻¹⁴`` (an E2M2 value times 2⁻¹⁴ is an e5m2 number, subnormals included), which is how
    the capture kernel rounds with the hardware's conversion."""
    return (x.float() * 2.0 ** -14).to(torch.float8_e5m2).view(torch.uint8)


def e2m2_values(codes: torch.Tensor) -> torch.Tensor:
    """The value of each code (0, .25, .5, .75, 1, 1.25, ... 3.5, 4, 5, 6, 7), as the kernels decode it: the
    code shifted left by 8 is an fp16 bit pattern of the value times 2⁻¹⁴."""
    return (codes.to(torch.int16) << 8).view(torch.float16).float() * 2.0 ** 14


def to_fragment_order(pairs: torch.Tensor) -> torch.Tensor:
    """Key pairs ``[..., blocks · 64]`` in key order -> fragment order: within each key block, pair ``4j + c``
    moves to position ``16c + j``. Tensor cores take a map tile from registers in 16-key steps in which lane
    ``c`` (of every 4) holds key pairs ``c`` and ``c + 4`` (mma.m16n8k16 and wgmma alike); in this order a lane's
    pairs of a block lie side by side, so it reads them as whole 16-byte vectors from shared memory."""
    return pairs.unflatten(-1, (-1, 16, 4)).transpose(-1, -2).flatten(-3)


def from_fragment_order(pairs: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_fragment_order`."""
    return pairs.unflatten(-1, (-1, 4, 16)).transpose(-1, -2).flatten(-3)


def _pack_pairs(codes: torch.Tensor) -> torch.Tensor:
    """``[..., 2n]`` codes -> ``[..., n]`` bytes, key ``2i`` in the low nibble of byte ``i``."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _e2m2_encode(rel: torch.Tensor) -> torch.Tensor:
    return _pack_pairs(e2m2_codes(rel * E2M2_TOP)).view(FP4)


def _e2m2_decode(data: torch.Tensor) -> torch.Tensor:
    b = data.view(torch.uint8)
    return e2m2_values(torch.stack([b & 15, b >> 4], dim=-1).flatten(-2))


def _cast_encode(dtype: torch.dtype, top: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda rel: (rel * top).to(dtype)


@dataclass(frozen=True, eq=False)  # one object per format (the registry's): compared and hashed by identity
class MapFormat:
    """One storage format of cached maps.

    ``encode(rel)``: values relative to their key block's maximum (``[..., keys]``, in [0, 1], float64 or fp32,
    keys in order) -> stored items in ``dtype``; ``decode(data)`` -> the stored values times ``top``
    (``[..., items · keys per item]``, float). ``bits`` per key; ``top``: what a block's largest entry is stored
    as (the kernels divide it out). ``fragment_order``: rows of at least this many keys (0: none) keep each key
    block's pairs in the order tensor cores consume them from registers (:func:`to_fragment_order`) and hold
    whole blocks; for formats whose kernels load the map into registers (8 bits or fewer). ``stored_sums``: the row's log-sum-exp is taken over the stored (decoded) values, so stored rows sum
    to exactly one (worth it where the levels are coarse). ``kernel``: the Triton decode/encode branch, None
    for PyTorch only. ``stages``: extra pipeline stages a kernel can afford over fp16 (its tiles are smaller).
    """

    name: str
    dtype: torch.dtype
    bits: int
    top: float
    encode: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    decode: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    kernel: int | None = None
    aliases: tuple[str, ...] = ()
    fragment_order: int = 0
    stored_sums: bool = False
    stages: int = 0

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"MapFormat({self.name!r})"

    def __reduce__(self):  # pickles by name: the registry of the process that unpickles supplies the codec
        return get, (self.name,)

    @property
    def keys_per_item(self) -> int:
        return self.dtype.itemsize * 8 // self.bits

    @property
    def op_dtype(self) -> torch.dtype:
        """The dtype ``data`` crosses the custom ops and reaches the kernels in: bytes for 8- and 4-bit maps
        (PyTorch's CPU kernels, which the op checks run, know no arithmetic on their dtypes)."""
        return torch.uint8 if self.bits <= 8 else self.dtype

    @property
    def stats_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def in_fragment_order(self, kv_tokens: int) -> bool:
        """Whether rows of ``kv_tokens`` keys are stored in fragment order (whole key blocks)."""
        return 0 < self.fragment_order <= kv_tokens

    def row_items(self, kv_tokens: int) -> int:
        """Items in a stored row of ``kv_tokens`` keys: padded to a multiple of :data:`ROW_ALIGN` bytes, or to
        whole key blocks in fragment order."""
        if self.in_fragment_order(kv_tokens):
            return num_blocks(kv_tokens) * KEY_BLOCK // self.keys_per_item
        per_align = max(1, ROW_ALIGN // self.dtype.itemsize)
        items = -(-kv_tokens // self.keys_per_item)
        return -(-items // per_align) * per_align

    def nbytes(self, batch: int, heads: int, q_tokens: int, kv_tokens: int) -> int:
        """Bytes of one map: data plus a block maximum per (row, key block) and a log-sum-exp per row."""
        rows = batch * heads * q_tokens
        stats = (num_blocks(kv_tokens) + 1) * self.stats_dtype.itemsize
        return rows * (self.row_items(kv_tokens) * self.dtype.itemsize + stats)


_REGISTRY: dict[str, MapFormat] = {}
_BY_DTYPE: dict[torch.dtype, MapFormat] = {}  # the format a torch dtype names (the model's dtype, FP8, FP4)


def register(fmt: MapFormat, *, default_for_dtype: bool = False) -> MapFormat:
    """Add ``fmt`` under its name and aliases (a name taken by another format is an error)."""
    for name in (fmt.name, *fmt.aliases):
        if name.lower() in _REGISTRY and _REGISTRY[name.lower()] is not fmt:
            raise ValueError(f"map format name {name!r} is taken by {_REGISTRY[name.lower()]}")
    for name in (fmt.name, *fmt.aliases):
        _REGISTRY[name.lower()] = fmt
    if default_for_dtype:
        _BY_DTYPE[fmt.dtype] = fmt
    return fmt


def unregister(fmt: MapFormat) -> None:
    for name in [n for n, f in _REGISTRY.items() if f is fmt]:
        del _REGISTRY[name]
    for dtype in [d for d, f in _BY_DTYPE.items() if f is fmt]:
        del _BY_DTYPE[dtype]


@contextlib.contextmanager
def registered(*fmts: MapFormat):
    """``fmts`` registered for the block's duration (studies and tests of formats attnreuse does not ship)."""
    done = []
    try:
        for fmt in fmts:
            done.append(register(fmt))
        yield fmts
    finally:
        for fmt in done:
            unregister(fmt)


def formats() -> list[MapFormat]:
    """Every registered format, once each, in registration order."""
    return list(dict.fromkeys(_REGISTRY.values()))


def names() -> list[str]:
    """The ``cache_dtype`` names, one per format (the canonical one)."""
    return [f.name for f in formats()]


def kernel_formats() -> list[str]:
    """The names of the formats the Triton kernels take (``kernel`` set)."""
    return [f.name for f in formats() if f.kernel is not None]


def get(spec) -> MapFormat:
    """The format ``spec`` names: a :class:`MapFormat`, a name or alias (``"fp8"``, ``"e4m3"``), or a torch
    dtype (``torch.float16``, ``FP8``, ``FP4``)."""
    if isinstance(spec, MapFormat):
        return spec
    fmt = _REGISTRY.get(spec.lower()) if isinstance(spec, str) else _BY_DTYPE.get(spec)
    if fmt is None:
        raise ValueError(f"{spec!r} is not a map format: pass one of {names()}"
                         + (" or a registered torch dtype" if not isinstance(spec, str) else ""))
    return fmt


# fp8 stores rows shorter than a key block (cross-attention's 77 keys) in key order, padded to 16 bytes only
# (80 bytes, not 128: SD1.5 512²'s fp8 maps stay under 1.5 GB); 4-bit rows always hold whole blocks, whose
# 64 bytes a kernel decodes without gathering bytes (a 77-key row's map: 64 bytes instead of 48).
for _fmt in (
    MapFormat("fp32", torch.float32, 32, 1.0, _cast_encode(torch.float32, 1.0), torch.Tensor.float,
              aliases=("float32",)),
    MapFormat("fp16", torch.float16, 16, 1.0, _cast_encode(torch.float16, 1.0), torch.Tensor.float, KERNEL_FP16,
              aliases=("float16", "half")),
    MapFormat("bf16", torch.bfloat16, 16, 1.0, _cast_encode(torch.bfloat16, 1.0), torch.Tensor.float, KERNEL_BF16,
              aliases=("bfloat16",)),
    MapFormat("fp8", FP8, 8, 448.0, _cast_encode(FP8, 448.0), torch.Tensor.float, KERNEL_FP8,
              aliases=("float8_e4m3fn", "e4m3"), fragment_order=KEY_BLOCK, stages=1),
    MapFormat("fp4", FP4, 4, E2M2_TOP, _e2m2_encode, _e2m2_decode, KERNEL_E2M2, aliases=("e2m2", "ue2m2"),
              fragment_order=1, stored_sums=True, stages=1),
    MapFormat("fp64", torch.float64, 64, 1.0, _cast_encode(torch.float64, 1.0), torch.Tensor.double),
):
    register(_fmt, default_for_dtype=True)
