"""The attention processor that computes, captures or reuses maps as the schedule says."""
from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from . import kernels
from .kernels.reference import merge_heads, split_heads

from .config import ReuseConfig
from .schedule import Action
from .state import ReuseState

# Processors whose computation this processor reproduces on capture and reuse steps.
SUPPORTED_PROCESSORS = (AttnProcessor, AttnProcessor2_0)


def check_supported(name: str, attn: torch.nn.Module) -> None:
    """Raise ``TypeError`` naming the fix if ``attn`` is a layer attnreuse cannot patch."""
    fix = ("call unet.set_attn_processor(AttnProcessor2_0()) before patching, or leave the layer out "
           "with layers=lambda name: ...")
    if not isinstance(attn, Attention):
        raise TypeError(f"{name}: {type(attn).__name__} is not a diffusers Attention layer")
    if getattr(attn, "fused_projections", False) or attn.added_kv_proj_dim is not None:
        raise TypeError(f"{name}: fused or added key/value projections are not supported; {fix}")
    if not isinstance(attn.processor, SUPPORTED_PROCESSORS):
        raise TypeError(f"{name}: processor {type(attn.processor).__name__} is not supported; {fix}")


class ReuseAttnProcessor:
    """Runs the layer's original processor on ordinary steps; captures or reuses the map otherwise.

    Capture and reuse steps follow ``AttnProcessor2_0`` line for line, except that a reuse step never
    runs ``to_q``, ``to_k``, ``Q Kᵀ`` or the softmax.
    """

    def __init__(self, name: str, original, state: ReuseState, config: ReuseConfig):
        self.name = name
        self.original = original
        self.state = state
        self.cache_dtype = config.cache_dtype
        self.backend = config.backend
        self.reuse_output = config.target == "output"

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        state = self.state
        action = state.action if state.step >= 0 and state.reuses(self.name) else Action.COMPUTE
        cached = state.lookup(self.name) if action is Action.REUSE else None
        if action is Action.COMPUTE or (action is Action.REUSE and cached is None):  # None: over the budget
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if self.reuse_output:
            if action is Action.CAPTURE:
                out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
                state.store(self.name, out)
                return out
            if cached.shape != hidden_states.shape:
                raise RuntimeError(f"attnreuse: {self.name}: cached output {tuple(cached.shape)} does not fit "
                                   f"input {tuple(hidden_states.shape)}; call handle.reset()")
            return cached

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

        if action is Action.REUSE:
            if cached.shape[2] != hidden_states.shape[1]:
                raise RuntimeError(f"attnreuse: {self.name}: cached map is for {cached.shape[2]} query tokens, "
                                   f"the layer got {hidden_states.shape[1]}; call handle.reset()")
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
            dtype = state.layer_dtypes[self.name] if state.layer_dtypes is not None else self.cache_dtype
            hidden_states, cmap = kernels.capture(query, key, value, attn.heads, attn.scale, dtype or value.dtype,
                                                  mask, backend=self.backend)
            state.store(self.name, cmap)

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
