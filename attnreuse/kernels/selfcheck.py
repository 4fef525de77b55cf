"""Kernels that check themselves where they run: each compiled variant is compared with the PyTorch reference at
its first launch in the process, on a slice of the real inputs.

Why: a kernel can compile cleanly and still compute garbage on one GPU stack (a ptxas that reads registers it never
wrote, on one Triton version and one variant), and CPU tests never run the compiled code. A variant
(:class:`Variant`: kernel, format, head dim, tile, warps, stages, masks, dtypes, Triton's integer specialisation)
is checked once: the kernel runs on the full inputs, then its output rows of the first and the last row tile, of
the first and last batch entry and head, are compared with float32 math. ``cached_pv`` is held to the product of
the map it was given; ``capture`` to exact attention for its output and, for its map, to within twice the error of
the reference's own encoding of the exact probabilities (what the format costs) plus a margin. A variant that
fails or yields a non-finite value warns once, naming the variant, the GPU and the Triton version, and runs the
PyTorch path from then on: that call and every later one get the reference's result, never a wrong image.

Inside CUDA-graph capture nothing can be checked (it needs a host sync): an unchecked variant met there runs the
PyTorch path in that graph, with a warning to run one eager call (or ``python -m attnreuse warmup``) first.
"""
from __future__ import annotations

import functools
import math
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from . import formats
from .reference import cached_pv_reference
from .storage import CachedMap

OUTPUT_TOL = 2e-2  # max |kernel − reference| / max |reference|: wrong kernels were off by ~1 or NaN
MAP_MARGIN = 2e-2  # the map's allowance on top of twice its format's own error
_FLAGS = ("EVEN_M", "EVEN_N", "FRAGMENT", "FP8_CVT", "ASM")


@dataclass(frozen=True)
class Variant:
    """What makes one compiled kernel differ from another, in readable form."""

    kernel: str
    format: str
    arch: int  # the compute capability compiled for (90: sm_90a), 0 in the interpreter
    head_dim: int
    tile: tuple[int, int, int, int]  # BLOCK_M, BLOCK_D, BLOCK_D2, key block
    warps: int
    stages: int
    flags: tuple[str, ...]  # those of _FLAGS that are set
    dtypes: tuple[str, ...]  # activations, then the dot's operand dtype
    ints: str  # Triton's specialisation of the integer arguments: 1 (the value 1), D (divisible by 16), . (neither)

    @classmethod
    def of(cls, kernel: str, fmt: formats.MapFormat, meta: dict, dtypes: tuple, arch: int,
           ints: list[int]) -> "Variant":
        ints = "".join("1" if v == 1 else "D" if v % 16 == 0 else "." for v in ints)
        return cls(kernel, fmt.name, arch, meta["HEAD_DIM"], (meta["BLOCK_M"], meta["BLOCK_D"], meta["BLOCK_D2"],
                   meta["BLOCK_N"]), meta["num_warps"], meta["num_stages"], tuple(f for f in _FLAGS if meta.get(f)),
                   tuple(str(d).replace("torch.", "") for d in dtypes) + (str(meta["DOT_DTYPE"]),), ints)

    def __str__(self) -> str:
        m, d1, d2, n = self.tile
        split = f" split {d1}+{d2}" if d2 else ""
        return (f"{self.kernel} {self.format} maps, d={self.head_dim} ({'/'.join(self.dtypes)}), tile {m}x{n}{split}, "
                f"{self.warps} warps, {self.stages} stages{', ' + ' '.join(self.flags) if self.flags else ''}, "
                + (f"sm_{self.arch}" if self.arch else "interpreted"))


@dataclass(frozen=True)
class Verdict:
    errors: dict  # what was compared ("output", "map") -> (relative error (inf: non-finite), allowed)
    seconds: float  # the check's own cost (kernel excluded)
    device: str

    @functools.cached_property  # read at every launch
    def ok(self) -> bool:
        return all(err <= allowed for err, allowed in self.errors.values())  # False for NaN

    def __str__(self) -> str:
        return ", ".join(f"{what} error {err:.2g} (≤ {allowed:.2g})" for what, (err, allowed) in self.errors.items())


_VERDICTS: dict[Variant, Verdict] = {}
_WARNED: set = set()
_LOCK = threading.Lock()


def verdicts() -> dict[Variant, Verdict]:
    """Every variant checked in this process so far, and its verdict."""
    return dict(_VERDICTS)


def failures() -> list[Variant]:
    return [v for v, verdict in _VERDICTS.items() if not verdict.ok]


