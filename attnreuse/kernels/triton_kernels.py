"""Triton kernels: ``cached_pv`` (O = A_cached · V) and ``capture`` (one-pass attention that also stores its map).

The map format is the one of :mod:`.storage`: per key block of ``KEY_BLOCK`` keys, data relative to the
block's own maximum, the block maximum (log2) per (row, block), the log-sum-exp (log2) per row. Both kernels
take ``KEY_BLOCK`` keys per loop iteration, so a key tile is exactly one block of the format.

Both read q/k/v in the ``[B, N, H·D]`` layout diffusers' projections produce (as ``[B, N, H, D]`` through
strides) and write O straight into the ``[B, Nq, H·D]`` layout ``to_out`` consumes. Offsets are 64-bit:
one SD1.5 1024² self-attention map has more than 2³¹ elements.

fp8 e4m3 maps travel as raw bytes. Stored values are non-negative, so an e4m3 byte shifted left by 7 bits
is an fp16 bit pattern of the same value times 2⁻⁸ (mantissa and exponent fields line up, subnormals
included): dequantising costs an integer shift instead of a conversion, and the 2⁸ folds into the final row
scale. Quantising runs the same way backwards, with round-to-nearest-even on the dropped bits. 4-bit log⅓
codes are decoded to fp16 bit patterns by integer arithmetic (no table, no exp); a packed key block is
unpacked into its two halves (low nibbles: first half of the block's keys, high nibbles: second half).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _fp8_bytes_to_fp16(a):
    return (a.to(tl.uint16) << 7).to(tl.float16, bitcast=True)


@triton.jit
def _fp16_to_fp8_bytes(x):
    """``x`` in [0, 448] (fp32) -> e4m3fn bytes, round to nearest even."""
    u = (x * (1.0 / 256.0)).to(tl.float16).to(tl.uint16, bitcast=True)
    u = u + 0x3F + ((u >> 7) & 1)
    return (u >> 7).to(tl.uint8)


@triton.jit
def _log3_to_fp16(c):
    """4-bit log⅓ code -> fp16(2^(−c/3)), 0 for code 15: q = c div 3 (as (11c) >> 5), r = c − 3q."""
    c = c.to(tl.int32)
    q = (11 * c) >> 5
    r = c - 3 * q
    bits = 0x3C00 - (q << 10) - tl.where(r == 0, 0, tl.where(r == 1, 0x1A7, 0x2F6))
    return tl.where(c == 15, 0, bits).to(tl.uint16).to(tl.float16, bitcast=True)


@triton.jit
def _fp4_bytes_to_fp16(a, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``[BLOCK_M, BLOCK_N / 2]`` packed bytes -> ``[BLOCK_M, BLOCK_N]`` fp16 values, keys in order."""
    keys = tl.reshape(tl.permute(tl.join(a & 15, a >> 4), (0, 2, 1)), (BLOCK_M, BLOCK_N))
    return _log3_to_fp16(keys)


@triton.jit
def _log3_codes(s, m_blk):
    """Codes of exp2(s − m_blk): round(3·(m_blk − s)) up to 14, 15 (zero) from 17 on (and for s = −inf)."""
    t = (m_blk[:, None] - s) * 3.0
    return tl.where(t < 17.0, tl.minimum(tl.floor(t + 0.5), 14.0), 15.0).to(tl.uint8)


