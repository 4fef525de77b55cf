"""What a patch installs on a model and takes off again: its attention processors and its forward hooks."""
from __future__ import annotations

import inspect
from typing import Callable

import torch
from diffusers.models.attention_processor import Attention

from .clock import Clock
from .config import LayerPolicy
from .plans import PlanKey, Plans


class Processors:
    """The patch's processors on the chosen layers, the originals they replaced, and the way back."""

    def __init__(self, layers: dict[str, Attention], make: Callable[[str, object], object]):
        self.modules = dict(layers)
        self.originals = {name: m.processor for name, m in layers.items()}
        self.installed = {name: make(name, m.processor) for name, m in layers.items()}
        for name, m in layers.items():
            m.set_processor(self.installed[name])

    def original(self, name: str, module: Attention):
        """The processor layer ``name`` had before the patch, or what replaced the patch's there since."""
        current = module.processor
        return self.originals[name] if name in self.installed and current is self.installed[name] else current

    def replaced(self) -> list[str]:
        """Layers whose processor is no longer the patch's."""
        return [name for name, proc in self.installed.items() if self.modules[name].processor is not proc]

    def check(self) -> None:
        """Raise if something replaced the patch's processors: those layers would stop reusing silently."""
        changed = self.replaced()
        if changed:
            found = self.modules[changed[0]].processor
            raise RuntimeError(
                f"attnreuse: the processors of {len(changed)} patched attention layer(s) were replaced after patching "
                f"({changed[0]} now runs {type(found).__name__}), so they would no longer reuse maps: call "
                "attnreuse.patch(...) again after changes like enable_attention_slicing(), fuse_qkv_projections() "
                "or load_ip_adapter() (with IP-Adapters, layers='self'), or make the change before patching")

    def restore(self) -> list[str]:
        """Give every layer still running the patch's processor its original back; returns the others."""
        kept = self.replaced()
        for name, original in self.originals.items():
            if name not in kept:
                self.modules[name].set_processor(original)
        return kept


class UnetCalls:
    """The model's forward hooks: before a call, tell the clock and hand the generation its layer policies
    (traced by torch.compile: no host sync on a marked generation); after it, tell the clock."""

    def __init__(self, unet: torch.nn.Module, clock: Clock, plans: Plans | None, fixed: dict[str, LayerPolicy]):
        self.clock, self.plans, self.fixed = clock, plans, fixed  # fixed: every layer's policy when nothing plans
        # forward's parameter names: UNets take (sample, timestep, encoder_hidden_states, ...), DiT transformers
        # (hidden_states, encoder_hidden_states, timestep, ...); either may come by position or by keyword
        self.params = list(inspect.signature(type(unet).forward).parameters)[1:]
        self.position = {name: i for i, name in enumerate(self.params)}
        self.handles = (unet.register_forward_pre_hook(self.before, with_kwargs=True),
                        unet.register_forward_hook(self.after))

    def argument(self, name: str, args, kwargs):
        if name in kwargs:
            return kwargs[name]
        i = self.position.get(name)  # a class-conditional DiT has no encoder_hidden_states
        return args[i] if i is not None and i < len(args) else None

    def before(self, module, args, kwargs):
        sample = self.argument(self.params[0], args, kwargs)  # sample (UNet) or hidden_states (DiT)
        gen = self.clock.for_call(sample, self.argument("timestep", args, kwargs))
        if self.plans is None or not self.plans.planning(sample.device):
            gen.policies = self.fixed
            return
        key = PlanKey.of(sample, self.argument("encoder_hidden_states", args, kwargs), gen.counts)
        policies = self.plans.policies(key)
        if policies is None:
            where = None
            if torch.compiler.is_compiling():
                where = "inside torch.compile"
            elif sample.is_cuda and torch.cuda.is_current_stream_capturing():
                where = "while a CUDA graph is being captured"
            if where is not None:
                raise RuntimeError(self.no_plan(key, where))
            policies = self.plans.make(key)  # eager: a generation's first call plans with eager costs
        gen.policies = policies

    def no_plan(self, key: PlanKey, where: str) -> str:
        """The error of a call that needs a plan where none can be made (kernels cannot be timed there)."""
        if self.plans.planned:
            what = "max_cache_bytes / cache_dtype='auto' need"
            instead = "patch with plan='all' and neither max_cache_bytes nor cache_dtype='auto'"
        else:
            what = "plan='measured' (the default) needs"
            instead = "patch with plan='all' (every selected layer reuses, nothing timed)"
        return (f"attnreuse: {what} a per-layer plan (kernel timing) for input {key.sample_shape} with "
                f"{key.context_tokens} context tokens and {key.steps.reuse} reuse / {key.steps.capture} capture steps "
                f"(a plan is made per input shape and step count), which cannot be made {where}: call "
                "handle.prepare(sample, encoder_hidden_states, num_steps) for these before the compiled UNet "
                "runs or the graph is captured (with mode='graphed' for CUDA graphs and "
                f"torch.compile(mode='reduce-overhead')), or {instead}")

    def after(self, module, args, output):
        self.clock.after_call()

    def remove(self) -> None:
        for hook in self.handles:
            hook.remove()
