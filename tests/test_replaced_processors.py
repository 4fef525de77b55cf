"""Reuse never stops silently: processors replaced under a live patch, IP-Adapters, and each rejection's advice
followed to a working patch. Every error comes before the model changes."""
from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

import attnreuse
from tests.helpers import CROSS_DIM, make_unet, sample
from tests.test_pipelines import make_pipe, run

IMAGE_EMBED_DIM = 8


def processors(unet) -> dict:
    return {n: m.processor for n, m in unet.named_modules() if isinstance(m, Attention)}


def ip_adapter_state_dict(unet) -> dict:
    """An IP-Adapter for ``unet`` (random weights): image projection to 4 tokens, and to_k_ip / to_v_ip for every
    cross-attention layer, keyed as published IP-Adapter checkpoints are."""
    g = torch.Generator().manual_seed(0)
    image_proj = {"proj.weight": torch.randn(4 * CROSS_DIM, IMAGE_EMBED_DIM, generator=g) * 0.1,
                  "proj.bias": torch.zeros(4 * CROSS_DIM), "norm.weight": torch.ones(CROSS_DIM),
                  "norm.bias": torch.zeros(CROSS_DIM)}
    ip, key_id = {}, 1
    for name, m in unet.named_modules():
        if isinstance(m, Attention) and m.is_cross_attention:
            hidden = m.to_q.out_features
            ip[f"{key_id}.to_k_ip.weight"] = torch.randn(hidden, CROSS_DIM, generator=g) * 0.1
            ip[f"{key_id}.to_v_ip.weight"] = torch.randn(hidden, CROSS_DIM, generator=g) * 0.1
            key_id += 2
    return {"image_proj": image_proj, "ip_adapter": ip}


def run_ip(pipe, steps=6):
    embeds = torch.randn(2, 1, IMAGE_EMBED_DIM, generator=torch.Generator().manual_seed(1))  # uncond, cond
    return run(pipe, steps=steps, ip_adapter_image_embeds=[embeds])


@pytest.mark.parametrize("change", ["attention_slicing", "fuse_qkv", "set_attn_processor"])
def test_processors_replaced_after_patching_raise_at_the_next_generation(change):
    pipe = make_pipe()
    reference = run(pipe)
    handle = attnreuse.patch(pipe, attnreuse.hurry(6, 3))
    if change == "attention_slicing":
        pipe.enable_attention_slicing(1)
    elif change == "fuse_qkv":
        pipe.fuse_qkv_projections()
    else:
        pipe.unet.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(RuntimeError, match=r"were replaced after patching .* call attnreuse.patch\(\.\.\.\) again"):
        run(pipe)
    if change == "fuse_qkv":  # the advice for fused projections: unfuse, then patch
        with pytest.raises(TypeError, match="unfuse_qkv_projections"):
            attnreuse.patch(pipe, attnreuse.hurry(6, 3))
        pipe.unfuse_qkv_projections()
    if change == "attention_slicing":
        pipe.disable_attention_slicing()
    with attnreuse.patch(pipe, attnreuse.hurry(6, 3)) as again:  # patching again is the fix
        out = run(pipe)
        assert again.peak_cache_bytes > 0
    assert not torch.equal(out, reference) and handle.unet is pipe.unet
    assert torch.allclose(run(pipe), reference, atol=1e-5, rtol=0)  # fused vs unfused: float rounding only


def test_unpatch_leaves_replaced_layers_alone_and_says_so():
    unet = make_unet("sd15")
    before = processors(unet)
    handle = attnreuse.patch(unet, "1100")
    name = next(iter(before))
    mine = AttnProcessor2_0()
    dict(unet.named_modules())[name].set_processor(mine)
    with pytest.warns(UserWarning, match=f"left 1 layer.* alone .*{name} runs AttnProcessor2_0"):
        handle.remove()
    after = processors(unet)
    assert after[name] is mine and all(after[n] is p for n, p in before.items() if n != name)
    assert not unet._forward_pre_hooks


def test_ip_adapter_loads_and_unloads_on_a_patched_pipeline():
    """diffusers' loaders rebuild processors as type(proc)(): on a patched UNet that gives plain attention, the
    patch says so at the next generation, and patching again with layers='self' reuses beside the adapter."""
    pipe = make_pipe()
    attnreuse.patch(pipe, attnreuse.hurry(6, 3))
    pipe.load_ip_adapter(ip_adapter_state_dict(pipe.unet), subfolder="", weight_name="", image_encoder_folder=None)
    with pytest.raises(RuntimeError, match="with IP-Adapters, layers='self'"):
        run_ip(pipe)
    with pytest.raises(TypeError, match=r"IP-Adapter.*layers='self'.*unload_ip_adapter"):
        attnreuse.patch(pipe, attnreuse.hurry(6, 3))  # the cross-attention layers now run IP-Adapter processors
    with pytest.raises(RuntimeError, match="were replaced after patching"):
        run_ip(pipe)  # the rejected patch changed nothing: the earlier one is still there, and still says so
    with pytest.warns(UserWarning, match="left 14 layer"):
        attnreuse.unpatch(pipe)  # every layer now runs the adapter's or plain attention: all left alone
    reference = run_ip(pipe)
    with attnreuse.patch(pipe, attnreuse.hurry(6, 3), layers="self") as handle:
        out = run_ip(pipe)
        assert handle.peak_cache_bytes > 0 and not torch.equal(out, reference)
        with attnreuse.patch(pipe, "111111", layers="self"):
            assert torch.equal(run_ip(pipe), reference)
    pipe.unload_ip_adapter()
    with attnreuse.patch(pipe, attnreuse.hurry(6, 3)) as handle:  # unloaded: every layer patches again
        run(pipe)
        assert handle.peak_cache_bytes > 0


def test_added_kv_layers_are_rejected_and_leaving_them_out_works():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, cross_attention_dim=CROSS_DIM, attention_head_dim=4, encoder_hid_dim=CROSS_DIM,
        down_block_types=("CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn").eval()
    added = [n for n, m in unet.named_modules() if isinstance(m, Attention) and m.added_kv_proj_dim is not None]
    assert 0 < len(added) < len(processors(unet))  # DeepFloyd IF's blocks beside SD's
    reference = sample(unet, steps=4)
    with pytest.raises(TypeError, match="added key/value projections .* leave it out with layers="):
        attnreuse.patch(unet, "1100")
    assert torch.equal(sample(unet, steps=4), reference) and not unet._forward_pre_hooks
    with attnreuse.patch(unet, "1100", layers=lambda name: name not in added) as handle:  # the advice
        assert not torch.equal(sample(unet, steps=4), reference) and handle.peak_cache_bytes > 0


def test_joint_attention_is_rejected_naming_what_is_supported():
    unet = make_unet("sd15")
    joint = type("JointAttnProcessor2_0", (AttnProcessor2_0,), {})
    name = next(iter(processors(unet)))
    dict(unet.named_modules())[name].set_processor(joint())
    before = processors(unet)
    with pytest.raises(TypeError, match="joint text-image attention.*AttnProcessor2_0 \\(UNet2DConditionModel, PixArt"):
        attnreuse.patch(unet, "10")
    assert processors(unet) == before


def test_processor_classes_still_pickle_and_copy():
    """The no-argument construction diffusers' loaders use does not get in the way of copies of a patch."""
    import copy
    import pickle
    pipe = make_pipe()
    with attnreuse.patch(pipe, attnreuse.hurry(6, 3)):
        ref = run(pipe)
        for clone in (copy.deepcopy(pipe), pickle.loads(pickle.dumps(pipe))):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert torch.equal(run(clone), ref)
