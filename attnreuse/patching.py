"""``patch`` / ``unpatch``: install and remove attention-map reuse on a diffusers UNet or pipeline."""
from __future__ import annotations

import math

import torch
from diffusers.models.attention_processor import Attention

from .config import ReuseConfig
from .planner import LayerPlan, auto_dtypes, layer_shapes, make_plan, measured_cost
from .processor import ReuseAttnProcessor, check_supported
from .schedule import Action, ScheduleLike
from .state import ReuseState

_HANDLE_ATTR = "_attnreuse_handle"
_RESETTING_CLASSES: dict[type, type] = {}


def patch(model, schedule: ScheduleLike, *, layers="all", cache_dtype=None, max_cache_bytes=None,
          backend: str = "auto", target: str = "map") -> "ReuseHandle":
    """Make ``model`` reuse attention maps on the steps where ``schedule`` says 0.

    Args:
        model: a diffusers ``UNet2DConditionModel``, or a pipeline (its ``.unet`` is patched, and every call
            of the pipeline starts from empty state).
        schedule, layers, cache_dtype, max_cache_bytes, backend, target: see :class:`attnreuse.ReuseConfig`.

    Returns a :class:`ReuseHandle` (also a context manager that unpatches on exit). Patching a patched
    model replaces the earlier patch.
    """
    config = ReuseConfig(schedule=schedule, layers=layers, cache_dtype=cache_dtype, max_cache_bytes=max_cache_bytes,
                         backend=backend, target=target)
    unet, pipe = _resolve(model)
    unpatch(unet)
    return ReuseHandle(unet, config, pipe)


def unpatch(model) -> None:
    """Restore the exact original processors of ``model`` (a UNet or pipeline); no-op if not patched."""
    unet, _ = _resolve(model)
    handle = getattr(unet, _HANDLE_ATTR, None)
    if handle is not None:
        handle.remove()


def _resolve(model) -> tuple[torch.nn.Module, object | None]:
    if isinstance(model, torch.nn.Module):
        return model, None
    unet = getattr(model, "unet", None)
    if isinstance(unet, torch.nn.Module):
        return unet, model
    raise TypeError(f"attnreuse.patch takes a diffusers UNet or a pipeline with a .unet, not {type(model).__name__}")


def _find_layers(unet: torch.nn.Module, config: ReuseConfig) -> dict[str, Attention]:
    found = {name: m for name, m in unet.named_modules() if isinstance(m, Attention)}
    if not found:
        raise TypeError(f"{type(unet).__name__} has no diffusers Attention layers: pass a UNet2DConditionModel "
                        "or a pipeline that has one")
    chosen = {name: m for name, m in found.items() if config.selects(name, m.is_cross_attention)}
    if not chosen:
        raise ValueError(f"layers={config.layers!r} selects none of the {len(found)} attention layers "
                         f"(names look like {next(iter(found))!r})")
    for name, m in chosen.items():
        check_supported(name, m)
    return chosen


