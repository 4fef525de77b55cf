"""``python -m attnreuse demo``: the embedded digits model with and without attention-map reuse."""
from __future__ import annotations

import argparse
import math
import time

import torch

import attnreuse
from attnreuse.embedded import generate, load_default, searched_schedules
from attnreuse.embedded.grid import save_grid

PAPER_RHO = 0.31  # cost of a reuse step relative to a computing step in the paper's setting


def demo(args) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = load_default("ddim", device=device, dtype=dtype)
    pairs = [(c, 7) for c in args.classes]
    n, r = args.steps, args.reuse
    phast = searched_schedules().get(f"ddim-{n}-{r}", {}).get("schedule")
    fewer = math.floor(n - r * (1 - PAPER_RHO))
    methods = [(f"full {n} steps", None, n), (f"HURRY-{r}", attnreuse.hurry(n, r), n)]
    if phast:
        methods.append((f"PHAST-{r}", attnreuse.as_schedule(phast), n))
    methods.append((f"{fewer} steps (same cost at ρ={PAPER_RHO})", None, fewer))

    generate(pipe, pairs, n)  # warm-up (and Triton autotuning on a GPU)
    rows, reference = [], None
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; classes {args.classes}")
    for name, schedule, steps in methods:
        if schedule is not None:
            with attnreuse.patch(pipe, schedule, cache_dtype=args.cache_dtype):
                generate(pipe, pairs, steps)  # warm-up of the patched path
                t0 = time.perf_counter()
                images = generate(pipe, pairs, steps)
        else:
            t0 = time.perf_counter()
            images = generate(pipe, pairs, steps)
        if device == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        reference = images if reference is None else reference
        db = attnreuse.psnr(images, reference).mean().item()
        label = "reference" if images is reference else f"{db:6.2f} dB"
        sched = "".join(map(str, schedule)) if schedule else ""
        print(f"{name:34} {sched:22} PSNR {label:>10}   {ms:7.1f} ms")
        rows.append(images.cpu())
    save_grid(rows, args.out)
    print(f"rows: {', '.join(m[0] for m in methods)} -> {args.out}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m attnreuse")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="sample the embedded model with the full sampler, HURRY, PHAST and fewer steps")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--reuse", type=int, default=10)
    p.add_argument("--classes", type=int, nargs="+", default=[0, 2, 3, 5, 7, 8])
    p.add_argument("--cache-dtype", default=None, help="map storage: fp16, bf16, fp32 or fp8")
    p.add_argument("--out", default="attnreuse_demo.png")
    args = parser.parse_args(argv)
    demo(args)


if __name__ == "__main__":
    main()
