"""DiT models (PixArt-style transformers whose attention runs diffusers' AttnProcessor2_0), by pipeline and by
hand, called positionally or by keyword; joint-attention transformers (SD3) are rejected before any change."""
from __future__ import annotations

import pytest
import torch
from diffusers import (DDIMScheduler, FluxTransformer2DModel, PixArtAlphaPipeline, PixArtTransformer2DModel,
                       SD3Transformer2DModel)
from diffusers.models.attention_processor import Attention

import attnreuse
from tests.helpers import patch_with_costs, rel_err, tiny_vae, to_q_calls

CAPTION = 32


def make_transformer() -> PixArtTransformer2DModel:
    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=CAPTION,
        in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6).eval()


def make_pipe() -> PixArtAlphaPipeline:
    vae = tiny_vae()
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=make_transformer(),
                               scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, steps=6) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    emb, neg = torch.randn(1, 7, CAPTION, generator=g), torch.randn(1, 7, CAPTION, generator=g)
    mask = torch.ones(1, 7)
    mask[0, 5:] = 0  # padded caption tokens: the cross-attention mask PixArt passes
    return pipe(negative_prompt=None, prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt_embeds=neg,
                negative_prompt_attention_mask=mask, num_inference_steps=steps, height=8, width=8,
                output_type="latent", use_resolution_binning=False, generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("cache_dtype", [None, "fp8"])
def test_pixart_pipeline(cache_dtype):
    pipe = make_pipe()
    reference = run(pipe)
    count, _ = to_q_calls(pipe.transformer)
    with attnreuse.patch(pipe, "111111", cache_dtype=cache_dtype):
        assert torch.equal(run(pipe), reference)  # all-compute: exactly the unpatched output
    count[0] = 0
    with attnreuse.patch(pipe, attnreuse.hurry(6, 3), cache_dtype=cache_dtype) as handle:
        out = run(pipe)
        assert handle.peak_cache_bytes > 0 and count[0] == 3  # to_q on the 3 computing steps only (CFG batched)
    assert rel_err(out, reference) < 0.5 and not torch.equal(out, reference)
    assert torch.equal(run(pipe), reference)  # unpatched exactly


@pytest.mark.parametrize("by_keyword", [False, True])
def test_transformer_called_by_hand_positionally_or_by_keyword(by_keyword):
    model = make_transformer()
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, CAPTION, generator=g)
    cond = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}

    def call(t):
        if by_keyword:
            return model(hidden_states=x, encoder_hidden_states=ctx, timestep=t, **cond).sample
        return model(x, ctx, t, **cond).sample

    timesteps = [torch.tensor([t, t]) for t in (900, 600, 300)]
    reference = [call(t) for t in timesteps]
    with attnreuse.patch(model, "110", cache_dtype="fp32") as handle:
        with handle.generation(3) as gen:
            outs = []
            for i, t in enumerate(timesteps):
                gen.step(i)
                outs.append(call(t))
        # step 0 computes, step 1 captures (the same attention, computed with its map), step 2 reuses
        assert torch.equal(outs[0], reference[0]) and rel_err(outs[1], reference[1]) < 1e-5
        assert rel_err(outs[2], reference[2]) > 1e-3 and handle.peak_cache_bytes > 0
        outs = [call(t) for t in timesteps]  # the step guess from the calls' timesteps
        assert rel_err(outs[1], reference[1]) < 1e-5 and rel_err(outs[2], reference[2]) > 1e-3


def test_budgeted_plan_places_dit_layers():
    from attnreuse.planner import LayerCost
    pipe = make_pipe()
    with patch_with_costs(pipe, attnreuse.hurry(6, 3), lambda shape, fmt: LayerCost(1.0, 1.1, 0.5),
                          max_cache_bytes=1e9) as handle:
        run(pipe)
        assert handle.plan and all(p.reuse for p in handle.plan)
        shapes = {p.name: p.bytes for p in handle.plan}
        assert shapes["transformer_blocks.0.attn1"] > shapes["transformer_blocks.0.attn2"] > 0  # 16 vs 7 keys


def test_joint_attention_transformer_rejected_before_any_change():
    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                  pooled_projection_dim=8, out_channels=4)
    before = {n: m.processor for n, m in model.named_modules() if isinstance(m, Attention)}
    with pytest.raises(TypeError, match="joint text-image attention.*not supported.*PixArt"):
        attnreuse.patch(model, "10")
    assert {n: m.processor for n, m in model.named_modules() if isinstance(m, Attention)} == before
    assert not model._forward_pre_hooks
    flux = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                  axes_dims_rope=(2, 2, 4))
    with pytest.raises(TypeError, match="SD3 and Flux are not supported"):
        attnreuse.patch(flux, "10")
    assert not flux._forward_pre_hooks


def test_class_conditional_dit_plans_without_text():
    """A class-conditional DiT (no encoder_hidden_states) gets a plan where there are costs, as on a GPU."""
    from diffusers import DiTPipeline, Transformer2DModel
    from attnreuse.planner import LayerCost
    torch.manual_seed(0)
    transformer = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                     sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
                                     num_layers=2).eval()
    pipe = DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    unpatched = pipe(class_labels=[1], num_inference_steps=6, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
    with patch_with_costs(pipe, attnreuse.hurry(6, 3), lambda s, fmt: LayerCost(1.0, 1.2, 0.5)) as handle:
        out = pipe(class_labels=[1], num_inference_steps=6, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
        assert handle.plan and all(p.reuse for p in handle.plan)
    assert not (out == unpatched).all()
