"""``patch`` / ``unpatch``: install and remove attention-map reuse on a diffusers UNet or pipeline."""
from __future__ import annotations

import dataclasses
import warnings

import torch
from diffusers.models.attention_processor import Attention

from .clock import Clock, Generation
from .config import ReuseConfig
from .costs import check_mode
from .hooks import Processors, UnetCalls
from .planner import LayerPlan
from .plans import PlanKey, Plans
from .processor import MapReuseProcessor, OutputReuseProcessor, check_supported
from .progress_clock import ProgressClock
from .schedule import ScheduleLike, actions, check_num_steps, step_counts

_HANDLE_ATTR = "_attnreuse_handle"


def patch(model, schedule: ScheduleLike, *, layers="all", cache_dtype=None, max_cache_bytes=None,
          backend: str = "auto", target: str = "map", plan: str = "measured") -> "ReuseHandle":
    """Make ``model`` reuse attention maps on the steps where ``schedule`` says 0.

    Args:
        model: a diffusers ``UNet2DConditionModel`` or DiT transformer whose attention runs diffusers'
            ``AttnProcessor2_0`` (PixArt-α/Σ), or a pipeline with one as ``.unet`` / ``.transformer`` (then the
            pipeline's progress bar drives the steps: see :mod:`attnreuse.progress_clock`).
        schedule, layers, cache_dtype, max_cache_bytes, backend, target, plan: see :class:`attnreuse.ReuseConfig`.
            By default (``plan="measured"``) a layer reuses on a CUDA GPU only where that is faster there, by a
            cost table measured on the GPU (:mod:`attnreuse.costs`); off a GPU every selected layer reuses.

    Returns a :class:`ReuseHandle` (also a context manager that unpatches on exit). Patching a patched
    model replaces the earlier patch, and the pipelines that drove the earlier patch's steps drive the new
    one's; everything is validated first, so a rejected patch changes nothing.
    """
    config = ReuseConfig(schedule=schedule, layers=layers, cache_dtype=cache_dtype, max_cache_bytes=max_cache_bytes,
                         backend=backend, target=target, plan=plan)
    unet, pipe = _resolve(model)
    previous = getattr(unet, _HANDLE_ATTR, None)
    chosen = _find_layers(unet, config, previous)  # validates everything before anything changes
    if pipe is not None:
        _check_pipeline(pipe, previous)
    pipes = [pipe] if pipe is not None else []
    if previous is not None:
        pipes += [p for p in previous._pipes if p is not pipe]  # they share this UNet: keep counting its steps
        previous._uninstall(warn=False)  # layers changed since (the documented fix: patch again) keep the change
    handle = ReuseHandle(unet, config, chosen, pipes)
    if previous is not None and previous.plans is not None and handle.plans is not None:
        handle.plans.cost = previous.plans.cost  # a cost model the user set stays
    return handle


def unpatch(model) -> None:
    """Restore the exact original processors of ``model`` (a UNet or pipeline); no-op if not patched."""
    unet, _ = _resolve(model)
    handle = getattr(unet, _HANDLE_ATTR, None)
    if handle is not None:
        handle._uninstall(warn=True)


def _resolve(model) -> tuple[torch.nn.Module, object | None]:
    """``(denoiser, pipeline or None)``: the UNet (``pipe.unet``) or DiT transformer (``pipe.transformer``)."""
    if isinstance(model, torch.nn.Module):
        unet, pipe = model, None
    else:
        unet, pipe = getattr(model, "unet", None) or getattr(model, "transformer", None), model
    if not isinstance(unet, torch.nn.Module):
        raise TypeError(f"attnreuse.patch takes a diffusers UNet2DConditionModel or PixArt-style transformer, or a "
                        f"pipeline with one (.unet / .transformer), not {type(model).__name__}")
    return getattr(unet, "_orig_mod", unet), pipe  # a torch.compile'd model: patch the module it wraps


def _find_layers(unet: torch.nn.Module, config: ReuseConfig, previous: "ReuseHandle | None") -> dict[str, Attention]:
    found = {name: m for name, m in unet.named_modules() if isinstance(m, Attention)}
    if not found:
        raise TypeError(f"{type(unet).__name__} has no diffusers Attention layers: attnreuse patches UNet2DConditionModel "
                        "and PixArt-style DiT transformers (joint-attention models such as SD3 and Flux are not "
                        "supported)")
    chosen = {name: m for name, m in found.items() if config.selects(name, m.is_cross_attention)}
    if not chosen:
        raise ValueError(f"layers={config.layers!r} selects none of the {len(found)} attention layers "
                         f"(names look like {next(iter(found))!r})")
    for name, m in chosen.items():
        check_supported(name, m, previous._original(name, m) if previous is not None else m.processor)
    return chosen


