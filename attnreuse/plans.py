"""A live patch's per-layer plans, one per kind of UNet input, each made once (measuring the costs it lacks)."""
from __future__ import annotations

import inspect
import math
import warnings
from typing import Callable, NamedTuple

import torch

from .config import LayerPolicy, ReuseConfig, resolve_format
from .costs import MeasuredCosts, check_mode, device_name, unstored_cost
from .planner import CostFn, LayerPlan, auto_formats, layer_shapes, make_plan
from .schedule import StepCounts

CostModel = Callable[..., "CostFn | None"]  # (device, model_dtype, backend[, mode]) -> CostFn, or None: no costs


class PlanKey(NamedTuple):
    """What a plan depends on: the input's shape, context length, dtype and device, and the step counts."""

    sample_shape: tuple[int, ...]
    context_tokens: int
    dtype: torch.dtype
    device: torch.device
    steps: StepCounts

    @classmethod
    def of(cls, sample: torch.Tensor, context: torch.Tensor | None, steps: StepCounts) -> "PlanKey":
        """``context``: the encoder hidden states, None for a model without text (class-conditional DiT)."""
        return cls(tuple(sample.shape), 0 if context is None else context.shape[1], sample.dtype, sample.device,
                   steps)


class Plans:
    """The plans of one patch by :class:`PlanKey`, and the per-layer policies each gives.

    ``cost(device, model_dtype, backend[, mode])`` gives the cost function plans are made with, or None where it
    has no costs (then every selected layer reuses, unless a budget or ``"auto"`` needs a plan: then costs are
    timed in memory). By default :class:`~attnreuse.costs.MeasuredCosts`: the table measured on this GPU in the
    plan's mode, none off a GPU. Set another to plan with costs known in advance (plans made before are
    dropped; a pickled model needs a module-level function, not a lambda); a cost model set by the user plans
    on every device.
    """

    def __init__(self, unet: torch.nn.Module, layers: tuple[str, ...], config: ReuseConfig):
        self.unet, self.layers = unet, layers
        self.cache_dtype, self.max_cache_bytes, self.backend = config.cache_dtype, config.max_cache_bytes, config.backend
        self.planned = config.planned  # a budget or "auto": plans on every device
        self.fixed = config.fixed_policy()  # every selected layer, where there are no costs
        self.cost = MeasuredCosts()

    @property
    def cost(self) -> CostModel:
        return self._cost

    @cost.setter
    def cost(self, cost: CostModel) -> None:
        self._cost = cost
        self._plans: dict[PlanKey, list[LayerPlan] | None] = {}
        self._policies: dict[PlanKey, dict[str, LayerPolicy]] = {}
        self._modes: dict[PlanKey, str] = {}
        self.last: PlanKey | None = None  # the key of the plan made last
        self.told = False  # whether the user heard that no layer reuses (once per patch and cost model)

    @property
    def latest(self) -> list[LayerPlan] | None:
        return self._plans.get(self.last)

    def planning(self, device: torch.device) -> bool:
        """Whether inputs on ``device`` get a plan; False: every selected layer reuses (no costs there)."""
        if self.planned:
            return True
        types = getattr(self._cost, "device_types", None)  # MeasuredCosts: the devices with tables
        return types is None or device.type in types

    def mode(self, key: PlanKey) -> str | None:
        """The mode of ``key``'s plan (``"eager"``, ``"graphed"``), None if it is not made yet."""
        return self._modes.get(key)

    def policies(self, key: PlanKey) -> dict[str, LayerPolicy] | None:
        """The policies of ``key``'s plan, None if it is not made yet."""
        return self._policies.get(key)

    def make(self, key: PlanKey, mode: str = "eager", again: bool = False) -> dict[str, LayerPolicy]:
        """Make ``key``'s plan with ``mode``'s costs (once; ``again``: anew if the plan there is another mode's)
        and return its policies."""
        check_mode(mode)
        if key not in self._policies or (again and self._modes[key] != mode):
            self._plans[key], self._policies[key] = self._make(key, mode)
            self._modes[key] = mode
        self.last = key
        return self._policies[key]

    def _make(self, key: PlanKey, mode: str) -> tuple[list[LayerPlan] | None, dict[str, LayerPolicy]]:
        if not key.steps.reuse:  # nothing reuses in such a generation: every layer computes anyway
            return None, dict.fromkeys(self.layers, LayerPolicy(reuse=False))
        cost = _cost_fn(self._cost, key.device, key.dtype, self.backend, mode)
        if cost is None:
            if not self.planned:  # no costs on this device: every selected layer reuses
                return None, dict.fromkeys(self.layers, self.fixed)
            cost = unstored_cost(key.device, key.dtype, self.backend, mode)
        shapes = layer_shapes(self.unet, self.layers, key.sample_shape, key.context_tokens)
        chosen = self.cache_dtype
        candidates = auto_formats(key.dtype) if chosen == "auto" else (resolve_format(chosen, key.dtype),)
        budget = math.inf if self.max_cache_bytes is None else self.max_cache_bytes
        plan = make_plan(shapes, cost, candidates, n_reuse=key.steps.reuse, n_capture=key.steps.capture,
                         max_bytes=budget, mode=mode)
        if plan and not any(p.reuse for p in plan) and not self.told:
            self.told = True
            warnings.warn(_nothing_reuses(plan, key, mode, budget, self.planned), stacklevel=2)
        return plan, {p.name: LayerPolicy(reuse=p.reuse, map_format=p.format) for p in plan}


def _cost_fn(cost: CostModel, device: torch.device, dtype: torch.dtype, backend: str, mode: str) -> CostFn | None:
    """``cost(device, dtype, backend, mode=mode)`` if the cost model takes a mode, else without it."""
    try:
        params = inspect.signature(cost).parameters.values()
    except (TypeError, ValueError):
        params = ()
    if any(p.name == "mode" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return cost(device, dtype, backend, mode=mode)
    return cost(device, dtype, backend)


def _nothing_reuses(plan: list[LayerPlan], key: PlanKey, mode: str, budget: float, planned: bool) -> str:
    """Why no layer reuses, said once per patch: the budget, or the best layer's numbers."""
    if any(p.net_ms > 0 for p in plan):
        return (f"attnreuse: no layer is worth reusing within the budget ({budget:.3g} bytes): sampling runs with "
                "plain attention")
    graphs = ("Under CUDA graphs or torch.compile(mode='reduce-overhead') plan with handle.prepare(sample, "
              "encoder_hidden_states, num_steps, mode='graphed'); " if key.device.type == "cuda" and mode == "eager"
              else "")
    force = ("without max_cache_bytes and cache_dtype='auto', plan='all' reuses every selected layer regardless"
             if planned else "plan='all' reuses every selected layer regardless")
    best = max(plan, key=lambda p: p.net_ms)
    fmt = best.considered.name if best.considered is not None else "its map format"
    return (f"attnreuse: no layer is worth reusing on {device_name(key.device)} ({mode} costs, input "
            f"{tuple(key.sample_shape)}, {key.steps.reuse} reuse and {key.steps.capture} capture steps): every layer "
            f"computes, exactly as unpatched (plain attention). The closest, {best.name} with {fmt} maps: "
            f"{best.reason.split(': ', 1)[-1]}. {graphs}{force}")