class ReuseHandle:
    """A live patch: sampling state, cache accounting and the way back (:meth:`remove`)."""

    def __init__(self, unet: torch.nn.Module, config: ReuseConfig, pipe=None):
        layers = _find_layers(unet, config)  # validates everything before anything changes
        self.unet = unet
        self.config = config
        self.state = ReuseState(config.schedule, config.max_cache_bytes)
        self._plans: dict[tuple, list[LayerPlan]] = {}  # by (sample shape, context tokens)
        self._plan: list[LayerPlan] | None = None
        self._originals = {name: m.processor for name, m in layers.items()}
        for name, m in layers.items():
            m.set_processor(ReuseAttnProcessor(name, m.processor, self.state, config))
        self._hook = unet.register_forward_pre_hook(self._on_unet_call, with_kwargs=True)
        self._pipe, self._pipe_class = pipe, None
        if pipe is not None:
            self._pipe_class = type(pipe)
            pipe.__class__ = _resetting_class(type(pipe))
        setattr(unet, _HANDLE_ATTR, self)

    @property
    def layers(self) -> tuple[str, ...]:
        """Names of the patched attention layers."""
        return tuple(self._originals)

    @property
    def step(self) -> int:
        """Index of the current sampling step (-1 before the first UNet call of a generation)."""
        return self.state.step

    @property
    def cache_bytes(self) -> int:
        """Bytes of attention maps held right now."""
        return self.state.cache_bytes

    @property
    def peak_cache_bytes(self) -> int:
        """Most bytes of attention maps held at once since patching."""
        return self.state.peak_cache_bytes

    @property
    def plan(self) -> list[LayerPlan] | None:
        """The per-layer plan in force (``max_cache_bytes`` or ``cache_dtype="auto"``), else None."""
        return self._plan

    def reset(self) -> None:
        """Start the next UNet call as a new generation, dropping all cached maps."""
        self.state.reset()

    def pin(self, step: int) -> None:
        """Run every following UNet call as step ``step`` (branch 0) until :meth:`reset`: for benchmarks and
        CUDA-graph capture, where one call per action (compute, capture, reuse) is recorded and replayed."""
        self.state.pin(step)

    def remove(self) -> None:
        """Undo the patch exactly: original processors, no hook, the pipeline's own class."""
        if getattr(self.unet, _HANDLE_ATTR, None) is not self:
            return
        modules = dict(self.unet.named_modules())
        for name, original in self._originals.items():
            modules[name].set_processor(original)
        self._hook.remove()
        if self._pipe is not None:
            self._pipe.__class__ = self._pipe_class
        self.state.reset()
        delattr(self.unet, _HANDLE_ATTR)

    def _on_unet_call(self, module, args, kwargs):
        sample = kwargs["sample"] if "sample" in kwargs else args[0]
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        self.state.begin_call(timestep, tuple(sample.shape))
        if self.config.planned and (self._plan is None or (self.state.step == 0 and self.state.branch == 0)):
            context = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[2]
            self._use_plan(sample, context.shape[1])

    def _use_plan(self, sample: torch.Tensor, context_tokens: int) -> None:
        key = (tuple(sample.shape), context_tokens)
        if key not in self._plans:
            shapes = layer_shapes(self.unet, self.layers, key[0], context_tokens)
            dtype = self.config.cache_dtype
            dtypes = auto_dtypes(sample.dtype) if dtype == "auto" else (dtype or sample.dtype,)
            acts = self.state.actions
            budget = self.config.max_cache_bytes
            self._plans[key] = make_plan(
                shapes, measured_cost(sample.device, sample.dtype, self.config.backend), dtypes,
                n_reuse=acts.count(Action.REUSE), n_capture=acts.count(Action.CAPTURE),
                max_bytes=math.inf if budget is None else budget)
        self._plan = self._plans[key]
        self.state.layer_dtypes = {p.name: p.dtype if p.reuse else None for p in self._plan}

    def __enter__(self) -> "ReuseHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (f"ReuseHandle(schedule={''.join(map(str, self.config.schedule))}, layers={len(self.layers)}, "
                f"cache_dtype={self.config.cache_dtype}, step={self.step}, cache_bytes={self.cache_bytes})")


def _resetting_class(cls: type) -> type:
    """A subclass of a pipeline class whose calls start and end with empty reuse state."""
    if cls not in _RESETTING_CLASSES:
        def __call__(self, *args, **kwargs):
            handle = getattr(self.unet, _HANDLE_ATTR, None)
            if handle is not None:
                handle.reset()
            try:
                return cls.__call__(self, *args, **kwargs)
            finally:
                if handle is not None:
                    handle.reset()  # maps must not outlive the generation that made them

        _RESETTING_CLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                                               "__qualname__": cls.__qualname__})
    return _RESETTING_CLASSES[cls]
