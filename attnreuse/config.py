"""All of attnreuse's configuration, in one dataclass."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch

from .kernels import BACKENDS, MapFormat, formats
from .schedule import ScheduleLike, as_schedule_object

LayerSelector = Union[str, Callable[[str], bool]]
LAYER_CHOICES = ("all", "self", "cross")
TARGETS = ("map", "output")
PLANS = ("measured", "all")


def resolve_format(cache_dtype: MapFormat | None, values_dtype: torch.dtype) -> MapFormat:
    """The map format for values of ``values_dtype``: the one chosen, ``None`` meaning the values' own dtype."""
    return cache_dtype or formats.get(values_dtype)


def as_cache_dtype(value) -> MapFormat | str | None:
    """``None`` (the model's dtype), ``"auto"``, a map format's name (``"fp16"``, ``"fp8"``, ``"fp4"``, ...), a
    registered :class:`~attnreuse.kernels.MapFormat`, or a torch dtype naming one."""
    if value is None or value == "auto":
        return value
    try:
        return formats.get(value)
    except ValueError:
        raise ValueError(
            f"cache_dtype={value!r} is not supported: pass None (the model's dtype), 'auto' or a map format: "
            f"{', '.join(formats.names())} ('fp8': e4m3, half the bytes of fp16; 'fp4': 4-bit E2M2, about a quarter)"
        ) from None


@dataclass(frozen=True)
class ReuseConfig:
    """How a UNet reuses attention maps.

    Important:
        schedule: one entry per sampling step, 1 = compute, 0 = reuse the most recently computed map
            (``"11110000"``, ``[1, 1, 0, 0]`` or ``attnreuse.hurry(steps, reuse)``; the first entry must be 1),
            or a length-free schedule resolved per generation (``attnreuse.hurry_fraction(0.5)``,
            ``attnreuse.rescaled("11111111010001000000")``).
        layers: which attention layers take part: ``"all"``, ``"self"`` (``attn1``), ``"cross"``
            (``attn2``), or a predicate on the layer's module name, e.g.
            ``lambda name: name.startswith("up_blocks")``. Other layers always compute.
        cache_dtype: the map format (:mod:`attnreuse.kernels.formats`): ``None`` = the model's dtype, or
            ``"fp32"``, ``"fp16"``, ``"bf16"``, ``"fp8"`` (e4m3: about half the bytes of fp16), ``"fp4"`` (unsigned
            E2M2 codes, two per byte: 0.27× the bytes of fp16; docs/fidelity.md), a registered format, or
            ``"auto"``: per layer, whichever of the model's dtype, fp8 and fp4 saves the most time on this device.
        max_cache_bytes: a memory budget for cached maps. With it (or ``cache_dtype="auto"``), a plan
            measured on this device decides per layer whether reuse pays and fits (``handle.plan``); maps
            that would overflow the budget are not stored (those layers compute instead).
        plan: ``"measured"`` (default): on a CUDA GPU a layer reuses only where its reuse steps save more than
            its captures add, ``n_reuse · (compute − reuse) > n_capture · (capture − compute)``, with the layer's
            costs from a table measured on this GPU in the caller's mode (:mod:`attnreuse.costs`; ``"eager"``
            unless ``handle.prepare(..., mode="graphed")``), so reuse never makes a step slower by plan; where no
            layer pays, every layer computes (exactly the unpatched output) and the patch says so once. Off a
            GPU (CPU, MPS) there is no cost table and every selected layer reuses. ``"all"``: every selected
            layer reuses, nothing timed (with ``max_cache_bytes`` or ``cache_dtype="auto"`` their plan still
            decides).
    Knobs:
        backend: ``"auto"`` (Triton kernels for CUDA tensors, PyTorch elsewhere), ``"triton"``, ``"torch"``.
        target: what is reused: ``"map"`` (this method) or ``"output"``, the layer's whole attention output
            (the strategy of T-GATE and diffusers' PAB; kept as a baseline: it ignores the current values).
    """

    schedule: ScheduleLike
    layers: LayerSelector = "all"
    cache_dtype: MapFormat | str | None = None
    max_cache_bytes: float | None = None
    backend: str = "auto"
    target: str = "map"
    plan: str = "measured"

    def __post_init__(self):
        object.__setattr__(self, "schedule", as_schedule_object(self.schedule))
        object.__setattr__(self, "cache_dtype", as_cache_dtype(self.cache_dtype))
        if not callable(self.layers) and self.layers not in LAYER_CHOICES:
            raise ValueError(
                f"layers={self.layers!r}: pass one of {LAYER_CHOICES} or a predicate on the layer name")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}: pass one of {BACKENDS}")
        if self.target not in TARGETS:
            raise ValueError(f"target={self.target!r}: pass one of {TARGETS}")
        if not isinstance(self.plan, str) or self.plan not in PLANS:
            raise ValueError(f"plan={self.plan!r}: pass 'measured' (a layer reuses only where that is faster on this "
                             "GPU, by a measured cost table) or 'all' (every selected layer reuses)")
        budget = self.max_cache_bytes
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 0):
            raise ValueError(f"max_cache_bytes={self.max_cache_bytes!r}: pass a number of bytes >= 0, or None")
        if self.planned and self.target != "map":
            raise ValueError("max_cache_bytes and cache_dtype='auto' plan map reuse: use them with target='map'")

    @property
    def planned(self) -> bool:
        """Whether a per-layer plan decides which layers reuse on any device (a budget or ``"auto"``)."""
        return self.max_cache_bytes is not None or self.cache_dtype == "auto"

    @property
    def has_plans(self) -> bool:
        """Whether a patch keeps per-layer plans: with a budget or ``"auto"``, or ``plan="measured"`` for map
        reuse (on the devices its cost model covers: :meth:`attnreuse.plans.Plans.planning`)."""
        return self.planned or (self.plan == "measured" and self.target == "map")

    def selects(self, name: str, is_cross_attention: bool) -> bool:
        """Whether the attention layer called ``name`` takes part in reuse (asked once, at patch time)."""
        if callable(self.layers):
            return bool(self.layers(name))
        return self.layers == "all" or (self.layers == "cross") == is_cross_attention

    def fixed_policy(self) -> "LayerPolicy":
        """The policy of every selected layer when no plan decides (neither budget nor ``"auto"``)."""
        return LayerPolicy(reuse=True, map_format=self.cache_dtype)


@dataclass(frozen=True)
class LayerPolicy:
    """What one patched layer does, resolved once (at patch time, or when a plan for an input shape is made).

    ``reuse``: whether the layer captures and reuses at all (False: it always computes);
    ``map_format``: storage of its maps, ``None`` = the format of the layer's values' dtype.
    """

    reuse: bool
    map_format: MapFormat | None = None

    def format_for(self, values_dtype: torch.dtype) -> MapFormat:
        return resolve_format(self.map_format, values_dtype)
