"""Triton kernels: ``cached_pv`` (O = A_cached · V) and ``capture`` (attention that also stores its map).

Both read q/k/v in the ``[B, N, H·D]`` layout diffusers' projections produce (as ``[B, N, H, D]`` through
strides) and write O straight into the ``[B, Nq, H·D]`` layout ``to_out`` consumes. Offsets are 64-bit:
one SD1.5 1024² self-attention map has more than 2³¹ elements.

fp8 e4m3 maps travel as raw bytes. Probabilities are non-negative, so an e4m3 byte shifted left by 7
bits is an fp16 bit pattern of the same value times 2⁻⁸ (mantissa and exponent fields line up, subnormals
included): dequantising costs an integer shift instead of a conversion, and the 2⁸ folds into the row
scale. Quantising runs the same way backwards, with round-to-nearest-even on the dropped bits.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


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
def _program_tile(H, NQ, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (batch, head), its query rows (64-bit) and the key/head-dim ranges, with masks."""
    pid_bh = tl.program_id(1)
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    return ((pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64), offs_m, tl.arange(0, BLOCK_N), offs_d,
            offs_m < NQ, offs_d < D)


@triton.jit
def cached_pv_kernel(
    A, S, V, O,
    stride_ab, stride_ah, stride_am,  # map [B, H, Nq, Nk], unit stride along Nk
    stride_sb, stride_sh,  # fp8 row scales [B, H, Nq]
    stride_vb, stride_vn, stride_vh,  # V as [B, Nk, H, D], unit stride along D
    stride_ob, stride_om, stride_oh,  # O as [B, Nq, H, D], unit stride along D
    H, NQ, NK, D,
    IS_FP8: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b, h, offs_m, offs_n, offs_d, mask_m, mask_d = _program_tile(H, NQ, D, BLOCK_M, BLOCK_N, BLOCK_D)
    a_ptrs = A + b * stride_ab + h * stride_ah + offs_m[:, None] * stride_am + offs_n[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start in range(0, NK, BLOCK_N):
        mask_n = (start + offs_n) < NK
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0)
        v = tl.load(v_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if IS_FP8:
            a = _fp8_bytes_to_fp16(a)
        acc = tl.dot(a.to(DOT_DTYPE), v.to(DOT_DTYPE), acc, input_precision=PRECISION)
        a_ptrs += BLOCK_N
        v_ptrs += BLOCK_N * stride_vn
    if IS_FP8:
        scale = tl.load(S + b * stride_sb + h * stride_sh + offs_m, mask=mask_m, other=0.0)
        acc = acc * (scale * 256.0)[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def capture_kernel(
    Q, K, V, O, A, S,
    stride_qb, stride_qm, stride_qh,  # Q as [B, Nq, H, D]
    stride_kb, stride_kn, stride_kh,  # K as [B, Nk, H, D]
    stride_vb, stride_vn, stride_vh,  # V as [B, Nk, H, D]
    stride_ob, stride_om, stride_oh,  # O as [B, Nq, H, D]
    stride_ab, stride_ah, stride_am,  # map [B, H, Nq, Nk]
    stride_sb, stride_sh,  # fp8 row scales [B, H, Nq]
    qk_scale,  # softmax scale · log2(e)
    H, NQ, NK, D,
    IS_FP8: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Two passes over K: row max and sum, then probabilities, their store and P·V."""
    b, h, offs_m, offs_n, offs_d, mask_m, mask_d = _program_tile(H, NQ, D, BLOCK_M, BLOCK_N, BLOCK_D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(DOT_DTYPE)
    k_base = K + b * stride_kb + h * stride_kh + offs_d[:, None]  # K transposed: [BLOCK_D, BLOCK_N]
    v_base = V + b * stride_vb + h * stride_vh + offs_d[None, :]

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, NK, BLOCK_N):
        cols = start + offs_n
        kt = tl.load(k_base + cols[None, :].to(tl.int64) * stride_kn, mask=mask_d[:, None] & (cols < NK)[None, :],
                     other=0.0)
        s = tl.dot(q, kt.to(DOT_DTYPE), input_precision=PRECISION) * qk_scale
        s = tl.where((cols < NK)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
        m_i = m_new

    inv_l = 1.0 / l_i
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    a_ptrs = A + b * stride_ab + h * stride_ah + offs_m[:, None] * stride_am + offs_n[None, :]
    for start in range(0, NK, BLOCK_N):
        cols = start + offs_n
        mask_n = cols < NK
        kt = tl.load(k_base + cols[None, :].to(tl.int64) * stride_kn, mask=mask_d[:, None] & mask_n[None, :],
                     other=0.0)
        s = tl.dot(q, kt.to(DOT_DTYPE), input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(s - m_i[:, None])  # in (0, 1]: row maximum is 1
        p = tl.where(mask_n[None, :], p, 0.0)
        if IS_FP8:
            tl.store(a_ptrs, _fp16_to_fp8_bytes(p * 448.0), mask=mask_m[:, None] & mask_n[None, :])
        else:
            tl.store(a_ptrs, (p * inv_l[:, None]).to(A.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
        v = tl.load(v_base + cols[:, None].to(tl.int64) * stride_vn, mask=mask_n[:, None] & mask_d[None, :],
                    other=0.0)
        acc = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), acc, input_precision=PRECISION)
        a_ptrs += BLOCK_N
    if IS_FP8:  # A = bytes · scale: the byte of a row's maximum is 448 and A's maximum is 1 / l
        tl.store(S + b * stride_sb + h * stride_sh + offs_m, inv_l * (1.0 / 448.0), mask=mask_m)
    acc = acc * inv_l[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def _configs(block_ms, block_ns, warps, stages):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m in block_ms for n in block_ns for w in warps for s in stages]


# The pruned tuning spaces; the interpreter cannot benchmark, so it runs one fixed config.
_KEY = ["NQ", "NK", "D", "IS_FP8", "DOT_DTYPE"]
if INTERPRET:
    cached_pv = cached_pv_kernel
    capture = capture_kernel
    FIXED_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16}
else:
    cached_pv = triton.autotune(_configs((64, 128), (64, 128, 256), (4, 8), (3, 4)), key=_KEY)(cached_pv_kernel)
    capture = triton.autotune(_configs((64, 128), (32, 64), (4, 8), (2, 3)), key=_KEY)(capture_kernel)
    FIXED_CONFIG = {}
