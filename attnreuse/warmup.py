"""Get a model's kernels ready before its first generation: compile them, check them, time them.

``python -m attnreuse warmup --model sd15 --resolution 512 --cache-dtype fp8`` runs capture and cached_pv once per
attention shape and map format of the model on the GPU. That compiles each kernel variant (Triton keeps them in
``~/.triton/cache``, or ``$TRITON_CACHE_DIR``, for later processes) and runs its first-use check against the
PyTorch reference (:mod:`attnreuse.kernels.selfcheck`): one line per variant, ``ok`` or ``WRONG`` (a wrong variant
runs the PyTorch path in that process and in every later one that checks it). Then it measures the per-layer
costs the default plan decides with (:mod:`attnreuse.costs`, ``--modes``), kept on disk for this GPU, so the first
generation times nothing.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .architectures import CONFIGS, TEXT_TOKENS, attention_shapes, build
from .kernels import formats
from .kernels.api import VALUE_DTYPES
from .kernels.tuning import MAX_HEAD_DIM


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="attnreuse warmup", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(CONFIGS), default="sd15", help="UNet whose attention shapes to compile")
    ap.add_argument("--resolution", type=int, default=512, help="image side in pixels (a multiple of 64)")
    ap.add_argument("--cache-dtype", nargs="+", default=["fp8"],
                    choices=formats.kernel_formats(),
                    help="map format(s) the patched model will store")
    ap.add_argument("--dtype", choices=sorted(VALUE_DTYPES), default="fp16", help="the model's activation dtype")
    ap.add_argument("--batch", type=int, default=2, help="UNet batch (2 with classifier-free guidance)")
    ap.add_argument("--modes", nargs="*", choices=("eager", "graphed"), default=["eager", "graphed"],
                    help="cost tables to measure for the default plan: eager and/or CUDA-graph (none: skip)")
    args = ap.parse_args(argv)
    if args.resolution <= 0 or args.resolution % 64:
        ap.error(f"--resolution {args.resolution}: pass a positive multiple of 64 (e.g. 512, 768, 1024)")
    if args.batch <= 0:
        ap.error("--batch must be positive")
    return args


def warm(model: str, resolution: int, cache_dtypes: list[str], dtype: torch.dtype, batch: int = 2,
         device: str = "cuda") -> dict:
    """Run capture and cached_pv once per (shape, map format) the kernels take; print each kernel variant's
    first-use check. Returns ``{variant: verdict}`` of every variant checked in this process."""
    from .kernels import cached_pv, capture, selfcheck

    before = set(selfcheck.verdicts())
    for fmt in cache_dtypes:
        for (b, h, nq, nk, d), layers in attention_shapes(model, resolution, batch).items():
            if d > MAX_HEAD_DIM:
                print(f"{fmt:5} heads {h:2} q {nq:5} kv {nk:5} d {d:3} ({layers:2} layers): PyTorch path", flush=True)
                continue
            q = torch.randn(b, nq, h * d, device=device, dtype=dtype)
            k, v = (torch.randn(b, nk, h * d, device=device, dtype=dtype) for _ in range(2))
            t0 = time.perf_counter()
            _, cmap = capture(q, k, v, h, d ** -0.5, fmt, backend="triton")
            cached_pv(cmap, v, h, backend="triton")
            if device == "cuda":
                torch.cuda.synchronize()
            new = {var: ver for var, ver in selfcheck.verdicts().items() if var not in before}
            before |= set(new)
            print(f"{fmt:5} heads {h:2} q {nq:5} kv {nk:5} d {d:3} ({layers:2} layers): "
                  f"{time.perf_counter() - t0:6.2f} s", flush=True)
            for var, ver in new.items():
                print(f"    {'ok   ' if ver.ok else 'WRONG'} {var}: {ver}; check {ver.seconds * 1e3:.0f} ms", flush=True)
            del q, k, v, cmap
    return {var: ver for var, ver in selfcheck.verdicts().items()}


def measure(model: str, resolution: int, cache_dtypes: list[str], dtype: torch.dtype, batch: int,
            modes: list[str]) -> int:
    """Fill this GPU's cost table for the model's layers in ``modes``; returns the entries measured or found."""
    from .costs import measure_costs, shapes_of

    unet = build(model, resolution, "meta")
    shapes = shapes_of(unet, (batch, unet.config.in_channels, resolution // 8, resolution // 8), TEXT_TOKENS)
    models_dtype = formats.get(dtype)
    return len(measure_costs(shapes, [models_dtype, *cache_dtypes], "cuda", dtype, modes))


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("attnreuse warmup: no CUDA device here. The Triton kernels only run on a CUDA GPU; on other "
                 "devices attnreuse uses its PyTorch path, which needs no warm-up.")
    from .kernels import backend_available
    if not backend_available():
        sys.exit("attnreuse warmup: Triton is not importable: install triton (pip install triton).")
    dtype = VALUE_DTYPES[args.dtype]
    t0 = time.perf_counter()
    verdicts = warm(args.model, args.resolution, args.cache_dtype, dtype, args.batch)
    compiled = time.perf_counter() - t0
    wrong = [var for var, ver in verdicts.items() if not ver.ok]
    check_s = sum(ver.seconds for ver in verdicts.values())
    print(f"{args.model} {args.resolution}px, maps {' '.join(args.cache_dtype)}: kernels ready in {compiled:.1f} s on "
          f"{torch.cuda.get_device_name()}; {len(verdicts)} variants checked in {check_s * 1e3:.0f} ms "
          f"({check_s * 1e3 / max(1, len(verdicts)):.0f} ms each), {len(wrong)} wrong"
          + (" (they run the PyTorch path)" if wrong else ""))
    if args.modes:
        t1 = time.perf_counter()
        entries = measure(args.model, args.resolution, args.cache_dtype, dtype, args.batch, args.modes)
        print(f"cost table: {entries} entries ({', '.join(args.modes)}) in {time.perf_counter() - t1:.1f} s")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
