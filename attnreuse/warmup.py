"""Compile the kernels for every attention shape of a model before the first generation.

``python -m attnreuse.warmup --model sd15 --resolution 512 --cache-dtype fp8`` runs capture and cached_pv once
per attention shape and map dtype on the GPU. Triton keeps the compiled kernels in its cache
(``~/.triton/cache``, or ``$TRITON_CACHE_DIR``), so later processes start without compiling.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .architectures import CONFIGS, attention_shapes
from .kernels import formats
from .kernels.api import VALUE_DTYPES


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
    args = ap.parse_args(argv)
    if args.resolution <= 0 or args.resolution % 64:
        ap.error(f"--resolution {args.resolution}: pass a positive multiple of 64 (e.g. 512, 768, 1024)")
    if args.batch <= 0:
        ap.error("--batch must be positive")
    return args


def warm(model: str, resolution: int, cache_dtypes: list[str], dtype: torch.dtype, batch: int = 2) -> float:
    """Run every (shape, map format) once; print each one's seconds; return the total."""
    from .kernels import cached_pv, capture

    total = 0.0
    for fmt in cache_dtypes:
        for (b, h, nq, nk, d), layers in attention_shapes(model, resolution, batch).items():
            q = torch.randn(b, nq, h * d, device="cuda", dtype=dtype)
            k, v = (torch.randn(b, nk, h * d, device="cuda", dtype=dtype) for _ in range(2))
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            _, cmap = capture(q, k, v, h, d ** -0.5, fmt, backend="triton")
            cached_pv(cmap, v, h, backend="triton")
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            total += dt
            print(f"{fmt:5} heads {h:2} q {nq:5} kv {nk:5} d {d:3} "
                  f"({layers:2} layers): {dt:6.2f} s", flush=True)
            del q, k, v, cmap
    return total


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("attnreuse warmup: no CUDA device here. The Triton kernels only run on a CUDA GPU; on other "
                 "devices attnreuse uses its PyTorch path, which needs no warm-up.")
    from .kernels import backend_available
    if not backend_available():
        sys.exit("attnreuse warmup: Triton is not importable: install triton (pip install triton).")
    t0 = time.perf_counter()
    warm(args.model, args.resolution, args.cache_dtype, VALUE_DTYPES[args.dtype], args.batch)
    print(f"{args.model} {args.resolution}px, maps {' '.join(args.cache_dtype)}: kernels ready in "
          f"{time.perf_counter() - t0:.1f} s on {torch.cuda.get_device_name()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
