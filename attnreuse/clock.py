"""The step clock: which generation a thread is running, which step it is at, which UNet call of the step.

A :class:`Generation` is one sampling run of one request: its schedule resolved against the steps it
really runs, the current step and its kind (:class:`~attnreuse.schedule.Action`), the index of the
current UNet call within the step, and its maps (:class:`~attnreuse.cache.MapCache`). It starts and ends
with no maps. The :class:`Clock` keeps each thread's current generation in a ``threading.local`` (which
``torch.compile`` traces without a graph break), so requests on different threads sharing one patched
UNet never see each other's maps.

Who drives the clock, best first:

* a patched pipeline's progress bar (:mod:`attnreuse.progress_clock`): the sampler's own step count;
* ``handle.generation(num_steps)`` with ``gen.step(i)`` in a loop of the user's own;
* otherwise a guess from the UNet's calls (:meth:`Clock.guess`), per thread: a call at a lower
  timestep is the next step; a call at the same timestep with the very same sample tensor object is a
  further call of the step (separate conditional / unconditional calls); anything else, or another
  sample shape, starts a new generation. It cannot tell a new generation that starts at a lower timestep
  than where an abandoned one stopped from a continuation of it, and it counts one step per timestep
  (multi-evaluation schedulers such as Heun need one of the two ways above).

The UNet's pre-hook and the processors read only ``kind``, ``call``, ``held``, ``policies`` and the cache:
compiled graphs then guard on the step kind, not on the step index.
"""
from __future__ import annotations

import threading
import warnings
import weakref

import torch

from .cache import MapCache
from .schedule import Action, FixedSchedule, Schedule, actions, check_num_steps, step_counts, to_string


