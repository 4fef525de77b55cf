"""Kernel table on a GPU: ``python bench/kernel_table.py [--shapes NAME ...] [--json out.json]``.

Per shape (the anchor shapes of SD1.5/SDXL attention): SDPA, SageAttention 1.0.6 (where its head dims allow),
``torch.bmm`` over an fp16 map, ``cached_pv`` with fp16 and fp8 maps, the one-pass capture (fp16 and fp8 maps),
each with its error against float64 and, for reuse, its bytes/s as a fraction of a device-to-device copy
measured in the same run and its time over ``t_lim = map bytes / copy bandwidth``. Capture is compared with
its own limit ``SDPA + map bytes / copy bandwidth`` (target ≤ 1.3×). Then a whole-generation line: the
attention kernels of 20 SD1.5 512² steps (all 32 layers, batch 2) with SDPA, SageAttention, and attnreuse's
HURRY-10 and PHAST-10 schedules (SDPA on computing steps, capture before a reuse, cached_pv on reuse steps).

``--sweep``: time the named config variants of :mod:`attnreuse.kernels.tuning` per shape (fp16/fp8 reuse,
fp8 capture) to choose the rule. ``--single KERNEL``: run one kernel a few times and exit, for a profiler:
``ncu --kernel-name regex:cached_pv --launch-skip 1 --launch-count 1 python bench/kernel_table.py --single pv8``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a file: python bench/kernel_table.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from attnreuse.architectures import attention_shapes
from attnreuse.kernels import CachedMap, cached_pv, capture, formats
from attnreuse.kernels.reference import merge_heads, split_heads
from attnreuse.kernels.launchers import capture_buffers, empty_rows, launch_cached_pv, launch_capture, target_arch
from attnreuse.kernels.tuning import RULES, VARIANTS
from bench.measure import FORMAT_TAGS, PHAST_SD15, SHAPES, bench_ms, copy_bandwidth  # noqa: E402

MAP_FORMATS = {tag: FORMAT_TAGS[tag] for tag in ("16", "8")}  # the table's columns; --fp4 adds "4"
SAGE_HEAD_DIMS = (64, 96, 128)  # sageattention 1.0.6 asserts headdim in [64, 96, 128] (core.py)
DEVICE = "cuda"  # a CPU smoke test runs the same code in Triton's interpreter
SCHEDULES = {"HURRY-10": "1" * 10 + "0" * 10, "PHAST-10": PHAST_SD15}  # SD1.5, 20-step DDIM


def rel_err(got, ref) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


def make_inputs(shape, seed=0):
    b, h, nq, nk, d = shape
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return [torch.randn(b, n, h * d, device=DEVICE, generator=g, dtype=torch.float16) for n in (nq, nk, nk)]


def error_rows(q, k, v, h, scale, rows: int = 256):
    """float64 reference for the first ``rows`` query rows (keeps the 1024px check cheap)."""
    qh = split_heads(q[:, :rows].double(), h)
    p = (qh @ split_heads(k.double(), h).transpose(-1, -2) * scale).softmax(-1)
    return p, merge_heads(p @ split_heads(v.double(), h))


def sage_call(qh, kh, vh, scale):
    """``(fn, note)``: SageAttention on these heads, zero-padding the head dim to the next size it supports
    (padding q and k keeps q·kᵀ; padded v columns are cut off), or ``(None, why not)``."""
    try:
        from sageattention import sageattn
    except ImportError as e:
        return None, f"not installed ({e.name})"
    d = qh.shape[-1]
    target = next((t for t in SAGE_HEAD_DIMS if t >= d), None)
    if target is None:
        return None, f"d={d} unsupported (head dims {SAGE_HEAD_DIMS})"
    kc = kh.clone()  # smooth_k subtracts k's mean in place
    if target == d:
        return (lambda: sageattn(qh, kc, vh, tensor_layout="HND", sm_scale=scale)), ""
    pad = (0, target - d)
    return (lambda: sageattn(F.pad(qh, pad), F.pad(kc, pad), F.pad(vh, pad), tensor_layout="HND",
                             sm_scale=scale)[..., :d]), f"d={d} padded to {target}"


def measure(shape, bw, errors: bool = True) -> dict:
    """Every kernel on one shape: ms, and (``errors``) relative errors against float64."""
    b, h, nq, nk, d = shape
    q, k, v = make_inputs(shape)
    scale = d ** -0.5
    r = {"shape": list(shape)}
    qh, kh, vh = (split_heads(x, h) for x in (q, k, v))  # the views diffusers passes to SDPA
    r["sdpa_ms"] = bench_ms(lambda: F.scaled_dot_product_attention(qh, kh, vh))
    if errors:
        p_ref, o_ref = error_rows(q, k, v, h, scale)
        rows = p_ref.shape[2]
    fn, r["sage_note"] = sage_call(qh, kh, vh, scale)
    if fn is not None:
        r["sage_ms"] = bench_ms(fn)
        if errors:
            r["sage_err"] = rel_err(merge_heads(fn())[:, :rows], o_ref)
    for tag, fmt in MAP_FORMATS.items():  # backend auto: the kernels, or PyTorch where they do not go (d > 128)
        out, cmap = capture(q, k, v, h, scale, fmt)
        r[f"capture{tag}_ms"] = bench_ms(lambda: capture(q, k, v, h, scale, fmt))
        r[f"capture{tag}_over_limit"] = r[f"capture{tag}_ms"] / (r["sdpa_ms"] + cmap.nbytes / bw * 1e3)
        pv = cached_pv(cmap, v, h)
        r[f"pv{tag}_ms"] = bench_ms(lambda: cached_pv(cmap, v, h))
        r[f"pv{tag}_frac_copy"] = (cmap.nbytes + v.nbytes + pv.nbytes) / (r[f"pv{tag}_ms"] * 1e-3) / bw
        r[f"pv{tag}_over_tlim"] = r[f"pv{tag}_ms"] / (cmap.nbytes / bw * 1e3)
        r[f"map{tag}_bytes"] = cmap.nbytes
        if errors:
            r[f"capture{tag}_err"] = rel_err(out[:, :rows], o_ref)
            head = CachedMap(cmap.data[:, :, :rows].contiguous(), cmap.block_max[..., :rows].contiguous(),
                             cmap.row_lse[..., :rows].contiguous(), cmap.kv_tokens, cmap.format)
            r[f"map{tag}_err"] = rel_err(head.dequantize(torch.float64), p_ref)
            r[f"pv{tag}_err"] = rel_err(pv[:, :rows], o_ref)
        del out, cmap, pv
        torch.cuda.empty_cache()
    probs = torch.rand(b * h, nq, nk, device=DEVICE, dtype=torch.float16)
    vb = vh.reshape(b * h, nk, d)
    r["bmm16_ms"] = bench_ms(lambda: torch.bmm(probs, vb))
    return r


def generation(bw, measured: dict, model: str = "sd15", px: int = 512, steps: int = 20) -> dict:
    """Attention-kernel ms of a whole ``steps``-step generation, per method; ``measured``: shape -> row (reused)."""
    shapes = attention_shapes(model, px)
    for shape in shapes:
        if shape not in measured:
            measured[shape] = measure(shape, bw, errors=False)

    def total(per_layer) -> float:
        return sum(n * per_layer(measured[s]) for s, n in shapes.items())

    sdpa = total(lambda r: r["sdpa_ms"])
    g = {"sdpa_ms": steps * sdpa,
         "sage_ms": steps * total(lambda r: r.get("sage_ms", r["sdpa_ms"])),
         "sage_note": "; ".join(sorted({r["sage_note"] for s in shapes for r in [measured[s]] if r["sage_note"]}))}
    for tag in MAP_FORMATS:
        cap, reuse = total(lambda r: r[f"capture{tag}_ms"]), total(lambda r: r[f"pv{tag}_ms"])
        for name, pi in SCHEDULES.items():
            assert len(pi) == steps
            n_reuse = pi.count("0")
            n_cap = sum(pi[i] == "1" and pi[i + 1] == "0" for i in range(steps - 1))
            g[f"{name}_fp{tag}_ms"] = (steps - n_reuse - n_cap) * sdpa + n_cap * cap + n_reuse * reuse
    return g


def sweep(name, shape, bw) -> dict:
    """ms (and time over its limit) of every config variant: fp16/fp8 reuse, fp8 capture."""
    b, h, nq, nk, d = shape
    q, k, v = make_inputs(shape)
    rows = {}
    arch = target_arch()
    for tag, fmt in MAP_FORMATS.items():
        _, cmap = capture(q, k, v, h, d ** -0.5, fmt, backend="triton")
        out = empty_rows(b, nq, h * d, q.dtype, q.device)
        rule = RULES["cached_pv"](d, nq, nk, cmap.format, arch)
        for var, f in VARIANTS["cached_pv"].items():
            cfg = f(rule)
            rows[f"pv{tag}/{var}"] = _timed(lambda: launch_cached_pv(out, cmap.data, cmap.block_max, cmap.row_lse, v,
                                                                      h, fmt, config=cfg), cmap.nbytes / bw * 1e3, cfg)
        del cmap
    bufs = capture_buffers(q, k, v, h, "fp8")
    sdpa = bench_ms(lambda: F.scaled_dot_product_attention(*(split_heads(x, h) for x in (q, k, v))))
    rule = RULES["capture"](d, nq, nk, formats.get("fp8"), arch)
    for var, f in VARIANTS["capture"].items():
        cfg = f(rule)
        limit = sdpa + sum(t.nbytes for t in bufs[1:]) / bw * 1e3
        rows[f"capture8/{var}"] = _timed(lambda: launch_capture(*bufs, q, k, v, h, d ** -0.5, "fp8", config=cfg),
                                         limit, cfg)
    for key, r in rows.items():
        print(f"  {name:18} {key:22} {r.get('ms', float('nan')):8.4f} ms {r.get('over_limit', float('nan')):5.2f}x "
              f"{r['config']} {r.get('error', '')}", flush=True)
    return rows


def _timed(fn, limit_ms, cfg) -> dict:
    try:
        ms = bench_ms(fn)
    except Exception as e:  # a variant that does not fit this card (shared memory, registers) is a result too
        return {"config": repr(cfg), "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    return {"config": repr(cfg), "ms": ms, "over_limit": ms / limit_ms}


def single(kernel: str, shape, variant: str, reps: int) -> None:
    """Run one kernel ``reps`` times (after one warm-up launch) for a profiler."""
    b, h, nq, nk, d = shape
    q, k, v = make_inputs(shape)
    fmt = formats.get(FORMAT_TAGS[kernel[-1]])
    if kernel.startswith("pv"):
        _, cmap = capture(q, k, v, h, d ** -0.5, fmt, backend="triton")
        out = empty_rows(b, nq, h * d, q.dtype, q.device)
        cfg = VARIANTS["cached_pv"][variant](RULES["cached_pv"](d, nq, nk, fmt, target_arch()))
        fn = lambda: launch_cached_pv(out, cmap.data, cmap.block_max, cmap.row_lse, v, h, fmt, config=cfg)  # noqa: E731
    else:
        bufs = capture_buffers(q, k, v, h, fmt)
        cfg = VARIANTS["capture"][variant](RULES["capture"](d, nq, nk, fmt, target_arch()))
        fn = lambda: launch_capture(*bufs, q, k, v, h, d ** -0.5, fmt, config=cfg)  # noqa: E731
    for _ in range(reps + 1):
        fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    print(f"{kernel} {cfg} on {tuple(shape)}: {reps + 1} launches done")


def print_table(res: dict) -> None:
    print(f"\n{res['card']}: copy {res['copy_TBps']:.2f} TB/s. ms (error vs float64); pv: fraction of copy "
          "bandwidth, time / t_lim; capture: time / (SDPA + map bytes / copy bandwidth), target <= 1.3")
    print(f"{'shape':18} {'sdpa':>7} {'sage':>7} {'bmm16':>7} {'pv16':>19} {'pv8':>19} {'cap16':>13} {'cap8':>13} "
          f"{'err16':>8} {'err8':>8}" + ("      pv4 ms / t_lim, err" if "4" in MAP_FORMATS else ""))
    notes = []
    for name, r in res["shapes"].items():
        sage = f"{r['sage_ms']:7.3f}" if "sage_ms" in r else f"{'n/a':>7}"
        if r["sage_note"]:
            notes.append(f"{name}: SageAttention {r['sage_note']}")
        print(f"{name:18} {r['sdpa_ms']:7.3f} {sage} {r['bmm16_ms']:7.3f} "
              f"{r['pv16_ms']:7.3f} {r['pv16_frac_copy']:4.0%} {r['pv16_over_tlim']:5.2f}x "
              f"{r['pv8_ms']:7.3f} {r['pv8_frac_copy']:4.0%} {r['pv8_over_tlim']:5.2f}x "
              f"{r['capture16_ms']:7.3f} {r['capture16_over_limit']:4.2f}x {r['capture8_ms']:7.3f} "
              f"{r['capture8_over_limit']:4.2f}x {r['pv16_err']:8.1e} {r['pv8_err']:8.1e}"
              + (f" {r['pv4_ms']:7.3f} {r['pv4_over_tlim']:5.2f}x {r['pv4_err']:8.1e}" if "pv4_ms" in r else ""))
    for n in notes:
        print("  " + n)
    if "generation" in res:
        g = res["generation"]
        print(f"\nSD1.5 512², 20 steps, attention kernels only (32 layers, batch 2; a reuse step also skips "
              f"to_q/to_k, not counted): SDPA {g['sdpa_ms']:.1f} ms, SageAttention {g['sage_ms']:.1f} ms "
              f"({g['sage_note'] or 'all layers'}; SDPA where unsupported)")
        for name in SCHEDULES:
            print(f"  {name}: fp8 maps {g[f'{name}_fp8_ms']:.1f} ms ({g[f'{name}_fp8_ms'] / g['sdpa_ms']:.2f}x SDPA), "
                  f"fp16 maps {g[f'{name}_fp16_ms']:.1f} ms ({g[f'{name}_fp16_ms'] / g['sdpa_ms']:.2f}x)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--no-generation", action="store_true", help="skip the whole-generation line")
    ap.add_argument("--sweep", action="store_true", help="time the config variants instead of the table")
    ap.add_argument("--single", choices=["pv16", "pv8", "pv4", "capture16", "capture8", "capture4"],
                    help="one kernel, for ncu")
    ap.add_argument("--variant", default="rule", help="config variant for --single (see tuning.VARIANTS)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fp4", action="store_true", help="also time 4-bit maps (capture and reuse)")
    args = ap.parse_args(argv)
    if args.fp4:
        MAP_FORMATS["4"] = FORMAT_TAGS["4"]
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernel_table.py times Triton kernels: it needs a CUDA GPU")
    if args.single:
        single(args.single, SHAPES[args.shapes[0]], args.variant, args.reps)
        return None
    card = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    props = torch.cuda.get_device_properties(0)
    clock = getattr(props, "clock_rate", 0)  # kHz, where this torch reports it
    res = {"card": card, "copy_TBps": bw / 1e12, "torch": torch.__version__, "sm_count": props.multi_processor_count,
           "sm_clock_ghz": clock / 1e6 if clock else None, "shapes": {}}
    if args.sweep:
        res["sweep"] = {name: sweep(name, SHAPES[name], bw) for name in args.shapes}
    else:
        measured = {}
        for name in args.shapes:
            r = measured[SHAPES[name]] = res["shapes"][name] = measure(SHAPES[name], bw)
            print(name, json.dumps(r), flush=True)
            if args.json:  # as it goes: a timeout keeps what finished
                Path(args.json).write_text(json.dumps(res, indent=1))
        if not args.no_generation:
            res["generation"] = generation(bw, measured)
            res["layers"] = {"x".join(map(str, s)): r for s, r in measured.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    if not args.sweep:
        print_table(res)
    print(card)
    return res


if __name__ == "__main__":
    main()
