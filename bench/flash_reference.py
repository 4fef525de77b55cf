"""The reference a capture tile is held to in the SASS report: flash-attention's forward tile, nothing else.

``O = softmax(Q Kᵀ · scale) V`` in one pass over K with the online softmax, on the ``[B, N, H·D]`` layouts
attnreuse's capture reads, the head dim a compile-time constant (so rows load as 16-byte vectors where the
layout allows), launched with the capture's own tile, warps and stages. The capture kernel does this plus
writing its map; the report compares the two instruction streams tile by tile. Runs on a GPU or in Triton's
interpreter; ``tests/test_sass_budgets.py`` checks it against float64 attention.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def flash_kernel(Q, K, V, O, stride_b, stride_n, stride_bk, stride_nk, qk_scale, H, NQ, NK,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_bh = tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    head = h * HEAD_DIM
    q = tl.load(Q + b * stride_b + offs_m[:, None] * stride_n + head + offs_d[None, :],
                mask=(offs_m < NQ)[:, None] & mask_d[None, :], other=0.0)
    k_ptrs = K + b * stride_bk + offs_n[None, :].to(tl.int64) * stride_nk + head + offs_d[:, None]
    v_ptrs = V + b * stride_bk + offs_n[:, None].to(tl.int64) * stride_nk + head + offs_d[None, :]
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start in range(0, NK, BLOCK_N):
        mask_n = (start + offs_n) < NK
        kt = tl.load(k_ptrs, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        s = tl.dot(q, kt) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
        k_ptrs += BLOCK_N * stride_nk
        v_ptrs += BLOCK_N * stride_nk
    o_ptrs = O + b * stride_b + offs_m[:, None] * stride_n + head + offs_d[None, :]
    tl.store(o_ptrs, (acc / l_i[:, None]).to(O.dtype.element_ty), mask=(offs_m < NQ)[:, None] & mask_d[None, :])


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float, config,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of contiguous ``[B, N, H·D]`` fp16/bf16 ``q``, ``k``, ``v`` with a capture ``config``, into ``out``
    (like ``q``) if given."""
    b, nq, hd = q.shape
    d = hd // heads
    out = torch.empty_like(q) if out is None else out
    flash_kernel[(triton.cdiv(nq, config.block_m), b * heads)](
        q, k, v, out, q.stride(0), q.stride(1), k.stride(0), k.stride(1), scale * 1.4426950408889634, heads, nq,
        k.shape[1], HEAD_DIM=d, BLOCK_M=config.block_m, BLOCK_N=128, BLOCK_D=max(16, triton.next_power_of_2(d)),
        num_warps=config.num_warps, num_stages=config.num_stages)
    return out