def run(launch, tensors: tuple, aligned: bool, check: Callable[[], dict | None], reference: Callable[[], None]) -> None:
    """Launch ``launch(tensors, aligned)``, or ``reference()`` (the PyTorch path into the same buffers) where the
    variant failed its check; at the variant's first launch, check it (``check() -> Verdict.errors``, None when the
    inputs themselves are not finite: no verdict then, the next call checks). ``aligned``: every pointer 16-byte
    aligned (Triton compiles another variant otherwise)."""
    verdict = launch.verdict
    if aligned and verdict is not None and verdict.ok:  # the common case: checked and right
        launch(tensors, aligned)
        return
    variant = launch.variant_of(aligned)
    verdict = _VERDICTS.get(variant)
    if verdict is not None:  # checked at another launch shape
        if aligned:
            launch.checked(verdict)
        launch(tensors, aligned) if verdict.ok else reference()
        return
    device = tensors[0].device
    if device.type == "meta":  # compiled for a target, never run (bench/launches.py)
        launch(tensors, aligned)
        return
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        _warn_once(("graph", variant), f"attnreuse: kernel variant {variant} was first met inside CUDA-graph capture, "
                   "where it cannot be checked: this graph runs the PyTorch path for it. Run one eager call (or "
                   "`python -m attnreuse warmup`) before capturing graphs, so the kernel runs in them")
        reference()
        return
    t0 = time.perf_counter()
    try:
        launch(tensors, aligned)
    except Exception as e:  # noqa: BLE001 (a compile error or resources the GPU lacks: a variant that cannot run)
        errors = {f"launch ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})": (math.inf, 0.0)}
    else:
        errors = check()
        if errors is None:
            return
    verdict = Verdict(errors, time.perf_counter() - t0, _device_name(device))
    with _LOCK:
        verdict = _VERDICTS.setdefault(variant, verdict)
    if aligned:
        launch.checked(verdict)
    if not verdict.ok:
        _warn_once(variant, f"attnreuse: the Triton kernel {variant} failed its check on {verdict.device} with Triton "
                   f"{_triton_version()} ({verdict}, against the PyTorch reference); this call and every later one "
                   "of this variant run the PyTorch path instead (correct, slower). Please report it with this "
                   "message")
        reference()


def _warn_once(key, message: str) -> None:
    with _LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} (Triton's interpreter)"


def _triton_version() -> str:
    import triton
    return triton.__version__


# ---- the comparisons -----------------------------------------------------------------------------------------

class _Slice:
    """The rows a check reads: first and last batch entry and head, the first and the last row tile."""

    def __init__(self, batch: int, heads: int, q_tokens: int, block_m: int, device):
        self.pairs = [(b, h) for b in sorted({0, batch - 1}) for h in sorted({0, heads - 1})]
        last = (q_tokens - 1) // block_m * block_m
        self.rows = torch.tensor(sorted(set(range(min(block_m, q_tokens))) | set(range(last, q_tokens))),
                                 device=device)

    def heads(self, x: torch.Tensor, head_dim: int, rows: bool = True) -> torch.Tensor:
        """``[B, N, H·D]`` -> ``[pairs, R or N, D]`` in float32."""
        return torch.stack([(x[b, self.rows] if rows else x[b])[:, h * head_dim:(h + 1) * head_dim]
                            for b, h in self.pairs]).float()

    def map(self, data, block_max, row_lse, kv_tokens: int, fmt: formats.MapFormat) -> CachedMap:
        """The map rows as a ``[pairs, 1, R, ...]`` :class:`CachedMap`."""
        pick = lambda t, dim: torch.stack([t[b, h].index_select(dim, self.rows) for b, h in self.pairs])  # noqa: E731
        return CachedMap(pick(data, 0).view(fmt.dtype).unsqueeze(1).contiguous(),
                         pick(block_max, 1).unsqueeze(1).contiguous(), pick(row_lse, 0).unsqueeze(1).contiguous(),
                         kv_tokens, fmt)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def cached_pv_errors(out, data, block_max, row_lse, v, heads: int, fmt: formats.MapFormat, block_m: int) -> dict:
    """A ``cached_pv`` launch against the product of the map it was given (None: that product is not finite)."""
    b, h, nq, _ = data.shape
    d = v.shape[2] // heads
    s = _Slice(b, h, nq, block_m, v.device)
    ref = cached_pv_reference(s.map(data, block_max, row_lse, v.shape[1], fmt), s.heads(v, d, rows=False), 1)
    if not torch.isfinite(ref).all():  # the inputs: nothing to say about the kernel
        return None
    return {"output": (_rel(s.heads(out, d), ref), OUTPUT_TOL)}


def capture_errors(out, data, block_max, row_lse, q, k, v, heads: int, scale: float, fmt: formats.MapFormat,
                   block_m: int) -> dict:
    """A capture launch: its output against exact attention; its map's product with V against exact attention,
    allowed twice the error of the reference's own encoding of the exact probabilities plus a margin."""
    b, nq, hd = q.shape
    d, nk = hd // heads, k.shape[1]
    s = _Slice(b, heads, nq, block_m, q.device)
    vs = s.heads(v, d, rows=False)
    probs = (s.heads(q, d) @ s.heads(k, d, rows=False).transpose(1, 2) * scale).softmax(-1)
    exact = probs @ vs
    if not torch.isfinite(exact).all():  # the inputs: nothing to say about the kernel
        return None
    kernel_map = s.map(data, block_max, row_lse, nk, fmt)
    stats_ok = bool(torch.isfinite(kernel_map.row_lse).all() and not torch.isnan(kernel_map.block_max).any()
                    and not torch.isposinf(kernel_map.block_max).any())
    map_err = _rel(cached_pv_reference(kernel_map, vs, 1), exact) if stats_ok else float("inf")
    own = _rel(cached_pv_reference(CachedMap.from_probs(probs.unsqueeze(1), fmt), vs, 1), exact)
    return {"output": (_rel(s.heads(out, d), exact), OUTPUT_TOL), "map": (map_err, 2 * own + MAP_MARGIN)}
