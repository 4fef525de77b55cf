"""Triton kernels: ``cached_pv`` (O = A_cached · V) and ``capture`` (one-pass attention that also stores its map).

The map format is the one of :mod:`.storage`: per key block of ``KEY_BLOCK`` keys, values relative to the
block's own maximum, the block maximum (log2) per (row, block), the log-sum-exp (log2) per row. Both kernels
take ``KEY_BLOCK`` keys per loop iteration, so a key tile is exactly one block of the format. A map's format
(:mod:`.formats`) reaches the kernels as one constant, ``MAP_FORMAT``, read only by ``_decode`` and ``_encode``.

Both read q/k/v in the ``[B, N, H·D]`` layout diffusers' projections produce and write O straight into the
``[B, Nq, H·D]`` layout ``to_out`` consumes. The head dim is a compile-time constant (head ``h`` starts at
column ``h · HEAD_DIM``) and row strides arrive in units of 16 bytes (``*_V16``), so the compiler can prove
every row 16-byte aligned and loads whole vectors at any head dim (40, 80 and 160 included). Offsets are
64-bit: one SD1.5 1024² self-attention map has more than 2³¹ elements.

Decoding (``_decode``):

* fp8 (e4m3 bytes): the hardware's e4m3x2 → f16x2 conversion from sm_89 on (``FP8_CVT``); before, the byte
  shifted left by 7 bits is an fp16 bit pattern of the value times 2⁻⁸ (exact for non-negative values,
  subnormals included), and the 2⁸ folds into the output scale.
* unsigned E2M2 (two codes per byte, key 2i in the low nibble): a code shifted left by 8 bits is an fp16 bit
  pattern of its value times 2⁻¹⁴; one ``prmt`` puts a byte and its high nibble into the two fp16 halves of a
  register and one AND keeps the codes: 9 instructions per 8 keys (the 2¹⁴ folds into the output scale).

Compressed maps of rows of at least one key block are stored in tensor-core fragment order (``FRAGMENT``,
``formats.to_fragment_order``); ``_key_order`` undoes it in registers, so each thread reads its part of a
tile as 16-byte vectors.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import formats

MAP_FP16 = tl.constexpr(formats.KERNEL_FP16)
MAP_BF16 = tl.constexpr(formats.KERNEL_BF16)
MAP_FP8 = tl.constexpr(formats.KERNEL_FP8)
MAP_E2M2 = tl.constexpr(formats.KERNEL_E2M2)


# 4 packed bytes -> 4 × f16x2, register j = (low nibble, high nibble) of byte j at bits 8-11 and 24-27.
# prmt picks bytes by the selector's nibbles (0-3: $4, 4-7: $4 >> 4): byte j into byte 1, byte j of the
# shifted word (whose low nibble is byte j's high nibble) into byte 3.
_E2M2_TO_FP16 = tl.constexpr("""{ .reg .b32 w4;
    shr.b32 w4, $4, 4;
    prmt.b32 $0, $4, w4, 0x4000;
    and.b32 $0, $0, 0x0F000F00;
    prmt.b32 $1, $4, w4, 0x5010;
    and.b32 $1, $1, 0x0F000F00;
    prmt.b32 $2, $4, w4, 0x6020;
    and.b32 $2, $2, 0x0F000F00;
    prmt.b32 $3, $4, w4, 0x7030;
    and.b32 $3, $3, 0x0F000F00; }""")


@triton.jit
def _decode(a, MAP_FORMAT: tl.constexpr, FRAGMENT: tl.constexpr, FP8_CVT: tl.constexpr, ASM: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Stored items of one key block ``[BLOCK_M, items]`` -> ``[BLOCK_M, BLOCK_N]`` values for the dot: fp16 for
    fp8 (times 2⁻⁸ where ``FP8_CVT`` is off) and E2M2 (times 2⁻¹⁴), the map's own dtype otherwise. ``ASM`` off
    (Triton's interpreter runs no PTX): E2M2 by Triton's own integer ops instead."""
    if MAP_FORMAT == MAP_FP8:
        if FRAGMENT:
            a = _key_order(a, BLOCK_M, 2)
        if FP8_CVT:
            return a.to(tl.float8e4nv, bitcast=True).to(tl.float16)
        return (a.to(tl.uint16) << 7).to(tl.float16, bitcast=True)
    elif MAP_FORMAT == MAP_E2M2:
        if FRAGMENT:
            a = _key_order(a, BLOCK_M, 1)
        if ASM:
            pairs = tl.inline_asm_elementwise(_E2M2_TO_FP16, "=r,=r,=r,=r,r", [a], dtype=tl.uint32, is_pure=True,
                                              pack=4)
            lo = (pairs & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
            hi = (pairs >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
        else:
            lo = ((a & 15).to(tl.uint16) << 8).to(tl.float16, bitcast=True)
            hi = ((a >> 4).to(tl.uint16) << 8).to(tl.float16, bitcast=True)
        return tl.reshape(tl.join(lo, hi), (BLOCK_M, BLOCK_N))  # keys 2i, 2i + 1
    else:
        return a


@triton.jit
def _key_order(a, BLOCK_M: tl.constexpr, PAIR: tl.constexpr):
    """A block's items ``[BLOCK_M, 64 · PAIR]`` from storage (fragment) order to key order: pair ``16c + j`` ->
    ``4j + c`` (``formats.to_fragment_order``; PAIR items per key pair). Register renaming where the items are
    loaded for the dot."""
    return tl.reshape(tl.permute(tl.reshape(a, (BLOCK_M, 4, 16, PAIR)), (0, 2, 1, 3)), (BLOCK_M, 64 * PAIR))


@triton.jit
def _fragment_order(a, BLOCK_M: tl.constexpr, PAIR: tl.constexpr):
    """Inverse of :func:`_key_order`: pair ``4j + c`` -> ``16c + j``."""
    return tl.reshape(tl.permute(tl.reshape(a, (BLOCK_M, 16, 4, PAIR)), (0, 2, 1, 3)), (BLOCK_M, 64 * PAIR))


@triton.jit
def _encode(p, MAP_FORMAT: tl.constexpr, FRAGMENT: tl.constexpr, FP8_CVT: tl.constexpr, TOP: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``p = exp2(s − m_blk)`` ``[BLOCK_M, BLOCK_N]`` -> ``(items to store, stored values, relative to the block
    maximum up to the constant ``_STORED_SCALE``)``; the second matters for formats whose rows are normalised
    by their stored values (E2M2)."""
    if MAP_FORMAT == MAP_FP8:
        if FP8_CVT:
            e4m3 = (p * TOP).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        else:
            u = (p * (TOP / 256.0)).to(tl.float16).to(tl.uint16, bitcast=True)  # RNE on the 7 dropped bits
            e4m3 = ((u + 0x3F + ((u >> 7) & 1)) >> 7).to(tl.uint8)
        return (_fragment_order(e4m3, BLOCK_M, 2) if FRAGMENT else e4m3), p
    elif MAP_FORMAT == MAP_E2M2:
        # The E2M2 code of p · TOP (7) is the e5m2 byte of p · TOP · 2⁻¹⁴ (the top byte of its fp16 pattern):
        # rounded to nearest, ties to even, by the hardware's conversion; without it, by rounding away the fp16
        # pattern's low 8 bits. Past NK, p = 0: code 0. The stored value comes back from the code by the integer
        # path, never by the hardware's e5m2 -> f16 conversion: ptxas 12.8 (Triton 3.6) hoists those conversions
        # above the loop iteration that produces their inputs, so row sums read registers nothing wrote (NaN maps).
        # It is the e5m2 number (level · 2⁻¹⁴ / TOP), scaled back once per row by the caller.
        if FP8_CVT:
            codes = (p * (TOP / 16384.0)).to(tl.float8e5).to(tl.uint8, bitcast=True)
        else:
            u = (p * (TOP / 16384.0)).to(tl.float16).to(tl.uint16, bitcast=True)
            codes = ((u + 0x7F + ((u >> 8) & 1)) >> 8).to(tl.uint8)
        level = (codes.to(tl.uint16) << 8).to(tl.float16, bitcast=True).to(tl.float32)
        lo, hi = tl.split(tl.reshape(codes, (BLOCK_M, BLOCK_N // 2, 2)))
        return (_fragment_order(lo | (hi << 4), BLOCK_M, 1) if FRAGMENT else lo | (hi << 4)), level
    else:
        return p, p


@triton.jit
def _decoded_scale(MAP_FORMAT: tl.constexpr, FP8_CVT: tl.constexpr):
    """What ``_decode``'s values are multiplied by to be the stored values (× TOP): 2⁸ for fp8 decoded by the
    shift, 2¹⁴ for E2M2."""
    if MAP_FORMAT == MAP_FP8 and not FP8_CVT:
        return 256.0
    return 16384.0 if MAP_FORMAT == MAP_E2M2 else 1.0


@triton.jit
def _stored_scale(MAP_FORMAT: tl.constexpr, TOP: tl.constexpr):
    """What ``_encode``'s stored values are multiplied by to be relative to the block maximum."""
    return 16384.0 / TOP if MAP_FORMAT == MAP_E2M2 else 1.0


@triton.jit
def _rows(PTR, stride_v16):
    """A stride of ``PTR``'s rows passed in 16-byte units, in items: the compiler sees a multiple of 16 bytes."""
    # tl.cast, not .to(): Triton specialises a stride of 1 to a constexpr int, which has no .to() before 3.9
    return tl.cast(stride_v16, tl.int64) * (16 // (PTR.dtype.element_ty.primitive_bitwidth // 8))


@triton.jit
def _program(H, NQ, BLOCK_M: tl.constexpr, EVEN_M: tl.constexpr):
    """This program's (batch, head) and query rows (64-bit), with their mask (folded away with ``EVEN_M``)."""
    pid_bh = tl.program_id(1)
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    return (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64), offs_m, (offs_m < NQ) | EVEN_M


# Strides reach the kernels in 16-byte units and whole tiles are constexprs (EVEN_*), so Triton's specialisation of
# these integers (equal to 1, divisible by 16) would only multiply the compiled variants (a model's layers differ in
# them), never change a load's width. The block-maximum and row statistics keep theirs (their loads' alignment).
ROW_ARGS = ["sa_b", "sa_h", "sa_m", "sq_b", "sq_m", "sk_b", "sk_n", "sv_b", "sv_n", "so_b", "so_m", "H", "NK",
             "ROW_ITEMS"]


@triton.jit(do_not_specialize=ROW_ARGS[:3] + ROW_ARGS[7:])
def cached_pv_kernel(
    A, BMAX, LSE, V, O,
    sa_b, sa_h, sa_m,  # map data [B, H, Nq, items], in 16-byte units
    sx_b, sx_h,  # block maxima [B, H, NB, Nq] (unit stride along Nq; Nq between key blocks)
    sl_b, sl_h,  # row log-sum-exp [B, H, Nq]
    sv_b, sv_n,  # V [B, Nk, H·D], in 16-byte units
    so_b, so_m,  # O [B, Nq, H·D], in 16-byte units
    H, NQ, NK, ROW_ITEMS,
    HEAD_DIM: tl.constexpr, MAP_FORMAT: tl.constexpr, FRAGMENT: tl.constexpr, FP8_CVT: tl.constexpr,
    ASM: tl.constexpr, INV_TOP: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_D2: tl.constexpr,
):
    """O = Σ over key blocks of (values_blk · V_blk) · exp2(block_max − row_lse) / TOP: one fp32 multiply per
    row and key block, on the block's partial product (never inside the fp16 operands). ``BLOCK_D2 > 0``
    splits the head dim into columns ``[0, BLOCK_D)`` and ``[BLOCK_D, BLOCK_D + BLOCK_D2)``, two dots on the
    same decoded map tile: d = 40, 80, 160 cost 48, 80, 160 columns of tensor-core work instead of 64, 128,
    256. The next block's factors load one iteration ahead."""
    b, h, offs_m, mask_m = _program(H, NQ, BLOCK_M, EVEN_M)  # EVEN_*: no partial tiles, the masks fold away
    offs_n = tl.arange(0, BLOCK_N)
    offs_i = tl.arange(0, BLOCK_I)
    offs_d = tl.arange(0, BLOCK_D)
    a_ptrs = A + b * _rows(A, sa_b) + h * _rows(A, sa_h) + offs_m[:, None] * _rows(A, sa_m) + offs_i[None, :]
    v_row = V + b * _rows(V, sv_b) + h * HEAD_DIM + offs_n[:, None].to(tl.int64) * _rows(V, sv_n)
    x_ptrs = BMAX + b * sx_b + h * sx_h + offs_m
    lse = tl.load(LSE + b * sl_b + h * sl_h + offs_m, mask=mask_m, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if BLOCK_D2 > 0:
        acc2 = tl.zeros((BLOCK_M, BLOCK_D2), dtype=tl.float32)
    x = tl.load(x_ptrs, mask=mask_m, other=float("-inf"))
    last_block = (NK - 1) // BLOCK_N
    for start in range(0, NK, BLOCK_N):
        f = tl.math.exp2(x - lse)  # 0 for a zero block
        nxt = tl.minimum(start // BLOCK_N + 1, last_block)  # the last iteration reloads its own block
        x = tl.load(x_ptrs + nxt * NQ, mask=mask_m, other=float("-inf"))
        key_ok = (start + offs_n < NK) | EVEN_N
        item_ok = (start // (BLOCK_N // BLOCK_I) + offs_i < ROW_ITEMS) | EVEN_N
        a = tl.load(a_ptrs, mask=mask_m[:, None] & item_ok[None, :], other=0)
        a = _decode(a, MAP_FORMAT, FRAGMENT, FP8_CVT, ASM, BLOCK_M, BLOCK_N).to(DOT_DTYPE)
        v = tl.load(v_row + offs_d[None, :], mask=key_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        acc += tl.dot(a, v.to(DOT_DTYPE)) * f[:, None]
        if BLOCK_D2 > 0:
            d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
            v2 = tl.load(v_row + d2[None, :], mask=key_ok[:, None] & (d2 < HEAD_DIM)[None, :], other=0.0)
            acc2 += tl.dot(a, v2.to(DOT_DTYPE)) * f[:, None]
        a_ptrs += BLOCK_I
        v_row += BLOCK_N * _rows(V, sv_n)
    o_row = O + b * _rows(O, so_b) + h * HEAD_DIM + offs_m[:, None] * _rows(O, so_m)
    out_scale = INV_TOP * _decoded_scale(MAP_FORMAT, FP8_CVT)
    tl.store(o_row + offs_d[None, :], (acc * out_scale).to(O.dtype.element_ty),
             mask=mask_m[:, None] & (offs_d < HEAD_DIM)[None, :])
    if BLOCK_D2 > 0:
        d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        tl.store(o_row + d2[None, :], (acc2 * out_scale).to(O.dtype.element_ty),
                 mask=mask_m[:, None] & (d2 < HEAD_DIM)[None, :])


@triton.jit(do_not_specialize=ROW_ARGS)
def capture_kernel(
    Q, K, V, O, A, BMAX, LSE,
    sq_b, sq_m,  # Q [B, Nq, H·D], in 16-byte units
    sk_b, sk_n,  # K [B, Nk, H·D], in 16-byte units
    sv_b, sv_n,  # V [B, Nk, H·D], in 16-byte units
    so_b, so_m,  # O [B, Nq, H·D], in 16-byte units
    sa_b, sa_h, sa_m,  # map data [B, H, Nq, items], in 16-byte units
    sx_b, sx_h,  # block maxima [B, H, NB, Nq]
    sl_b, sl_h,  # row log-sum-exp [B, H, Nq]
    qk_scale,  # softmax scale · log2(e)
    H, NQ, NK, ROW_ITEMS,
    HEAD_DIM: tl.constexpr, MAP_FORMAT: tl.constexpr, FRAGMENT: tl.constexpr, FP8_CVT: tl.constexpr,
    TOP: tl.constexpr, STORED_SUMS: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_D2: tl.constexpr,
):
    """One pass over K: per key block, p = exp2(s − m_blk) is stored (relative to the block's own maximum)
    with m_blk, and enters the online softmax of the output rescaled by exp2(m_blk − m_running). The last
    block writes the row's padding (keys past Nk) as zeros. ``BLOCK_D2 > 0`` splits the head dim as
    ``cached_pv`` does (two dots for Q·Kᵀ and for P·V; the accumulators then fit in registers at d = 160)."""
    b, h, offs_m, mask_m = _program(H, NQ, BLOCK_M, EVEN_M)  # EVEN_*: no partial tiles, the masks fold away
    offs_n = tl.arange(0, BLOCK_N)
    offs_i = tl.arange(0, BLOCK_I)
    d1 = tl.arange(0, BLOCK_D)
    q_row = Q + b * _rows(Q, sq_b) + h * HEAD_DIM + offs_m[:, None] * _rows(Q, sq_m)
    k_col = K + b * _rows(K, sk_b) + h * HEAD_DIM + offs_n[None, :].to(tl.int64) * _rows(K, sk_n)
    v_row = V + b * _rows(V, sv_b) + h * HEAD_DIM + offs_n[:, None].to(tl.int64) * _rows(V, sv_n)
    q1 = tl.load(q_row + d1[None, :], mask=mask_m[:, None] & (d1 < HEAD_DIM)[None, :], other=0.0).to(DOT_DTYPE)
    acc1 = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if BLOCK_D2 > 0:
        d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        q2 = tl.load(q_row + d2[None, :], mask=mask_m[:, None] & (d2 < HEAD_DIM)[None, :], other=0.0).to(DOT_DTYPE)
        acc2 = tl.zeros((BLOCK_M, BLOCK_D2), dtype=tl.float32)
    a_ptrs = A + b * _rows(A, sa_b) + h * _rows(A, sa_h) + offs_m[:, None] * _rows(A, sa_m) + offs_i[None, :]
    x_ptrs = BMAX + b * sx_b + h * sx_h + offs_m

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    l_stored = tl.zeros((BLOCK_M,), dtype=tl.float32)  # sum of the stored values (formats with STORED_SUMS)
    for start in range(0, NK, BLOCK_N):
        key_ok = ((start + offs_n) < NK) | EVEN_N
        kt = tl.load(k_col + d1[:, None], mask=(d1 < HEAD_DIM)[:, None] & key_ok[None, :], other=0.0)  # Kᵀ
        s = tl.dot(q1, kt.to(DOT_DTYPE))
        if BLOCK_D2 > 0:
            kt2 = tl.load(k_col + d2[:, None], mask=(d2 < HEAD_DIM)[:, None] & key_ok[None, :], other=0.0)
            s = tl.dot(q2, kt2.to(DOT_DTYPE), s)
        s = s * qk_scale
        if not EVEN_N:
            s = tl.where(key_ok[None, :], s, float("-inf"))
        m_blk = tl.max(s, 1)  # finite: every block has at least one key
        p = tl.math.exp2(s - m_blk[:, None])  # in [0, 1], the block's maximum is 1; 0 past NK
        items, stored = _encode(p, MAP_FORMAT, FRAGMENT, FP8_CVT, TOP, BLOCK_M, BLOCK_N)
        item_ok = (start // (BLOCK_N // BLOCK_I) + offs_i < ROW_ITEMS) | EVEN_N
        tl.store(a_ptrs, items.to(A.dtype.element_ty), mask=mask_m[:, None] & item_ok[None, :])
        tl.store(x_ptrs, m_blk, mask=mask_m)
        m_new = tl.maximum(m_i, m_blk)
        alpha = tl.math.exp2(m_i - m_new)
        beta = tl.math.exp2(m_blk - m_new)
        l_i = l_i * alpha + tl.sum(p, 1) * beta
        if STORED_SUMS:
            l_stored = l_stored * alpha + tl.sum(stored, 1) * beta
        pb = (p * beta[:, None]).to(DOT_DTYPE)
        v = tl.load(v_row + d1[None, :], mask=key_ok[:, None] & (d1 < HEAD_DIM)[None, :], other=0.0)
        acc1 = tl.dot(pb, v.to(DOT_DTYPE), acc1 * alpha[:, None])
        if BLOCK_D2 > 0:
            v2 = tl.load(v_row + d2[None, :], mask=key_ok[:, None] & (d2 < HEAD_DIM)[None, :], other=0.0)
            acc2 = tl.dot(pb, v2.to(DOT_DTYPE), acc2 * alpha[:, None])
        m_i = m_new
        k_col += BLOCK_N * _rows(K, sk_n)
        v_row += BLOCK_N * _rows(V, sv_n)
        a_ptrs += BLOCK_I
        x_ptrs += NQ
    lse = m_i + tl.math.log2(l_stored * _stored_scale(MAP_FORMAT, TOP) if STORED_SUMS else l_i)
    tl.store(LSE + b * sl_b + h * sl_h + offs_m, lse, mask=mask_m)
    o_row = O + b * _rows(O, so_b) + h * HEAD_DIM + offs_m[:, None] * _rows(O, so_m)
    tl.store(o_row + d1[None, :], (acc1 / l_i[:, None]).to(O.dtype.element_ty),
             mask=mask_m[:, None] & (d1 < HEAD_DIM)[None, :])
    if BLOCK_D2 > 0:
        tl.store(o_row + d2[None, :], (acc2 / l_i[:, None]).to(O.dtype.element_ty),
                 mask=mask_m[:, None] & (d2 < HEAD_DIM)[None, :])
