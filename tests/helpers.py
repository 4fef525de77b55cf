"""Shared test helpers: small UNets in the shape of SD1.5, SD2.x and SDXL (random weights, built offline), the
schedulers tests run with, a diffusers-style sampling loop, and float64 attention references."""
from __future__ import annotations

import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       HeunDiscreteScheduler, KDPM2DiscreteScheduler, UNet2DConditionModel)

import attnreuse
from diffusers.models.attention_processor import Attention

from attnreuse.kernels.reference import merge_heads, split_heads

CROSS_DIM = 32
TEXT_TOKENS = 7

ARCHS = {
    # SD1.5: conv projections in/out of the transformer, 8 heads everywhere
    "sd15": dict(attention_head_dim=4),
    # SD2.x: linear projections, per-level head counts
    "sd2": dict(attention_head_dim=(2, 4), use_linear_projection=True),
    # SDXL: linear projections, per-level heads, several transformer layers per block, text-time embedding
    "sdxl": dict(attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=CROSS_DIM + 6 * 8),
}

# name: (scheduler, UNet evaluations per step but the last); the helpers' own loop runs the one-evaluation ones
SCHEDULERS = {
    "ddim": (DDIMScheduler, 1),
    "dpm": (DPMSolverMultistepScheduler, 1),
    "euler": (EulerDiscreteScheduler, 1),
    "heun": (HeunDiscreteScheduler, 2),
    "kdpm2": (KDPM2DiscreteScheduler, 2),
}


def make_unet(arch: str = "sd15", sample_size: int = 8, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=CROSS_DIM,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), **ARCHS[arch])
    return unet.eval()


def tiny_vae() -> AutoencoderKL:
    """A one-level VAE (scale factor 1: 8x8 pixels = 8x8 latents); seeds nothing, its caller does."""
    return AutoencoderKL(block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                         sample_size=8)


def to_q_calls(model) -> tuple[list[int], object]:
    """A counter of ``to_q`` calls of ``model``'s first attention layer, and its hook."""
    attn = next(m for m in model.modules() if isinstance(m, Attention))
    count = [0]
    return count, attn.to_q.register_forward_hook(lambda *a: count.__setitem__(0, count[0] + 1))


def unet_kwargs(unet, batch: int, context: torch.Tensor) -> dict:
    """Keyword arguments every call of ``unet`` needs besides sample and timestep."""
    kwargs = {"encoder_hidden_states": context.to(unet.dtype)}
    if unet.config.addition_embed_type == "text_time":  # the same pooled embedding and size ids for every row
        g = torch.Generator().manual_seed(7)
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, CROSS_DIM, generator=g).to(context.device, unet.dtype).expand(batch, -1),
            "time_ids": torch.randn(1, 6, generator=g).to(context.device, unet.dtype).expand(batch, -1)}
    return kwargs


def contexts(batch: int = 1, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, TEXT_TOKENS, CROSS_DIM, generator=g),
            torch.randn(batch, TEXT_TOKENS, CROSS_DIM, generator=g))


@torch.no_grad()
def sample(unet, scheduler_cls=DDIMScheduler, steps: int = 20, cfg: str = "batched", seed: int = 0,
           batch: int = 1, guidance: float = 4.0, size: int | None = None, device="cpu") -> torch.Tensor:
    """A diffusers-style sampling loop. ``cfg``: "batched" (one doubled call), "separate" (two calls), "none"."""
    scheduler = scheduler_cls(num_train_timesteps=1000)
    scheduler.set_timesteps(steps, device=device)
    size = size or unet.config.sample_size
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, size, size, generator=g).to(device, unet.dtype) * scheduler.init_noise_sigma
    cond, uncond = (c.to(device) for c in contexts(batch))
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(latents, t)
        if cfg == "batched":
            eps_u, eps_c = unet(torch.cat([x, x]), t, **unet_kwargs(unet, 2 * batch, torch.cat([uncond, cond]))
                                ).sample.chunk(2)
        elif cfg == "separate":
            eps_c = unet(x, t, **unet_kwargs(unet, batch, cond)).sample
            eps_u = unet(x, t, **unet_kwargs(unet, batch, uncond)).sample
        else:
            eps_u = eps_c = unet(x, t, **unet_kwargs(unet, batch, cond)).sample
        eps = eps_u + guidance * (eps_c - eps_u)
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents


def patch_with_costs(model, schedule, cost, **kwargs):
    """``attnreuse.patch`` whose plans use ``cost(shape, fmt)`` instead of timing kernels."""
    handle = attnreuse.patch(model, schedule, **kwargs)
    handle.plans.cost = lambda device, dtype, backend: cost
    return handle


def random_qkv(shape, dtype=torch.float16, device="cpu", seed=0):
    """Q, K, V as a processor passes them, ``(batch, tokens, heads · head dim)``, for ``shape`` = (batch, heads,
    q tokens, kv tokens, head dim); Q and K scaled by 1.5 for peaked maps."""
    b, h, nq, nk, d = shape
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, n, h * d, generator=g) * s).to(device, dtype) for n, s in ((nq, 1.5), (nk, 1.5), (nk, 1.0))]


def probs64(q, k, heads: int, scale: float) -> torch.Tensor:
    """Attention probabilities in float64, ``(batch, heads, q tokens, kv tokens)``."""
    return (split_heads(q.double(), heads) @ split_heads(k.double(), heads).transpose(-1, -2) * scale).softmax(-1)


def out64(probs, v, heads: int) -> torch.Tensor:
    """``probs · V`` in float64, heads merged back: ``(batch, q tokens, heads · head dim)``."""
    return merge_heads(probs @ split_heads(v.double(), heads))


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖got − ref‖ / ‖ref‖`` in float64."""
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


class IteratingPipeline(DiffusionPipeline):
    """An older pipeline style: ``for t in self.progress_bar(timesteps)``, one UNet call per step."""

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, steps: int, stop_after: int | None = None):
        self.scheduler.set_timesteps(steps)
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        cond, _ = contexts(1)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            if i == stop_after:
                break
            x = self.scheduler.step(self.unet(x, t, encoder_hidden_states=cond).sample, t, x).prev_sample
        return x


def cli_error(argv: list[str], capsys) -> str:
    """The message ``python -m attnreuse *argv`` exits with: one line, status 2, naming the command and a fix."""
    from attnreuse.__main__ import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"attnreuse {argv[0]}: ") and " — " in err, err
    return err
