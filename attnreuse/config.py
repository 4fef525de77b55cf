"""All of attnreuse's configuration, in one dataclass."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch

from kernels import BACKENDS, FP8

from .schedule import as_schedule

LayerSelector = Union[str, Callable[[str], bool]]
LAYER_CHOICES = ("all", "self", "cross")

_DTYPE_NAMES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp8": FP8, "float8_e4m3fn": FP8, "e4m3": FP8,
}


def as_cache_dtype(value) -> torch.dtype | None:
    """``None`` (the model's dtype), a torch dtype, or a name such as ``"fp16"`` / ``"fp8"``."""
    if value is None:
        return None
    dtype = _DTYPE_NAMES.get(value.lower()) if isinstance(value, str) else value
    if dtype not in _DTYPE_NAMES.values():
        raise ValueError(
            f"cache_dtype={value!r} is not supported: pass None (the model's dtype), 'fp32', 'fp16', 'bf16' "
            "or 'fp8' (e4m3 with a per-row scale)")
    return dtype


@dataclass(frozen=True)
class ReuseConfig:
    """How a UNet reuses attention maps.

    Important:
        schedule: one entry per sampling step, 1 = compute, 0 = reuse the most recently computed map
            (``"11110000"``, ``[1, 1, 0, 0]`` or ``attnreuse.hurry(steps, reuse)``). The first entry must be 1.
        layers: which attention layers take part: ``"all"``, ``"self"`` (``attn1``), ``"cross"``
            (``attn2``), or a predicate on the layer's module name, e.g.
            ``lambda name: name.startswith("up_blocks")``. Other layers always compute.
        cache_dtype: storage of cached maps: ``None`` = the model's dtype, or ``"fp32"``, ``"fp16"``,
            ``"bf16"``, ``"fp8"`` (e4m3 with a per-row scale: half the bytes of fp16).
    Knobs:
        backend: ``"auto"`` (Triton kernels for CUDA tensors, PyTorch elsewhere), ``"triton"``, ``"torch"``.
    """

    schedule: tuple[int, ...]
    layers: LayerSelector = "all"
    cache_dtype: torch.dtype | None = None
    backend: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "schedule", as_schedule(self.schedule))
        object.__setattr__(self, "cache_dtype", as_cache_dtype(self.cache_dtype))
        if not callable(self.layers) and self.layers not in LAYER_CHOICES:
            raise ValueError(
                f"layers={self.layers!r}: pass one of {LAYER_CHOICES} or a predicate on the layer name")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}: pass one of {BACKENDS}")

    def selects(self, name: str, is_cross_attention: bool) -> bool:
        """Whether the attention layer called ``name`` takes part in reuse."""
        if callable(self.layers):
            return bool(self.layers(name))
        return self.layers == "all" or (self.layers == "cross") == is_cross_attention
