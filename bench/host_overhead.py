"""Host time per attention call: attnreuse's processor and launch path against diffusers' AttnProcessor2_0.

    python bench/host_overhead.py [--calls 2000] [--profile]     # on the CPU: host work only, launches no-ops
    python bench/host_overhead.py --device cuda                   # on a GPU: real launches, back to back

An eager UNet on a fast GPU is bound by the host: what a patched layer costs there is the Python and dispatch
work before its kernels start. This measures that work alone, on the CPU: an SD1.5 self-attention layer (8 heads
of 40) on one token per image (batch 2), in fp32 (the CPU's fp16 matmuls are slow arithmetic, not host work; the
kernels' path is forced to take fp32 here), so that every torch op runs its dispatch with next to no arithmetic, called
as an unpatched layer (AttnProcessor2_0) and as attnreuse's computing, capturing and reusing calls, with the kernel
launch itself (SDPA, or the Triton kernel's launch: its first-use check included) replaced by a no-op in every
case. Prints µs per call (the fastest of 7 rounds of ``--calls`` calls) and, with ``--profile``, where a reuse call's
time goes. ``--device cuda``: the same calls with their real kernels, fp16, 64 tokens per image (the GPU never the
bottleneck): wall time of back-to-back calls, synchronised at the end, is the host time per call.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path
from unittest import mock

if __package__ in (None, ""):  # run as a file: python bench/host_overhead.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from attnreuse.clock import Clock
from attnreuse.config import LayerPolicy
from attnreuse.kernels import api, formats, launchers, selfcheck
from attnreuse.processor import MapReuseProcessor
from attnreuse.schedule import as_schedule_object
from bench.sass import FakeDriver

SHAPE = dict(batch=2, heads=8, head_dim=40)  # SD1.5's largest layer's heads


def _noop_sdpa(q, k, v, *args, **kwargs):
    return torch.empty_like(q)


def _noop_launch(launch, tensors, aligned, check, reference):  # run()'s checked path, the arguments laid out, no launch
    assert aligned and (launch.verdict is None or launch.verdict.ok)
    args = list(launch.args)
    for i, t in zip(launch.tensors, tensors):
        args[i] = t


def per_call_us(fn, calls: int, sync=lambda: None) -> float:
    for _ in range(10):
        fn()
    rounds = []
    for _ in range(7):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
    return min(rounds)  # the least disturbed round: host work has no reason to be slower than that


def calls(fmt: str = "fp8", device: str = "cpu", tokens: int = 1, dtype=torch.float32):
    """``{name: zero-argument call}``: the unpatched layer and attnreuse's three kinds of call."""
    b, h, d = SHAPE["batch"], SHAPE["heads"], SHAPE["head_dim"]
    with torch.device(device):
        attn = Attention(query_dim=h * d, heads=h, dim_head=d).to(dtype)
    x = torch.randn(b, tokens, h * d, device=device, dtype=dtype)
    plain = AttnProcessor2_0()
    policies = {"layer": LayerPolicy(True, formats.get(fmt))}

    def patched(schedule: str, step: int):
        """attnreuse's processor over the unpatched one, its clock held at ``step`` of ``schedule`` (one step
        kind for every call, and the maps kept: what a UNet call of that kind runs)."""
        clock = Clock(as_schedule_object(schedule))
        proc = MapReuseProcessor("layer", plain, clock, "auto")
        gen = clock.begin(len(schedule))
        gen.policies = policies
        if step:
            gen.hold(step - 1)
            proc(attn, x)  # the maps the step reuses
        gen.hold(step)
        return lambda: proc(attn, x)

    return {"unpatched (AttnProcessor2_0)": lambda: plain(attn, x),
            "attnreuse computing call": patched("11", 0), "attnreuse capturing call": patched("10", 0),
            "attnreuse reusing call": patched("10", 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--format", default="fp8", choices=formats.kernel_formats())
    ap.add_argument("--profile", action="store_true", help="cProfile a reuse call's path")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args(argv)
    if args.device == "cuda":
        return on_gpu(args)
    from triton.runtime.driver import driver
    driver.set_active(FakeDriver(90))  # launch constants for an H100/H200, as on one
    with mock.patch.object(F, "scaled_dot_product_attention", _noop_sdpa), \
            mock.patch.object(selfcheck, "run", _noop_launch), mock.patch.object(api, "backend_available", lambda: True), \
            mock.patch.object(api, "KERNEL_DEVICES", {"cuda", "cpu"}), \
            mock.patch.dict(api.VALUE_DTYPES, fp32=torch.float32), torch.no_grad():
        fns = calls(args.format)
        base = None
        for name, fn in fns.items():
            us = per_call_us(fn, args.calls)
            base = base or us
            print(f"{name:30} {us:7.1f} µs per call  ({us / base:.2f}× unpatched)")
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(lambda: [fns["attnreuse reusing call"]() for _ in range(args.calls)])
            pstats.Stats(profile).sort_stats("tottime").print_stats(14)
    print(f"{dict(SHAPE, tokens=1)}, {args.format} maps, on the CPU: host work, every kernel launch a no-op")
    return 0


def on_gpu(args) -> int:
    with torch.no_grad():
        fns = calls(args.format, "cuda", tokens=64, dtype=torch.float16)
        base = None
        for name, fn in fns.items():
            us = per_call_us(fn, args.calls, torch.cuda.synchronize)
            base = base or us
            print(f"{name:30} {us:7.1f} µs per call  ({us / base:.2f}× unpatched)")
    print(f"{torch.cuda.get_device_name()}, {dict(SHAPE, tokens=64)}, fp16, {args.format} maps: back-to-back wall time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
