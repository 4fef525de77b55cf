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
from .clock import Clock, Generation
from .config import LayerPolicy
from .kernels.reference import merge_heads, split_heads
from .schedule import Action

# Processors whose computation this processor reproduces on capture and reuse steps.
SUPPORTED_PROCESSORS = (AttnProcessor, AttnProcessor2_0)


def check_supported(name: str, attn: torch.nn.Module, processor) -> None:
    """Raise ``TypeError`` naming the fix if ``attn`` (running ``processor``) is a layer attnreuse cannot patch."""
    fix = ("call unet.set_attn_processor(AttnProcessor2_0()) before patching, or leave the layer out "
           "with layers=lambda name: ...")
    if not isinstance(attn, Attention):
        raise TypeError(f"{name}: {type(attn).__name__} is not a diffusers Attention layer")
    if getattr(attn, "fused_projections", False) or attn.added_kv_proj_dim is not None:
        raise TypeError(f"{name}: fused or added key/value projections are not supported; {fix}")
    if not isinstance(processor, SUPPORTED_PROCESSORS):
        raise TypeError(f"{name}: processor {type(processor).__name__} is not supported; {fix}")


class _Patched:
    def __init__(self, name: str, original, clock: Clock, backend: str):
        self.name = name
        self.original = original
        self.clock = clock
        self.backend = backend

    def _kind(self) -> tuple[Generation | None, LayerPolicy | None, Action]:
        """The current generation, this layer's policy in it and what the layer does in this call."""
        gen = self.clock.current
        if gen is None:  # the layer runs outside a UNet call
            return None, None, Action.COMPUTE
        policy = gen.policies[self.name]
        return gen, policy, gen.kind if policy.reuse else Action.COMPUTE


class OutputReuseProcessor(_Patched):
    """The baseline ``target="output"``: a reuse step returns the layer's whole output of the capture step
    (T-GATE / PAB style), ignoring its current input."""

    def __call__(self, attn: Attention, hidden_states, *args, **kwargs):
        gen, _, kind = self._kind()
        if kind is Action.REUSE:
            cached = gen.cache.lookup(self.name, gen.call)
            if cached is not None:
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
        gen, policy, kind = self._kind()
        cached = gen.cache.lookup(self.name, gen.call) if kind is Action.REUSE else None
        if kind is Action.COMPUTE or (kind is Action.REUSE and cached is None):  # None: over the budget
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
