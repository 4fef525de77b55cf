"""A live patch's per-layer plans, one per kind of UNet input, each made once (its kernel timing is the cost)."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from .config import LayerPolicy, ReuseConfig, resolve_format
from .planner import CostFn, LayerPlan, auto_formats, layer_shapes, make_plan, measured_cost
from .schedule import StepCounts


class PlanKey(NamedTuple):
    """What a plan depends on: the input's shape, context length, dtype and device, and the step counts."""

    sample_shape: tuple[int, ...]
    context_tokens: int
    dtype: torch.dtype
    device: torch.device
    steps: StepCounts

    @classmethod
    def of(cls, sample: torch.Tensor, context: torch.Tensor, steps: StepCounts) -> "PlanKey":
        return cls(tuple(sample.shape), context.shape[1], sample.dtype, sample.device, steps)


class Plans:
    """The plans of one patch by :class:`PlanKey`, and the per-layer policies each gives.

    ``cost(device, model_dtype, backend)`` gives the cost function plans are made with: by default
    :func:`~attnreuse.planner.measured_cost`, which times each new layer shape on the device. Set another to
    plan with costs known in advance (plans made before are dropped; a pickled model needs a module-level
    function, not a lambda).
    """

    def __init__(self, unet: torch.nn.Module, layers: tuple[str, ...], config: ReuseConfig):
        self.unet, self.layers = unet, layers
        self.cache_dtype, self.max_cache_bytes, self.backend = config.cache_dtype, config.max_cache_bytes, config.backend
        self.cost = measured_cost

    @property
    def cost(self) -> Callable[[torch.device, torch.dtype, str], CostFn]:
        return self._cost

    @cost.setter
    def cost(self, cost: Callable[[torch.device, torch.dtype, str], CostFn]) -> None:
        self._cost = cost
        self._plans: dict[PlanKey, list[LayerPlan]] = {}
        self._policies: dict[PlanKey, dict[str, LayerPolicy]] = {}
        self.last: PlanKey | None = None  # the key of the plan made last

    @property
    def latest(self) -> list[LayerPlan] | None:
        return self._plans.get(self.last)

    def policies(self, key: PlanKey) -> dict[str, LayerPolicy] | None:
        """The policies of ``key``'s plan, None if it is not made yet."""
        return self._policies.get(key)

    def make(self, key: PlanKey) -> dict[str, LayerPolicy]:
        """Make ``key``'s plan (once) and return its policies."""
        if key not in self._plans:
            shapes = layer_shapes(self.unet, self.layers, key.sample_shape, key.context_tokens)
            chosen = self.cache_dtype
            candidates = auto_formats(key.dtype) if chosen == "auto" else (resolve_format(chosen, key.dtype),)
            budget = self.max_cache_bytes
            plan = make_plan(shapes, self.cost(key.device, key.dtype, self.backend), candidates,
                             n_reuse=key.steps.reuse, n_capture=key.steps.capture,
                             max_bytes=math.inf if budget is None else budget)
            self._plans[key] = plan
            self._policies[key] = {p.name: LayerPolicy(reuse=p.reuse, map_format=p.format) for p in plan}
        self.last = key
        return self._policies[key]