@triton.jit
def _pack_fp4(c, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Codes ``[BLOCK_M, BLOCK_N]`` -> bytes ``[BLOCK_M, BLOCK_N / 2]``: key i low nibble, key i + BLOCK_N/2 high."""
    lo, hi = tl.split(tl.permute(tl.reshape(c, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
    return lo | (hi << 4)


@triton.jit
def _program_tile(H, NQ, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (batch, head), its query rows (64-bit) and the key/head-dim ranges, with masks."""
    pid_bh = tl.program_id(1)
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    return ((pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64), offs_m, tl.arange(0, BLOCK_N), offs_d,
            offs_m < NQ, offs_d < D)


@triton.jit
def cached_pv_kernel(
    A, BMAX, LSE, V, O,
    stride_ab, stride_ah, stride_am,  # map data [B, H, Nq, Nk], unit stride along Nk
    stride_xb, stride_xh, stride_xn,  # block maxima [B, H, NB, Nq], unit stride along Nq
    stride_lb, stride_lh,  # row log-sum-exp [B, H, Nq]
    stride_vb, stride_vn, stride_vh,  # V as [B, Nk, H, D], unit stride along D
    stride_ob, stride_om, stride_oh,  # O as [B, Nq, H, D], unit stride along D
    H, NQ, NK, D,
    OUT_SCALE: tl.constexpr,  # 1 / TOP of the format (times 2⁸ for fp8 bytes dequantised by the shift)
    FP8_BYTES: tl.constexpr, NATIVE_FP8: tl.constexpr, FP4_PACKED: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
):
    """acc += (data_blk · V_blk) · exp2(block_max − row_lse): one fp32 multiply per row per key block.

    ``BLOCK_D2 > 0`` splits the head dim into columns ``[0, BLOCK_D)`` and ``[BLOCK_D, BLOCK_D + BLOCK_D2)``,
    two dots on the same map tile: d = 40, 80, 160 cost 48, 80, 160 columns of tensor-core work instead of
    64, 128, 256 (and d = 160 keeps a 128 + 32 accumulator instead of 256)."""
    b, h, offs_m, offs_n, offs_d, mask_m, mask_d = _program_tile(H, NQ, D, BLOCK_M, BLOCK_N, BLOCK_D)
    A_STEP: tl.constexpr = BLOCK_N // 2 if FP4_PACKED else BLOCK_N  # map bytes per row per key block
    offs_a = tl.arange(0, A_STEP)
    a_ptrs = A + b * stride_ab + h * stride_ah + offs_m[:, None] * stride_am + offs_a[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :]
    x_ptrs = BMAX + b * stride_xb + h * stride_xh + offs_m
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + offs_m, mask=mask_m, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        mask_d2 = offs_d2 < D
        v2_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None].to(tl.int64) * stride_vn + offs_d2[None, :]
        acc2 = tl.zeros((BLOCK_M, BLOCK_D2), dtype=tl.float32)
    for start in range(0, NK, BLOCK_N):
        mask_n = (start + offs_n) < NK
        if FP4_PACKED:  # whole key blocks are stored (code 15, zero, past NK)
            a = _fp4_bytes_to_fp16(tl.load(a_ptrs, mask=mask_m[:, None], other=0), BLOCK_M, BLOCK_N)
        else:
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0)
        v = tl.load(v_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        f = tl.math.exp2(tl.load(x_ptrs, mask=mask_m, other=float("-inf")) - lse)  # 0 for a zero block
        if FP8_BYTES:
            if NATIVE_FP8:
                a = a.to(tl.float8e4nv, bitcast=True).to(tl.float16)
            else:
                a = _fp8_bytes_to_fp16(a)
        a = a.to(DOT_DTYPE)
        acc += tl.dot(a, v.to(DOT_DTYPE), input_precision=PRECISION) * f[:, None]
        if BLOCK_D2 > 0:
            v2 = tl.load(v2_ptrs, mask=mask_n[:, None] & mask_d2[None, :], other=0.0)
            acc2 += tl.dot(a, v2.to(DOT_DTYPE), input_precision=PRECISION) * f[:, None]
            v2_ptrs += BLOCK_N * stride_vn
        a_ptrs += A_STEP
        v_ptrs += BLOCK_N * stride_vn
        x_ptrs += stride_xn
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, (acc * OUT_SCALE).to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    if BLOCK_D2 > 0:
        o2_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d2[None, :]
        tl.store(o2_ptrs, (acc2 * OUT_SCALE).to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d2[None, :])


@triton.jit
def capture_kernel(
    Q, K, V, O, A, BMAX, LSE,
    stride_qb, stride_qm, stride_qh,  # Q as [B, Nq, H, D]
    stride_kb, stride_kn, stride_kh,  # K as [B, Nk, H, D]
    stride_vb, stride_vn, stride_vh,  # V as [B, Nk, H, D]
    stride_ob, stride_om, stride_oh,  # O as [B, Nq, H, D]
    stride_ab, stride_ah, stride_am,  # map data [B, H, Nq, Nk]
    stride_xb, stride_xh, stride_xn,  # block maxima [B, H, NB, Nq]
    stride_lb, stride_lh,  # row log-sum-exp [B, H, Nq]
    qk_scale,  # softmax scale · log2(e)
    H, NQ, NK, D,
    FP8_BYTES: tl.constexpr, FP4_PACKED: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One pass over K: per key block, p = exp2(s − m_blk) is stored (relative to the block's own maximum)
    with m_blk, and enters the online softmax of the output rescaled by exp2(m_blk − m_running)."""
    b, h, offs_m, offs_n, offs_d, mask_m, mask_d = _program_tile(H, NQ, D, BLOCK_M, BLOCK_N, BLOCK_D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(DOT_DTYPE)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_d[:, None] + offs_n[None, :].to(tl.int64) * stride_kn
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_d[None, :] + offs_n[:, None].to(tl.int64) * stride_vn
    A_STEP: tl.constexpr = BLOCK_N // 2 if FP4_PACKED else BLOCK_N  # map bytes per row per key block
    a_ptrs = A + b * stride_ab + h * stride_ah + offs_m[:, None] * stride_am + tl.arange(0, A_STEP)[None, :]
    x_ptrs = BMAX + b * stride_xb + h * stride_xh + offs_m

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    l_stored = tl.zeros((BLOCK_M,), dtype=tl.float32)  # fp4: sum of the stored values (row-sum correction)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start in range(0, NK, BLOCK_N):
        mask_n = (start + offs_n) < NK
        kt = tl.load(k_ptrs, mask=mask_d[:, None] & mask_n[None, :], other=0.0)  # K transposed: [D, N]
        s = tl.dot(q, kt.to(DOT_DTYPE), input_precision=PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_blk = tl.max(s, 1)  # finite: every block has at least one key
        p = tl.math.exp2(s - m_blk[:, None])  # in [0, 1], the block's maximum is 1
        if FP8_BYTES:
            tl.store(a_ptrs, _fp16_to_fp8_bytes(p * 448.0), mask=mask_m[:, None] & mask_n[None, :])
        elif FP4_PACKED:  # s is -inf past NK: the padding of the last block stores code 15 (zero)
            codes = _log3_codes(s, m_blk)
            tl.store(a_ptrs, _pack_fp4(codes, BLOCK_M, BLOCK_N), mask=mask_m[:, None])
        else:
            tl.store(a_ptrs, p.to(A.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
        tl.store(x_ptrs, m_blk, mask=mask_m)
        m_new = tl.maximum(m_i, m_blk)
        alpha = tl.math.exp2(m_i - m_new)
        beta = tl.math.exp2(m_blk - m_new)
        l_i = l_i * alpha + tl.sum(p, 1) * beta
        if FP4_PACKED:
            l_stored = l_stored * alpha + tl.sum(_log3_to_fp16(codes).to(tl.float32), 1) * beta
        v = tl.load(v_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = tl.dot((p * beta[:, None]).to(DOT_DTYPE), v.to(DOT_DTYPE), acc * alpha[:, None],
                     input_precision=PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
        a_ptrs += A_STEP
        x_ptrs += stride_xn
    lse = m_i + tl.math.log2(l_stored if FP4_PACKED else l_i)  # fp4: stored rows sum to one
    tl.store(LSE + b * stride_lb + h * stride_lh + offs_m, lse, mask=mask_m)
    acc = acc / l_i[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
