"""Sampling state of one patch: which step and branch the UNet is in, and the cached maps.

Steps are recognised from the UNet's calls alone, so any diffusers sampling loop works:

* a call with a new (lower) timestep starts the next step;
* further calls at the same timestep are further branches (separate conditional / unconditional
  calls), each with maps of its own; batched CFG is one call and so one branch;
* a new generation, with all maps dropped, starts on the first call, when the timestep rises (the
  sampler restarted), when the sample's shape changes (batch or resolution), and on :meth:`reset`
  (which a patched pipeline calls around every generation).
"""
from __future__ import annotations

import warnings

import torch

from .kernels import CachedMap

from .schedule import Action, actions, to_string


def _timestep_value(timestep) -> float:
    if not torch.is_tensor(timestep):
        return float(timestep)
    if timestep.numel() == 1:
        return float(timestep.reshape(()).item())
    lo, hi = torch.aminmax(timestep.detach().flatten().float())
    lo, hi = torch.stack([lo, hi]).tolist()  # one device sync
    if lo != hi:
        raise ValueError(
            f"attnreuse: the UNet was called with different timesteps in one batch ({lo} .. {hi}); "
            "a reuse schedule needs one timestep per call: call the UNet once per timestep")
    return lo


class ReuseState:
    def __init__(self, schedule: tuple[int, ...], max_cache_bytes: float | None = None):
        self.schedule = schedule
        self.actions = actions(schedule)
        self.max_cache_bytes = max_cache_bytes
        self.maps: dict[tuple[str, int], CachedMap | torch.Tensor] = {}  # outputs for target='output'
        self.declined: set[tuple[str, int]] = set()  # maps the budget had no room for
        self.layer_dtypes: dict[str, torch.dtype | None] | None = None  # a plan's choice; None: no plan
        self.peak_cache_bytes = 0
        self.pinned = False
        self.reset()

    def reset(self) -> None:
        """Forget the current generation and drop every cached map."""
        self._drop_maps()
        self.step = -1  # -1: no generation running
        self.branch = 0
        self.pinned = False
        self._timestep: float | None = None
        self._shape: tuple[int, ...] | None = None

    def pin(self, step: int) -> None:
        """Hold the state at ``step``, branch 0, whatever the UNet is called with (benchmarks, CUDA graphs)."""
        if not 0 <= step < len(self.schedule):
            raise ValueError(f"step {step} is outside the schedule's {len(self.schedule)} steps")
        self.step, self.branch, self.pinned = step, 0, True

    def reuses(self, layer: str) -> bool:
        return self.layer_dtypes is None or self.layer_dtypes.get(layer) is not None

    @property
    def action(self) -> Action:
        return self.actions[self.step]

    @property
    def cache_bytes(self) -> int:
        return self._bytes

    def _drop_maps(self) -> None:
        self.maps.clear()
        self.declined.clear()
        self._bytes = 0

    def begin_call(self, timestep, sample_shape: tuple[int, ...]) -> None:
        """Advance the step/branch counters for one UNet call."""
        if self.pinned:
            return
        t = _timestep_value(timestep)
        if self._timestep is None or t > self._timestep or sample_shape != self._shape:
            self.reset()
            self.step = 0
        elif t == self._timestep:
            self.branch += 1
        else:
            if self.step + 1 >= len(self.schedule):
                raise ValueError(
                    f"attnreuse: sampling reached step {self.step + 2} but the schedule has "
                    f"{len(self.schedule)} steps ({to_string(self.schedule)}); pass a schedule with one "
                    "entry per sampling step (e.g. attnreuse.hurry(num_inference_steps, reuse))")
            self.step += 1
            self.branch = 0
            if self.action is not Action.REUSE:  # never read again: free them before this step allocates
                self._drop_maps()
        self._timestep = t
        self._shape = sample_shape

    def store(self, layer: str, cmap: CachedMap | torch.Tensor) -> None:
        key = (layer, self.branch)
        old = self.maps.pop(key, None)
        self._bytes -= 0 if old is None else old.nbytes
        if self.max_cache_bytes is not None and self._bytes + cmap.nbytes > self.max_cache_bytes:
            self.declined.add(key)
            warnings.warn(f"attnreuse: max_cache_bytes={self.max_cache_bytes:.4g} leaves no room for the map of "
                          f"{layer} (UNet call {self.branch + 1} of its step): that layer computes instead",
                          stacklevel=2)
            return
        self.maps[key] = cmap
        self._bytes += cmap.nbytes
        self.peak_cache_bytes = max(self.peak_cache_bytes, self._bytes)

    def lookup(self, layer: str) -> CachedMap | torch.Tensor | None:
        """The cached map (or output) of ``layer`` for this branch; None if the budget declined it."""
        cmap = self.maps.get((layer, self.branch))
        if cmap is None and (layer, self.branch) not in self.declined:
            raise RuntimeError(
                f"attnreuse: step {self.step + 1} reuses, but layer {layer!r} has no map for UNet call "
                f"{self.branch + 1} at this timestep. The sampler calls the UNet a different number of times "
                "per timestep than at the computing step, or repeats a timestep across steps; call "
                "handle.reset() between generations and use one timestep per sampling step")
        return cmap
