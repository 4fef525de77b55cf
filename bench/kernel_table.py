"""Kernel table on a GPU: ``python bench/kernel_table.py [--json out.json] [--shapes sd15_64x64_self ...]``.

Per shape (the anchor shapes of SD1.5/SDXL attention): SDPA, ``torch.bmm`` over a cached fp16 map,
``cached_pv`` with fp16 and fp8 maps, the capture kernel (fp16 and fp8 maps), each with its error
against float64 math and its bytes/s as a fraction of a device-to-device copy measured in the same run.
The limit of a reuse is ``t_lim = map bytes / copy bandwidth`` (copy bandwidth counts bytes read + written).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from attnreuse.harness import SHAPES, bench_ms, copy_bandwidth
from attnreuse.kernels import FP8, CachedMap
from attnreuse.kernels.reference import merge_heads, split_heads
from attnreuse.kernels.triton_ops import cached_pv_triton, capture_triton

def rel_err(got, ref) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


def error_rows(q, k, v, h, scale, rows: int = 256):
    """float64 reference for the first ``rows`` query rows (keeps the 1024px check cheap)."""
    qh = split_heads(q[:, :rows].double(), h)
    p = (qh @ split_heads(k.double(), h).transpose(-1, -2) * scale).softmax(-1)
    return p, merge_heads(p @ split_heads(v.double(), h))


def run_map_dtype(tag, dtype, q, k, v, h, scale, p_ref, o_ref, bw) -> dict:
    """Capture and cached_pv with one map dtype; their maps are freed on return."""
    rows = p_ref.shape[2]
    r = {}
    out, cmap = capture_triton(q, k, v, h, scale, dtype)
    r[f"capture{tag}_ms"] = bench_ms(lambda: capture_triton(q, k, v, h, scale, dtype))
    r[f"capture{tag}_err"] = rel_err(out[:, :rows], o_ref)
    head = CachedMap(cmap.data[:, :, :rows].contiguous(),
                     None if cmap.scale is None else cmap.scale[:, :, :rows].contiguous())
    r[f"map{tag}_err"] = rel_err(head.dequantize(torch.float64), p_ref)
    pv = cached_pv_triton(cmap, v, h)
    r[f"pv{tag}_err"] = rel_err(pv[:, :rows], o_ref)
    r[f"pv{tag}_ms"] = bench_ms(lambda: cached_pv_triton(cmap, v, h))
    moved = cmap.nbytes + v.nbytes + pv.nbytes
    r[f"pv{tag}_frac_copy"] = moved / (r[f"pv{tag}_ms"] * 1e-3) / bw
    r[f"pv{tag}_over_tlim"] = r[f"pv{tag}_ms"] / (cmap.nbytes / bw * 1e3)
    return r


def run_shape(name, shape, bw):
    b, h, nq, nk, d = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, n, h * d, device="cuda", generator=g, dtype=torch.float16) for n in (nq, nk, nk))
    scale = d ** -0.5
    r = {"shape": shape}
    qh, kh, vh = (split_heads(x, h) for x in (q, k, v))  # the views diffusers passes to SDPA
    r["sdpa_ms"] = bench_ms(lambda: F.scaled_dot_product_attention(qh, kh, vh))
    p_ref, o_ref = error_rows(q, k, v, h, scale)
    for tag, dtype in (("16", torch.float16), ("8", FP8)):
        r.update(run_map_dtype(tag, dtype, q, k, v, h, scale, p_ref, o_ref, bw))
        torch.cuda.empty_cache()
    probs = torch.rand(b * h, nq, nk, device="cuda", dtype=torch.float16)
    vb = vh.reshape(b * h, nk, d)
    r["bmm16_ms"] = bench_ms(lambda: torch.bmm(probs, vb))
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--json", help="write all numbers here")
    args = ap.parse_args(argv)
    card = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    results = {"card": card, "copy_TBps": bw / 1e12, "torch": torch.__version__, "shapes": {}}
    for name in args.shapes:
        results["shapes"][name] = run_shape(name, SHAPES[name], bw)
        print(name, json.dumps(results["shapes"][name]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\n{card}: copy {bw / 1e12:.2f} TB/s. ms (error vs float64); pv: fraction of copy bandwidth, time/t_lim")
    print(f"{'shape':18} {'sdpa':>7} {'bmm16':>7} {'pv16':>18} {'pv8':>18} {'cap16':>7} {'cap8':>7} "
          f"{'err16':>8} {'err8':>8} {'cap8/sdpa':>9}")
    for name, r in results["shapes"].items():
        print(f"{name:18} {r['sdpa_ms']:7.3f} {r['bmm16_ms']:7.3f} "
              f"{r['pv16_ms']:7.3f} {r['pv16_frac_copy']:4.0%} {r['pv16_over_tlim']:4.2f}x "
              f"{r['pv8_ms']:7.3f} {r['pv8_frac_copy']:4.0%} {r['pv8_over_tlim']:4.2f}x "
              f"{r['capture16_ms']:7.3f} {r['capture8_ms']:7.3f} {r['pv16_err']:8.1e} {r['pv8_err']:8.1e} "
              f"{r['capture8_ms'] / r['sdpa_ms']:9.2f}")
    return results


if __name__ == "__main__":
    main()