class Generation:
    """One sampling run. As a context manager (from ``handle.generation(num_steps)``), it ends on exit.

    Important:
        step(i): the following UNet calls belong to step ``i``, counted from call 0.
        hold(i): every following UNet call runs as call 0 of step ``i`` and no maps are dropped, until the
            next ``step``/``hold``: for benchmarks and CUDA-graph capture (record one graph per step kind).
    """

    def __init__(self, clock: "Clock", schedule: tuple[int, ...], guessed: bool = False):
        self.clock = clock
        self.schedule = schedule
        self.actions = actions(schedule)
        self.num_steps = len(schedule)
        self.counts = step_counts(self.actions)
        self.guessed = guessed
        self.cache = MapCache(clock.max_cache_bytes)
        self.step_index = 0
        self.kind = self.actions[0]  # None: past the last step, or ended
        self.call = 0  # index of the running UNet call within its step
        self.calls = 0  # UNet calls entered in this step
        self.captured_calls = 0  # UNet calls of the last capture step
        self.captured_shapes: dict[int, tuple] = {}  # sample shape of each UNet call of the last capture step
        self.step_calls = 0  # UNet calls of the previous step
        self.held = False
        self.ended = False
        self.policies: dict = {}  # layer name -> LayerPolicy, set by the UNet's pre-hook for this input
        self.outer: Generation | None = None  # a marked generation this one is nested in

    @property
    def kind(self) -> Action | None:
        """The current step's kind; None past the last step, or ended. Kept as its name: torch.compile guards a
        string attribute by value, while its guard on the enum attribute went missing from the UNet's forward when
        the first patched layer's plan said compute (one compiled graph then replayed for every step kind)."""
        return _ACTIONS[self.kind_name]

    @kind.setter
    def kind(self, action: Action | None) -> None:
        self.kind_name = None if action is None else action.value

    # ---- driven by the sampler / the user (outside the UNet's forward) -----------------------------------

    def step(self, index: int) -> None:
        self._set(index, hold=False)

    def hold(self, index: int) -> None:
        self._set(index, hold=True)

    def advance(self, n: int = 1) -> None:
        """The sampler finished ``n`` steps."""
        if self.ended:  # e.g. handle.reset() inside the sampler's loop: an ended generation stays ended
            return
        self._leave_step()
        self.step_index += n
        self.calls = self.call = 0
        if self.step_index >= self.num_steps:
            self.kind = None
            self.cache.clear()
            return
        self.kind = self.actions[self.step_index]
        if self.kind is not Action.REUSE:  # never read again: free them before this step allocates
            self.cache.clear()

    def end(self) -> None:
        """Drop every map; the UNet may not be called in this generation any more."""
        self.clock.end(self)

    def __enter__(self) -> "Generation":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # As many UNet calls as steps, all in step 0: gen.step(i) was forgotten, and nothing was reused.
        stuck = exc_type is None and not self.held and self.step_index == 0 and self.counts.reuse and \
            self.calls >= self.num_steps
        self.end()
        if stuck:
            warnings.warn(f"attnreuse: all {self.calls} UNet calls of this {self.num_steps}-step generation ran as "
                          "step 0, so no step reused: call gen.step(i) before the UNet calls of step i", stacklevel=2)

    def _set(self, index: int, hold: bool) -> None:
        if self.ended:
            raise RuntimeError("attnreuse: this generation has ended (its maps are gone); start a new one with "
                               "`with handle.generation(num_steps) as gen:`")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_steps:
            raise ValueError(f"step {index!r}: pass an int from 0 to {self.num_steps - 1}, this generation's "
                             f"{self.num_steps} steps")
        self._leave_step()
        self.step_index, self.kind, self.held = index, self.actions[index], hold
        self.calls = self.call = 0
        if self.kind is not Action.REUSE and not hold:
            self.cache.clear()

    def _leave_step(self) -> None:
        self.step_calls = self.calls
        if self.kind is Action.CAPTURE:
            self.captured_calls = self.calls

    # ---- the UNet's pre-hook (inside torch.compile: Python ints and enums only) -------------------------

    def enter_call(self) -> None:
        if self.kind is None:
            raise RuntimeError(
                f"attnreuse: the UNet was called after this generation ended or ran all its {self.num_steps} "
                "steps; start a new one (a new pipeline call, or handle.generation(num_steps))")
        if self.held:
            self.call, self.calls = 0, 1
            return
        self.call = self.calls
        self.calls += 1
        if self.kind is Action.REUSE and self.call >= self.captured_calls:
            raise RuntimeError(
                f"attnreuse: a reuse step called the UNet {self.call + 1} times, but the step that captured its "
                f"maps called it {self.captured_calls} times; a reuse step's k-th UNet call reads the maps of the "
                "capture step's k-th call: call the UNet the same number of times per step (CFG batched or "
                "separate, the same scheduler evaluations)")

    def check_sample(self, shape: tuple) -> None:
        """Keep the sample shape of each capture call, and refuse a reuse call whose differs: the processors see
        only token counts, which a transposed resolution keeps (eager calls: not traced into compiled graphs)."""
        if self.kind is Action.CAPTURE:
            self.captured_shapes[self.call] = shape
        elif self.kind is Action.REUSE and self.captured_shapes.get(self.call, shape) != shape:
            raise RuntimeError(
                f"attnreuse: a reuse step's UNet call {self.call} has a sample of shape {shape}, but the maps it would "
                f"reuse were captured from one of shape {self.captured_shapes[self.call]}: keep one batch size and "
                "resolution within a generation")

    def __repr__(self) -> str:
        return (f"Generation(schedule={to_string(self.schedule)}, step={self.step_index}, "
                f"kind={None if self.kind is None else self.kind.value}, call={self.call})")


_ACTIONS = {None: None, **{a.value: a for a in Action}}


class _ThreadState(threading.local):
    generation: Generation | None = None  # what the UNet's calls on this thread belong to
    exhausted: Generation | None = None  # the guess: a generation that ran all its steps
    timestep: float | None = None  # the guess: last call's timestep, sample (weak) and shape
    sample: weakref.ref | None = None
    shape: tuple[int, ...] | None = None


