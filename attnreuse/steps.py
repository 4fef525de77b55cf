"""A patched UNet's step kinds timed one UNet call at a time (computing, capturing, reusing), and the ρ a plan
predicts: for ``python -m attnreuse bench`` and ``bench/e2e.py``. It sits above :mod:`attnreuse.patching` (it
patches); measuring a layer's costs sits below it (:mod:`attnreuse.costs`, :mod:`attnreuse.timing`)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .patching import patch
from .planner import LayerPlan
from .schedule import Action, ScheduleLike, actions, as_schedule


def step_times(unet: torch.nn.Module, time_fn: Callable[[], float], schedule: ScheduleLike = "10", *,
               inputs: tuple[torch.Tensor, torch.Tensor] | None = None, mode: str = "eager",
               **options) -> dict:
    """``time_fn()`` of one call of ``unet`` patched with ``schedule`` (``options``: :func:`attnreuse.patch`'s)
    as the capture step before its first reuse step, then as that reuse step (``gen.hold``: every call repeats
    it, maps kept). ``inputs`` = ``(sample, encoder_hidden_states)`` of the calls timed: the plan is made for
    them in ``mode`` first (else at the first timed call, eagerly).

    Returns ``{"capture", "reuse"}`` (what ``time_fn`` returned), ``"cache_bytes"`` (maps held while reusing) and
    ``"plan"`` (``handle.plan``: None where nothing planned)."""
    entries = as_schedule(schedule)
    kinds = actions(entries)
    if Action.REUSE not in kinds:
        raise ValueError(f"schedule {schedule!r} reuses no step: nothing to time")
    reuse_step = kinds.index(Action.REUSE)
    with patch(unet, entries, **options) as handle, handle.generation(len(entries)) as gen:
        if inputs is not None:
            handle.prepare(*inputs, len(entries), mode=mode)
        gen.hold(reuse_step - 1)  # the capture step
        capture = time_fn()
        gen.hold(reuse_step)  # every call now reuses the maps of the last capture
        reuse = time_fn()
        return {"capture": capture, "reuse": reuse, "cache_bytes": handle.cache_bytes, "plan": handle.plan}


def capture_and_reuse(unet: torch.nn.Module, time_fn: Callable[[], float], cache_dtype: str | None,
                      **options) -> tuple:
    """``time_fn()`` of one call of ``unet`` patched to capture the maps in ``cache_dtype``, then to reuse them,
    and the bytes of the cached maps: ``(capture, reuse, nbytes)``. Every layer reuses (``plan="all"``) unless
    ``options`` say otherwise: what the kernels do, not what a plan chooses."""
    options.setdefault("plan", "all")
    r = step_times(unet, time_fn, "10", cache_dtype=cache_dtype, **options)
    return r["capture"], r["reuse"], r["cache_bytes"]


def predicted_rho(plan: Sequence[LayerPlan], compute_ms: float) -> float:
    """ρ a plan predicts for a reuse call: ``(T − Σ over reusing layers (compute − reuse)) / T``, with ``T``
    the measured computing call and each layer's per-call costs from the plan."""
    saved = sum(p.cost.compute - p.cost.reuse for p in plan if p.reuse and p.cost is not None)
    return (compute_ms - saved) / compute_ms
