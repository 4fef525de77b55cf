"""Per-layer reuse plan: which layers reuse, with which map format, under a memory budget.

A layer's reuse saves, per generation, ``n_reuse · (t_compute − t_reuse) − n_capture · (t_capture − t_compute)``
milliseconds, where ``t_compute`` is what an ordinary step spends on the map (``to_q``, ``to_k`` and
attention), ``t_capture`` the same with the map stored, and ``t_reuse`` the ``A·V`` of a reuse step.
The plan keeps layers whose saving is positive, best saving per byte first, until the budget is full.
Costs are measured once per shape on the device at hand and kept in memory (:data:`COSTS`).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from . import kernels
from .kernels import MapFormat, formats, storage_nbytes
from .timing import median_ms
from .kernels.reference import split_heads


@dataclass(frozen=True)
class LayerShape:
    """What a layer's map cost depends on (``q_dim``/``kv_dim``: widths entering ``to_q``/``to_k``)."""

    batch: int
    heads: int
    q_tokens: int
    kv_tokens: int
    head_dim: int
    q_dim: int
    kv_dim: int


@dataclass(frozen=True)
class LayerCost:
    """Milliseconds per call of one layer on one device."""

    compute: float  # to_q + to_k + fused attention
    capture: float  # to_q + to_k + attention that stores its map (this format)
    reuse: float  # cached map × V (this format)


@dataclass(frozen=True)
class LayerPlan:
    name: str
    reuse: bool
    format: MapFormat | None  # map storage when reusing
    bytes: int  # map bytes held while reusing
    saving_ms: float  # expected per generation (one branch), for the chosen format
    reason: str


CostFn = Callable[[LayerShape, MapFormat], LayerCost]


def make_plan(shapes: dict[str, LayerShape], cost: CostFn, candidates: Iterable, n_reuse: int,
              n_capture: int, max_bytes: float = math.inf) -> list[LayerPlan]:
    """Choose per layer whether to reuse and in which of the map formats ``candidates``; never more than
    ``max_bytes`` in all.

    Each layer takes the format with the largest saving (ties: fewer bytes); layers are then admitted by
    saving per byte while the budget lasts.
    """
    candidates = [formats.get(c) for c in candidates]
    options = {}
    for name, shape in shapes.items():
        best = None
        for fmt in candidates:
            c = cost(shape, fmt)
            saving = n_reuse * (c.compute - c.reuse) - n_capture * (c.capture - c.compute)
            nbytes = storage_nbytes(shape.batch, shape.heads, shape.q_tokens, shape.kv_tokens, fmt)
            if best is None or (saving, -nbytes) > (best[1], -best[2]):
                best = (fmt, saving, nbytes)
        options[name] = best
    plans, used = {}, 0
    for name, (fmt, saving, nbytes) in sorted(options.items(), key=lambda kv: -kv[1][1] / kv[1][2]):
        if saving <= 0:
            plans[name] = LayerPlan(name, False, None, 0, 0.0, "reuse is not faster than recomputing here")
        elif used + nbytes > max_bytes:
            plans[name] = LayerPlan(name, False, None, 0, 0.0, "over the memory budget")
        else:
            used += nbytes
            plans[name] = LayerPlan(name, True, fmt, nbytes, saving, "reuse")
    if plans and not any(p.reuse for p in plans.values()):
        warnings.warn("attnreuse: no layer is worth reusing within the budget "
                      f"({max_bytes:.3g} bytes): sampling runs with plain attention", stacklevel=3)
    return [plans[name] for name in shapes]


def layer_shapes(unet, names: Iterable[str], sample_shape: tuple[int, ...],
                 context_tokens: int) -> dict[str, LayerShape]:
    """The map shape of each named attention layer of a diffusers UNet for one call's input shape."""
    batch, _, height, width = sample_shape
    patch = getattr(unet.config, "patch_size", None) if hasattr(unet, "transformer_blocks") else None
    down = [b.downsamplers is not None for b in getattr(unet, "down_blocks", ())]
    up = [getattr(b, "upsamplers", None) is not None for b in getattr(unet, "up_blocks", ())]
    modules = dict(unet.named_modules())
    out = {}
    for name in names:
        parts = name.split(".")
        if patch:  # a DiT: every layer sees the latent's patches
            factor = patch
        elif parts[0] == "down_blocks":
            factor = 2 ** sum(down[: int(parts[1])])
        elif parts[0] == "mid_block":
            factor = 2 ** sum(down)
        elif parts[0] == "up_blocks":
            factor = 2 ** (sum(down) - sum(up[: int(parts[1])]))
        else:
            raise TypeError(f"{name}: cannot place this layer in the UNet to plan it; pass cache_dtype and no "
                            "max_cache_bytes to reuse without a plan")
        attn = modules[name]
        inner = attn.to_q.out_features
        q_tokens = math.ceil(height / factor) * math.ceil(width / factor)
        out[name] = LayerShape(batch, attn.heads, q_tokens, context_tokens if attn.is_cross_attention else q_tokens,
                               inner // attn.heads, attn.to_q.in_features, attn.to_k.in_features)
    return out


# ---- measured costs -----------------------------------------------------------------------------------

COSTS: dict[tuple, LayerCost] = {}  # (shape, map format, model dtype, device name, backend) -> cost


def measured_cost(device: torch.device, model_dtype: torch.dtype, backend: str = "auto") -> CostFn:
    """A cost function that times each new shape on ``device`` once, with the backend attnreuse would use."""
    def cost(shape: LayerShape, fmt: MapFormat) -> LayerCost:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        key = (shape, fmt.name, model_dtype, name, backend)
        if key not in COSTS:
            COSTS[key] = _measure(shape, fmt, device, model_dtype, backend)
        return COSTS[key]
    return cost


@torch.no_grad()
def _measure(s: LayerShape, fmt: MapFormat, device, model_dtype, backend) -> LayerCost:
    def rand(*size):
        return torch.randn(*size, device=device, dtype=model_dtype)
    hs, ctx = rand(s.batch, s.q_tokens, s.q_dim), rand(s.batch, s.kv_tokens, s.kv_dim)
    wq, wk = rand(s.heads * s.head_dim, s.q_dim), rand(s.heads * s.head_dim, s.kv_dim)
    v = rand(s.batch, s.kv_tokens, s.heads * s.head_dim)

    def compute():
        q, k = F.linear(hs, wq), F.linear(ctx, wk)
        return F.scaled_dot_product_attention(split_heads(q, s.heads), split_heads(k, s.heads),
                                              split_heads(v, s.heads))

    def capture():
        return kernels.capture(F.linear(hs, wq), F.linear(ctx, wk), v, s.heads, s.head_dim ** -0.5, fmt,
                               backend=backend)

    cmap = capture()[1]
    return LayerCost(compute=median_ms(compute, device), capture=median_ms(capture, device),
                     reuse=median_ms(lambda: kernels.cached_pv(cmap, v, s.heads, backend=backend), device))


def auto_formats(model_dtype: torch.dtype) -> tuple[MapFormat, ...]:
    """The map formats ``cache_dtype="auto"`` chooses among, by measured time saved: the model's dtype, fp8
    and fp4 (their quality cost against fp16 maps on the embedded model's PHAST schedules: docs/fidelity.md)."""
    return tuple(dict.fromkeys((formats.get(model_dtype), formats.get("fp8"), formats.get("fp4"))))