def _check_pipeline(pipe, previous: "ReuseHandle | None") -> None:
    own = pipe.__dict__.get("progress_bar")
    if own is not None and not (isinstance(own, ProgressClock) and previous is not None and own.clock is previous.clock):
        raise TypeError(f"{type(pipe).__name__}.progress_bar is overridden on this instance; attnreuse counts the "
                        "pipeline's steps through it: remove the override, or patch pipe.unet and mark "
                        "generations with handle.generation(num_steps)")
    if not callable(getattr(type(pipe), "progress_bar", None)):
        raise TypeError(f"{type(pipe).__name__} has no progress_bar method to count its steps: patch pipe.unet and "
                        "mark generations with handle.generation(num_steps)")


class _LayerNames:
    """A picklable stand-in for a layer predicate: the names it selected."""

    def __init__(self, names):
        self.names = frozenset(names)

    def __call__(self, name: str) -> bool:
        return name in self.names


class ReuseHandle:
    """A live patch: the clock (steps, per-thread generations), the plans, and the way back (:meth:`remove`).

    ``plans`` (None with ``plan="all"`` and neither ``max_cache_bytes`` nor ``cache_dtype="auto"``, or with
    ``target="output"`` and neither) holds one per-layer plan per kind of input; its ``cost`` attribute is the
    cost model they are made with (by default the table measured on this GPU: :mod:`attnreuse.costs`).
    """

    def __init__(self, unet: torch.nn.Module, config: ReuseConfig, layers: dict[str, Attention], pipes=()):
        self.unet = unet
        self.config = config
        self.clock = Clock(config.schedule, config.max_cache_bytes)
        self.plans = Plans(unet, tuple(layers), config) if config.has_plans else None
        kind = OutputReuseProcessor if config.target == "output" else MapReuseProcessor
        self._processors = Processors(layers, lambda name, proc: kind(name, proc, self.clock, config.backend))
        self.clock.on_begin = self.check_installed
        self._calls = UnetCalls(unet, self.clock, self.plans, dict.fromkeys(layers, config.fixed_policy()))
        self._pipes: list = []
        setattr(unet, _HANDLE_ATTR, self)
        for pipe in pipes:
            self.attach(pipe)

    # ---- what users read --------------------------------------------------------------------------------

    @property
    def layers(self) -> tuple[str, ...]:
        """Names of the patched attention layers."""
        return tuple(self._processors.originals)

    @property
    def current(self) -> Generation | None:
        """This thread's generation (marked, or guessed from the UNet's calls), None if there is none."""
        return self.clock.current

    @property
    def step(self) -> int:
        """Index of this thread's current sampling step (-1 outside a generation)."""
        gen = self.clock.current
        return -1 if gen is None else gen.step_index

    @property
    def cache_bytes(self) -> int:
        """Bytes of attention maps this thread's generation holds right now."""
        gen = self.clock.current
        return 0 if gen is None else gen.cache.bytes

    @property
    def peak_cache_bytes(self) -> int:
        """Most bytes of attention maps one generation held at once since patching."""
        gen = self.clock.current
        now = 0 if gen is None else max(gen.cache.peak_bytes, gen.cache.bytes)
        return max(self.clock.peak_bytes, now)

    @property
    def fallbacks(self) -> int:
        """Layer calls of reuse steps that computed for want of a map since patching: the layer did not run when
        the maps were captured (a block a feature cache such as DeepCache skipped). They capture instead, so
        later reuse steps have a map."""
        gen = self.clock.current
        return self.clock.fallbacks + (0 if gen is None else gen.cache.fallbacks)

    @property
    def plan(self) -> list[LayerPlan] | None:
        """The per-layer plan made last: every layer's decision, its reason and numbers (per-call costs, the
        saving; :class:`~attnreuse.planner.LayerPlan`). None before the first plan, and where nothing plans
        (``plan="all"`` without a budget or ``"auto"``; off a GPU, where there is no cost table; a schedule
        without reuse steps)."""
        return None if self.plans is None else self.plans.latest

    # ---- what users call --------------------------------------------------------------------------------

    def generation(self, num_steps: int) -> Generation:
        """Mark a generation of ``num_steps`` sampling steps on this thread, for a sampling loop of your own::

            with handle.generation(20) as gen:
                for i, t in enumerate(scheduler.timesteps):
                    gen.step(i)   # every UNet call until the next gen.step belongs to step i
                    ...unet(...)...

        The schedule is resolved against ``num_steps`` now; leaving the block drops every map.
        """
        return self.clock.begin(num_steps)

    def attach(self, pipe) -> None:
        """Let another pipeline sharing this UNet (e.g. from ``Pipeline.from_pipe``) drive the clock too."""
        if _resolve(pipe)[0] is not self.unet:
            raise ValueError(f"{type(pipe).__name__}'s UNet (or transformer) is not the one this handle patched")
        _check_pipeline(pipe, self)
        pipe.progress_bar = ProgressClock(self.clock, pipe)  # an instance attribute: the class stays
        self._pipes.append(pipe)

    def prepare(self, sample: torch.Tensor, encoder_hidden_states: torch.Tensor, num_steps: int,
                mode: str = "eager") -> list[LayerPlan] | None:
        """Make the per-layer plan for UNet inputs like these (their shape, dtype and device: empty tensors do)
        ahead of sampling, and return it: what each layer will do, why, and its numbers; nothing is sampled.

        ``mode``: whose costs decide: ``"eager"`` (an eager caller, host launch overhead included: what a
        generation's first UNet call plans with) or ``"graphed"`` (GPU time alone: for CUDA graphs and
        ``torch.compile(mode="reduce-overhead")``). Preparing again in another mode replaces the plan for these
        inputs. Needed before a compiled UNet runs or a CUDA graph is captured with a plan (``plan="measured"``
        on a GPU, ``max_cache_bytes``, ``cache_dtype="auto"``). Where nothing plans (``plan="all"`` without a
        budget or ``"auto"``, no cost table on this device, no reuse step), returns None."""
        check_mode(mode)
        if not torch.is_tensor(sample) or sample.dim() < 3:
            raise TypeError(f"prepare(sample, encoder_hidden_states, num_steps): sample must be the UNet's input tensor "
                            f"(e.g. [batch, channels, height, width]), not {type(sample).__name__} "
                            f"{tuple(getattr(sample, 'shape', ()))}")
        if encoder_hidden_states is not None and (not torch.is_tensor(encoder_hidden_states)
                                                  or encoder_hidden_states.dim() != 3):
            raise TypeError("prepare(sample, encoder_hidden_states, num_steps): encoder_hidden_states must be "
                            "[batch, tokens, width] (or None for a model without text), not "
                            f"{tuple(getattr(encoder_hidden_states, 'shape', ()))}")
        check_num_steps(num_steps)
        if self.plans is None or not self.plans.planning(sample.device):
            return None
        steps = step_counts(actions(self.config.schedule.resolve(num_steps)))
        self.plans.make(PlanKey.of(sample, encoder_hidden_states, steps), mode, again=True)
        return self.plan

    def reset(self) -> None:
        """End this thread's generation now, dropping its maps."""
        self.clock.end_current()

    def check_installed(self) -> None:
        """Raise if something replaced this patch's processors (``enable_attention_slicing``,
        ``fuse_qkv_projections``, ``load_ip_adapter``, any ``set_attn_processor``): reuse would stop silently.
        Runs at the start of every generation, outside the UNet's forward."""
        self._processors.check()

    def remove(self) -> None:
        """Undo the patch: original processors on every layer that still runs this patch's (a layer whose processor
        was replaced since keeps the replacement, with a warning), no hook, the pipelines' own progress bars."""
        self._uninstall(warn=True)

    def _original(self, name: str, module: Attention):
        return self._processors.original(name, module)

    def _uninstall(self, warn: bool) -> None:
        """Called straight from unpatch, remove and the with block's exit: the warning names the user's line."""
        if getattr(self.unet, _HANDLE_ATTR, None) is not self:
            return
        kept = self._processors.restore()
        if kept and warn:
            warnings.warn(f"attnreuse: unpatch left {len(kept)} layer(s) alone whose processors were replaced after "
                          f"patching ({kept[0]} runs {type(self._processors.modules[kept[0]].processor).__name__}); "
                          "the rest got their original processors back", stacklevel=3)
        self._calls.remove()
        for pipe in self._pipes:
            own = pipe.__dict__.get("progress_bar")
            if isinstance(own, ProgressClock) and own.clock is self.clock:
                del pipe.__dict__["progress_bar"]
        self._pipes.clear()
        self.clock.end_current()
        delattr(self.unet, _HANDLE_ATTR)

    def __enter__(self) -> "ReuseHandle":
        return self

    def __exit__(self, *exc) -> None:
        self._uninstall(warn=True)

    def __repr__(self) -> str:
        return (f"ReuseHandle(schedule={self.config.schedule!r}, layers={len(self.layers)}, "
                f"cache_dtype={self.config.cache_dtype}, step={self.step}, cache_bytes={self.cache_bytes})")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if callable(self.config.layers):  # a lambda would not pickle; the names it chose do
            state["config"] = dataclasses.replace(self.config, layers=_LayerNames(self.layers))
        return state