class Clock:
    """Each thread's current :class:`Generation`, and the bytes of maps held at most, over all of them."""

    def __init__(self, schedule: Schedule, max_cache_bytes: float | None = None):
        self.schedule = schedule
        self.max_cache_bytes = max_cache_bytes
        self.peak_bytes = 0
        self.fallbacks = 0  # over all ended generations: see MapCache.fallbacks
        self.on_begin = None  # called before each generation starts (the patch checks its processors)
        self._local = _ThreadState()
        self._lock = threading.Lock()

    @property
    def current(self) -> Generation | None:
        return self._local.generation

    def begin(self, num_steps: int) -> Generation:
        """Start a marked generation of ``num_steps`` steps on this thread (resolving the schedule now)."""
        check_num_steps(num_steps)
        if self.on_begin is not None:
            self.on_begin()
        gen = Generation(self, self.schedule.resolve(num_steps))
        outer = self._local.generation
        if outer is not None and outer.guessed:
            self.end(outer)
            outer = self._local.generation
        gen.outer = outer
        self._local.generation = gen
        return gen

    def end(self, gen: Generation) -> None:
        """End ``gen`` (idempotent): its maps are dropped; an outer marked generation becomes current again."""
        first = not gen.ended
        gen.kind, gen.ended = None, True
        gen.cache.clear()
        with self._lock:
            self.peak_bytes = max(self.peak_bytes, gen.cache.peak_bytes)
            if first:
                self.fallbacks += gen.cache.fallbacks
        if self._local.generation is gen:
            self._local.generation = gen.outer
            if gen.guessed:
                self._local.sample = self._local.timestep = self._local.shape = None

    def end_current(self) -> None:
        gen = self._local.generation
        if gen is not None:
            self.end(gen)

    def for_call(self, sample: torch.Tensor, timestep) -> Generation:
        """The generation a UNet call belongs to, its call index set (the UNet's pre-hook)."""
        gen = self._local.generation
        if gen is None or gen.guessed:
            return self.guess(sample, timestep)  # a new sample shape starts a new guessed generation
        gen.enter_call()
        if not torch.compiler.is_compiling():
            gen.check_sample(tuple(sample.shape))
        return gen

    def after_call(self) -> None:
        """A guessed generation ends once its last step made as many UNet calls as the step before."""
        gen = self._local.generation
        if gen is not None and gen.guessed and gen.step_index == gen.num_steps - 1 and gen.calls >= gen.step_calls:
            timestep, shape = self._local.timestep, self._local.shape
            self.end(gen)
            self._local.exhausted, self._local.timestep, self._local.shape = gen, timestep, shape

    def guess(self, sample: torch.Tensor, timestep) -> Generation:
        """The fallback for UNet calls outside any marked generation: see the module docstring."""
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "attnreuse: a compiled UNet was called outside a marked generation, where steps are guessed "
                "from timestep values (a host sync); patch the pipeline (attnreuse.patch(pipe, ...)) or wrap "
                "your loop in `with handle.generation(num_steps) as gen:` and call gen.step(i)")
        local = self._local
        t = _timestep_value(timestep)
        shape = tuple(sample.shape)
        gen = local.generation
        exhausted, local.exhausted = local.exhausted, None
        if exhausted is not None and shape == local.shape and t < local.timestep:
            gen = exhausted
        if gen is not None and shape == local.shape:
            previous = local.sample() if local.sample is not None else None
            if t == local.timestep and previous is sample:  # a further call of this step
                gen.enter_call()
                return gen
            if t < local.timestep:
                if gen.step_index + 1 >= gen.num_steps:
                    self.end(gen)
                    self._local.timestep = self._local.shape = None
                    raise ValueError(
                        f"attnreuse: sampling reached step {gen.num_steps + 1} but the schedule has "
                        f"{gen.num_steps} steps ({to_string(gen.schedule)}); pass a schedule with one entry per "
                        "sampling step (e.g. attnreuse.hurry(num_inference_steps, reuse)) or a length-free one "
                        "(attnreuse.hurry_fraction) with a patched pipeline or handle.generation(num_steps)")
                gen.advance()
                self._remember(t, sample, shape)
                gen.enter_call()
                return gen
        if gen is not None:
            if t == local.timestep and gen.step_index > 0 and shape == local.shape:
                warnings.warn(
                    "attnreuse: a new sample at the timestep of the running step starts a new generation, so "
                    "nothing is reused; schedulers that evaluate the UNet twice per step (Heun, KDPM2) need the "
                    "pipeline patch (attnreuse.patch(pipe, ...)) or `with handle.generation(num_steps) as gen:`",
                    stacklevel=4)
            self.end(gen)
        if not isinstance(self.schedule, FixedSchedule):
            raise ValueError(
                f"attnreuse: the schedule {self.schedule!r} is length-free, but this UNet was called outside a "
                "marked generation, so the number of steps is unknown: patch the pipeline (attnreuse.patch(pipe, "
                "...)), or wrap your loop in `with handle.generation(num_steps) as gen:`")
        if self.on_begin is not None:
            self.on_begin()
        gen = Generation(self, self.schedule.entries, guessed=True)
        local.generation = gen
        self._remember(t, sample, shape)
        gen.enter_call()
        return gen

    def _remember(self, t: float, sample: torch.Tensor, shape: tuple[int, ...]) -> None:
        self._local.timestep, self._local.sample, self._local.shape = t, weakref.ref(sample), shape

    def __getstate__(self) -> dict:  # generations are per thread and per run: never copied
        state = dict(self.__dict__)
        del state["_local"], state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = _ThreadState()
        self._lock = threading.Lock()


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
