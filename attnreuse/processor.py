"""Attention processors that compute, capture or reuse as the current step's kind says.

Each processor reads, per call, from its thread's :class:`~attnreuse.clock.Generation` only the kind of the
current step, the index of the UNet call within it and its layer's :class:`~attnreuse.config.LayerPolicy`
(resolved once per plan: a plan depends on the input shape, so two threads sampling at two resolutions
each need their own); maps live in that generation's cache.
"""
from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from . import kernels
from .clock import Clock
from .kernels.reference import merge_heads, split_heads
from .schedule import Action

# Processors whose computation this processor reproduces on capture and reuse steps.
SUPPORTED_PROCESSORS = (AttnProcessor, AttnProcessor2_0)
SUPPORTED = ("diffusers' AttnProcessor / AttnProcessor2_0 (UNet2DConditionModel, PixArt-style Transformer2DModel / "
             "PixArtTransformer2DModel)")


def check_supported(name: str, attn: torch.nn.Module, processor) -> None:
    """Raise ``TypeError`` if ``attn`` (running ``processor``) is a layer attnreuse cannot patch, naming the fix
    that works for its cause."""
    leave_out = "leave it out with layers=lambda name: ... (e.g. layers='self')"
    if not isinstance(attn, Attention):
        raise TypeError(f"{name}: {type(attn).__name__} is not a diffusers Attention layer")
    kind = type(processor).__name__
    if "Fused" in kind:  # unfusing restores the processors; the fused weights stay unused beside the originals
        raise TypeError(f"{name}: fused query/key/value projections ({kind}) are not supported; call "
                        "pipe.unfuse_qkv_projections() (or unet.unfuse_qkv_projections()) before patching")
    if "Joint" in kind or "Flux" in kind or "SD3" in kind:
        raise TypeError(f"{name}: processor {kind} (joint text-image attention, as in SD3 and Flux) is not "
                        f"supported: attnreuse patches attention layers running {SUPPORTED}")
    if attn.added_kv_proj_dim is not None:
        raise TypeError(f"{name}: added key/value projections (DeepFloyd IF, Kandinsky) are not supported, with any "
                        f"processor; {leave_out}")
    if "IPAdapter" in kind:
        raise TypeError(f"{name}: processor {kind} (an IP-Adapter) is not supported; patch with layers='self' "
                        "(IP-Adapters act on cross-attention), or unload the adapter first (pipe.unload_ip_adapter())")
    if not isinstance(processor, SUPPORTED_PROCESSORS):
        raise TypeError(f"{name}: processor {kind} is not supported; call "
                        f"unet.set_attn_processor(AttnProcessor2_0()) before patching, or {leave_out}")


class _Patched:
    def __new__(cls, *args, **kwargs):
        # diffusers' loaders (load_ip_adapter, unload_ip_adapter) rebuild processors as type(proc)(): that gives
        # the plain attention attnreuse wraps, and the patch's check at the next generation says what changed
        if not args and not kwargs:
            return AttnProcessor2_0()
        return super().__new__(cls)

    def __getnewargs__(self):  # pickle and deepcopy rebuild through __new__: not the call above
        return (None,)

    def __init__(self, name: str, original, clock: Clock, backend: str):
        self.name = name
        self.original = original
        self.clock = clock
        self.backend = backend

    def _kind(self):
        """``(generation, this layer's policy, what the layer does in this call, the cached entry it reuses)``.

        A reuse call finding no entry computes: without storing when the budget declined the entry, else (the
        layer did not run when the maps were captured: a block a feature cache such as DeepCache skipped) as a
        capture, so later reuse steps find one, counted in ``cache.fallbacks``."""
        gen = self.clock.current
        if gen is None:  # the layer runs outside a UNet call
            return None, None, Action.COMPUTE, None
        policy = gen.policies[self.name]
        kind = gen.kind if policy.reuse else Action.COMPUTE
        if kind is not Action.REUSE:
            return gen, policy, kind, None
        cached = gen.cache.lookup(self.name, gen.call)
        if cached is not None:
            return gen, policy, kind, cached
        if gen.cache.declined_entry(self.name, gen.call):
            return gen, policy, Action.COMPUTE, None
        gen.cache.fallbacks += 1
        return gen, policy, Action.CAPTURE, None


class OutputReuseProcessor(_Patched):
    """The baseline ``target="output"``: a reuse step returns the layer's whole output of the capture step
    (T-GATE / PAB style), ignoring its current input."""

    def __call__(self, attn: Attention, hidden_states, *args, **kwargs):
        gen, _, kind, cached = self._kind()
        if kind is Action.REUSE:
            if cached.shape != hidden_states.shape:
                raise RuntimeError(f"attnreuse: {self.name}: cached output {tuple(cached.shape)} does not fit "
                                   f"input {tuple(hidden_states.shape)}: keep one batch size and resolution "
                                   "within a generation")
            return cached
        out = self.original(attn, hidden_states, *args, **kwargs)
        if kind is Action.CAPTURE:
            gen.cache.store(self.name, gen.call, out)
        return out


class MapReuseProcessor(_Patched):
    """Runs the layer's original processor on computing steps; captures or reuses the map otherwise.

    Capture and reuse steps follow ``AttnProcessor2_0`` line for line, except that a reuse step never
    runs ``to_q``, ``to_k``, ``Q Kᵀ`` or the softmax.
    """

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        gen, policy, kind, cached = self._kind()
        if kind is Action.COMPUTE:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        if kind is Action.REUSE:
            b, _, nq, nk = cached.shape
            if (b, nq, nk) != (hidden_states.shape[0], hidden_states.shape[1], value.shape[1]):
                raise RuntimeError(
                    f"attnreuse: {self.name}: the cached map is for batch {b}, {nq} query and {nk} key tokens; this "
                    f"call has batch {hidden_states.shape[0]}, {hidden_states.shape[1]} query and {value.shape[1]} "
                    "key tokens: keep one batch size, resolution and prompt length within a generation")
            hidden_states = kernels.cached_pv(cached, value, attn.heads, backend=self.backend)
        else:  # Action.CAPTURE
            query = attn.to_q(hidden_states)
            key = attn.to_k(encoder_hidden_states)
            if attn.norm_q is not None or attn.norm_k is not None:
                query, key = _normalise_qk(attn, query, key)
            mask = None
            if attention_mask is not None:
                mask = attn.prepare_attention_mask(attention_mask, key.shape[1], key.shape[0])
                mask = mask.view(key.shape[0], attn.heads, -1, mask.shape[-1])
            hidden_states, cmap = kernels.capture(query, key, value, attn.heads, attn.scale,
                                                  policy.format_for(value.dtype), mask, backend=self.backend)
            gen.cache.store(self.name, gen.call, cmap)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _normalise_qk(attn: Attention, query, key):
    """Apply the layer's per-head q/k norms (they act on ``[B, H, N, D]``), back in ``[B, N, H·D]``."""
    def per_head(x, norm):
        if norm is None:
            return x
        return merge_heads(norm(split_heads(x, attn.heads)))
    return per_head(query, attn.norm_q), per_head(key, attn.norm_k)
