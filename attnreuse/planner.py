"""Per-layer reuse plan: which layers reuse, with which map format, under a memory budget (pure logic: the
costs come from :mod:`attnreuse.costs`, measured on the GPU at hand, or from the user).

A layer's reuse saves, per generation, ``n_reuse · (t_compute − t_reuse) − n_capture · (t_capture − t_compute)``
milliseconds, where ``t_compute`` is what an ordinary step spends on the map (``to_q``, ``to_k`` and
attention), ``t_capture`` the same with the map stored, and ``t_reuse`` the ``A·V`` of a reuse step.
The plan keeps layers whose saving is positive, best saving per byte first, until the budget is full.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

from .kernels import MapFormat, formats, storage_nbytes


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
    """One layer's decision. ``cost`` (per call) is that of ``format`` when the layer reuses, else of the map
    format that came closest to paying (``considered``); ``n_reuse`` / ``n_capture``: the generation's reuse
    and capture steps the saving was counted over; ``mode``: the mode the plan was made for (``"eager"``,
    ``"graphed"``; a cost model without modes gives the same costs to both)."""

    name: str
    reuse: bool
    format: MapFormat | None  # map storage when reusing
    bytes: int  # map bytes held while reusing
    saving_ms: float  # expected per generation (one branch), for the chosen format; 0 when the layer computes
    reason: str
    cost: LayerCost | None = None
    considered: MapFormat | None = None
    n_reuse: int = 0
    n_capture: int = 0
    mode: str | None = None

    @property
    def reuse_saves_ms(self) -> float:
        """What the reuse steps save: ``n_reuse · (compute − reuse)``."""
        return self.n_reuse * (self.cost.compute - self.cost.reuse) if self.cost else 0.0

    @property
    def captures_add_ms(self) -> float:
        """What the capture steps add: ``n_capture · (capture − compute)``."""
        return self.n_capture * (self.cost.capture - self.cost.compute) if self.cost else 0.0

    @property
    def net_ms(self) -> float:
        """Time saved per generation (one branch) if the layer reused: negative where reuse does not pay."""
        return self.reuse_saves_ms - self.captures_add_ms


CostFn = Callable[[LayerShape, MapFormat], LayerCost]


def _ms(x: float) -> str:
    return f"{x:.3g} ms"


def explain(cost: LayerCost, n_reuse: int, n_capture: int) -> str:
    """What reuse saves and what its captures add, in words (the numbers of a plan's reasons)."""
    gain, added = n_reuse * (cost.compute - cost.reuse), n_capture * (cost.capture - cost.compute)
    if gain <= 0:
        return (f"a reuse call takes {_ms(cost.reuse)}, no less than computing ({_ms(cost.compute)}), and its "
                f"{n_capture} capture(s) add {_ms(added)}")
    verb = "but" if gain <= added else "and"
    return (f"reuse saves {_ms(gain)} over {n_reuse} reuse step(s) {verb} its {n_capture} capture(s) add "
            f"{_ms(added)}")


def make_plan(shapes: dict[str, LayerShape], cost: CostFn, candidates: Iterable, n_reuse: int,
              n_capture: int, max_bytes: float = math.inf, mode: str | None = None) -> list[LayerPlan]:
    """Choose per layer whether to reuse and in which of the map formats ``candidates``; never more than
    ``max_bytes`` in all.

    Each layer takes the format with the largest saving (ties: fewer bytes); layers are then admitted by
    saving per byte while the budget lasts. Pure: says nothing (the patch's :class:`~attnreuse.plans.Plans`
    tells the user, once, when no layer reuses).
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
                best = (fmt, saving, nbytes, c)
        options[name] = best
    plans, used = {}, 0
    for name, (fmt, saving, nbytes, c) in sorted(options.items(), key=lambda kv: -kv[1][1] / kv[1][2]):
        numbers = dict(cost=c, considered=fmt, n_reuse=n_reuse, n_capture=n_capture, mode=mode)
        if saving <= 0:
            plans[name] = LayerPlan(name, False, None, 0, 0.0, "reuse is not faster than recomputing here: "
                                    + explain(c, n_reuse, n_capture), **numbers)
        elif used + nbytes > max_bytes:
            plans[name] = LayerPlan(name, False, None, 0, 0.0, "over the memory budget", **numbers)
        else:
            used += nbytes
            plans[name] = LayerPlan(name, True, fmt, nbytes, saving, f"reuse ({fmt.name}): "
                                    + explain(c, n_reuse, n_capture), **numbers)
    return [plans[name] for name in shapes]


def layer_shapes(unet, names: Iterable[str], sample_shape: tuple[int, ...],
                 context_tokens: int) -> dict[str, LayerShape]:
    """The map shape of each named attention layer of a diffusers UNet for one call's input shape."""
    if len(sample_shape) != 4:
        raise TypeError(f"attnreuse: {type(unet).__name__} takes inputs of shape {tuple(sample_shape)}, not [batch, "
                        "channels, height, width]: its layers cannot be placed for a per-layer plan. Patch with "
                        "plan='all' (every selected layer reuses) and neither max_cache_bytes nor cache_dtype='auto'")
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
            raise TypeError(f"{name}: cannot place this layer in the UNet to plan it; patch with plan='all' "
                            "(and neither max_cache_bytes nor cache_dtype='auto') to reuse without a plan")
        attn = modules[name]
        inner = attn.to_q.out_features
        q_tokens = math.ceil(height / factor) * math.ceil(width / factor)
        out[name] = LayerShape(batch, attn.heads, q_tokens, context_tokens if attn.is_cross_attention else q_tokens,
                               inner // attn.heads, attn.to_q.in_features, attn.to_k.in_features)
    return out


def auto_formats(model_dtype) -> tuple[MapFormat, ...]:
    """The map formats ``cache_dtype="auto"`` chooses among, by measured time saved: the model's dtype, fp8
    and fp4 (their quality cost against fp16 maps on the embedded model's PHAST schedules: docs/fidelity.md)."""
    return tuple(dict.fromkeys((formats.get(model_dtype), formats.get("fp8"), formats.get("fp4"))))
