"""Host time per attention call: attnreuse's processor and launch path against diffusers' AttnProcessor2_0.

    python bench/host_overhead.py [--calls 2000] [--profile capturing]   # on the CPU: host work, launches no-ops
    python bench/host_overhead.py --device cuda                         # on a GPU: real launches, back to back

An eager UNet on a fast GPU is bound by the host: what a patched layer costs there is the Python and dispatch
work before its kernels start. This measures that work on the CPU: an SD1.5 self-attention layer (8 heads of 40)
called as a UNet calls it (``layer(x)``: diffusers' ``Attention.forward``, then its processor) on one token per
image (batch 2), in fp32 on one thread, its input 8 wide (the projections dispatch as at 320 wide with a tenth of
the arithmetic), as an unpatched layer (AttnProcessor2_0) and as attnreuse's computing, capturing and reusing
calls. The kernel launch itself is a no-op in every case: SDPA (its whole call) for the unpatched layer, Triton's
compiled launcher for attnreuse (everything before it runs: checks, allocation, the launch table). Rounds of
``--calls`` calls of each kind are taken in turn; the fastest round of each is printed, in µs per call and against
the unpatched call. ``--profile KIND`` shows where that kind of call's time goes. ``--device cuda``: the same calls
with their real kernels, fp16, 64 tokens per image (the GPU never the bottleneck): wall time of back-to-back
calls, synchronised at the end, is the host time per call. ``--direct``: the processors alone, without
``Attention.forward`` (which inspects its processor's signature at every call). ``--sdpa real``: the unpatched
layer's SDPA runs (its dispatch and a one-token attention on the CPU), for an unpatched side nearer a GPU's, whose
SDPA call costs the host about 10 µs.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
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
# The layer's input width on the CPU: the projections dispatch as at 320, with ~1 µs of arithmetic instead of ~10
QUERY_DIM = 8


def _noop_sdpa(q, k, v, *args, **kwargs):
    return torch.empty_like(q)


def _first_launch(launch, tensors, aligned, check, reference):
    """A launch shape's first launch (the JIT's, with its check), here: compiled and checked, without compiling."""
    launch.compiled = _CompiledNoop()
    launch.checked(selfcheck.Verdict({}, 0.0, "no device"))


class _CompiledNoop:
    """A compiled kernel whose launcher does nothing: every call before it runs as on a GPU."""

    function = packed_metadata = None

    def launch_metadata(self, grid, stream, *args):  # as Triton's, with no launch hook set
        return None

    def run(self, *args):
        pass


def per_call_us(fns: dict, calls: int, sync=lambda: None, rounds: int = 9) -> dict:
    """µs per call of each of ``fns``: rounds of ``calls`` calls taken in turn (a drift of the machine touches every
    kind alike), the fastest round of each (host work has no reason to be slower than its least disturbed round)."""
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        for _ in range(10):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            best[name] = min(best[name], (time.perf_counter() - t0) / calls * 1e6)
    return best


def report(times: dict) -> None:
    base = next(iter(times.values()))
    for name, us in times.items():
        print(f"{name:30} {us:7.1f} µs per call  ({us - base:+5.1f} µs, {us / base:.2f}× unpatched)")


def calls(fmt: str = "fp8", device: str = "cpu", tokens: int = 1, dtype=torch.float32, query_dim: int | None = None,
          direct: bool = False):
    """``{name: zero-argument call}``: the unpatched layer and attnreuse's three kinds of call, as a UNet makes them
    (``layer(x)``), or with ``direct`` the processors alone (``processor(layer, x)``). ``query_dim``: the layer's
    input width (default heads × head dim); the projections' dispatch does not depend on it. On the CPU every
    launch is a no-op, its first one included (nothing compiles)."""
    b, h, d = SHAPE["batch"], SHAPE["heads"], SHAPE["head_dim"]
    query_dim = query_dim or h * d
    with torch.device(device):
        attn = Attention(query_dim=query_dim, heads=h, dim_head=d).to(dtype)
    x = torch.randn(b, tokens, query_dim, device=device, dtype=dtype)
    plain = AttnProcessor2_0()
    attn.processor = plain
    policies = {"layer": LayerPolicy(True, formats.get(fmt))}

    def patched(schedule: str, step: int):
        """attnreuse's processor over the unpatched one, its clock held at ``step`` of ``schedule`` (one step
        kind for every call, and the maps kept: what a UNet call of that kind runs)."""
        clock = Clock(as_schedule_object(schedule))
        proc = MapReuseProcessor("layer", plain, clock, "auto")
        gen = clock.begin(len(schedule))
        gen.policies = policies
        layer = copy.deepcopy(attn)
        layer.processor = proc
        first = mock.patch.object(selfcheck, "run", _first_launch) if device == "cpu" else contextlib.nullcontext()
        with first:
            for held in sorted({max(step - 1, 0), step}):  # the maps a reuse step reads, the launch shapes
                gen.hold(held)
                layer(x)
        return (lambda: proc(layer, x)) if direct else (lambda: layer(x))

    return {"unpatched (AttnProcessor2_0)": (lambda: plain(attn, x)) if direct else (lambda: attn(x)),
            "attnreuse computing call": patched("11", 0), "attnreuse capturing call": patched("10", 0),
            "attnreuse reusing call": patched("10", 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--format", default="fp8", choices=formats.kernel_formats())
    ap.add_argument("--profile", choices=("computing", "capturing", "reusing"),
                    help="cProfile that kind of call's path")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--direct", action="store_true", help="call the processors alone, not the layers' forward")
    ap.add_argument("--sdpa", default="noop", choices=("noop", "real"),
                    help="the unpatched layer's SDPA: a no-op (default), or run (its dispatch and a 1-token CPU "
                         "attention: nearer what a GPU's SDPA costs the host than nothing)")
    args = ap.parse_args(argv)
    if args.device == "cuda":
        return on_gpu(args)
    from triton.runtime.driver import driver
    torch.set_num_threads(1)  # no thread pool to wake per op
    torch.set_flush_denormal(True)  # no-op launches leave outputs unwritten: no slow denormal arithmetic on them
    driver.set_active(FakeDriver(90))  # launch constants for an H100/H200, as on one
    sdpa = _noop_sdpa if args.sdpa == "noop" else F.scaled_dot_product_attention
    with mock.patch.object(F, "scaled_dot_product_attention", sdpa), \
            mock.patch.object(api, "backend_available", lambda: True), \
            mock.patch.object(api, "KERNEL_DEVICES", {"cuda", "cpu"}), \
            mock.patch.dict(api.VALUE_DTYPES, fp32=torch.float32), torch.no_grad():
        fns = calls(args.format, query_dim=QUERY_DIM, direct=args.direct)
        report(per_call_us(fns, args.calls))
        if args.profile:
            profile = cProfile.Profile()
            fn = fns[f"attnreuse {args.profile} call"]
            profile.runcall(lambda: [fn() for _ in range(args.calls)])
            pstats.Stats(profile).sort_stats("tottime").print_stats(14)
    print(f"{dict(SHAPE, tokens=1, query_dim=QUERY_DIM)}, {args.format} maps, on the CPU, one thread, "
          f"{'processors alone' if args.direct else 'layer calls'}: host work, every kernel launch a no-op"
          + (" but SDPA's (run on the CPU)" if args.sdpa == "real" else ""))
    return 0


def on_gpu(args) -> int:
    with torch.no_grad():
        fns = calls(args.format, "cuda", tokens=64, dtype=torch.float16, direct=args.direct)
        report(per_call_us(fns, args.calls, torch.cuda.synchronize))
    print(f"{torch.cuda.get_device_name()}, {dict(SHAPE, tokens=64)}, fp16, {args.format} maps: back-to-back wall time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
