"""The patching layer on the CPU path: semantics, step tracking, exact reversal."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

import attnreuse
from attnreuse.processor import MapReuseProcessor
from attnreuse.kernels import storage_nbytes
from tests.helpers import IteratingPipeline, contexts, make_unet, sample, unet_kwargs


def attention_layers(unet):
    return {n: m for n, m in unet.named_modules() if isinstance(m, Attention)}


def count_calls(modules):
    """Forward-hook counters: ``counts[name]`` grows by one per call of ``modules[name]``."""
    counts = dict.fromkeys(modules, 0)
    hooks = []
    for name, m in modules.items():
        def hook(mod, inp, out, name=name):
            counts[name] += 1
        hooks.append(m.register_forward_hook(hook))
    return counts, hooks


def test_all_compute_schedule_is_bit_identical(arch, scheduler_cls):
    unet = make_unet(arch)
    ref = sample(unet, scheduler_cls)
    with attnreuse.patch(unet, "1" * 20, cache_dtype="fp8"):
        out = sample(unet, scheduler_cls)
    assert torch.equal(out, ref)


def test_reuse_sampling_end_to_end(arch, scheduler_cls):
    """20 steps of HURRY-10 with separate CFG calls: q/k projections run on compute steps only."""
    unet = make_unet(arch)
    ref = sample(unet, scheduler_cls, cfg="separate")
    layers = attention_layers(unet)
    counts_q, hooks = count_calls({n: m.to_q for n, m in layers.items()})
    counts_v, hooks_v = count_calls({n: m.to_v for n, m in layers.items()})
    with attnreuse.patch(unet, attnreuse.hurry(20, 10)) as handle:
        out = sample(unet, scheduler_cls, cfg="separate")
        assert handle.current is None and handle.cache_bytes == 0  # ended with its last step's calls
        assert handle.peak_cache_bytes > 0
    for h in hooks + hooks_v:
        h.remove()
    assert set(counts_q.values()) == {10 * 2}  # 10 computing steps x 2 branches
    assert set(counts_v.values()) == {20 * 2}
    assert torch.isfinite(out).all()
    assert not torch.equal(out, ref)  # reuse really happened
    assert 0.5 < (out.norm() / ref.norm()).item() < 2  # a sample, not a blow-up


def test_reuse_step_equals_cached_map_times_current_values():
    unet = make_unet("sd15")
    layer_names = [n for n, m in attention_layers(unet).items()]
    name = layer_names[0]  # a self-attention layer at the highest resolution
    attn = attention_layers(unet)[name]
    seen = {"q": [], "k": [], "v": [], "pre_out": []}
    hooks = [getattr(attn, f"to_{p}").register_forward_hook(lambda m, i, o, p=p: seen[p].append(o.detach()))
             for p in "qkv"]
    hooks.append(attn.to_out[0].register_forward_pre_hook(lambda m, i: seen["pre_out"].append(i[0].detach())))
    with attnreuse.patch(unet, "1100", cache_dtype="fp32"):
        sample(unet, steps=4, cfg="batched")
    for h in hooks:
        h.remove()
    assert len(seen["q"]) == 2 and len(seen["v"]) == 4
    heads = attn.heads
    split = lambda x: x.double().view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    probs = (split(seen["q"][1]) @ split(seen["k"][1]).transpose(-1, -2) * attn.scale).softmax(-1)
    for step in (2, 3):  # both reuse steps read the map of step 2 (index 1)
        expected = (probs @ split(seen["v"][step])).transpose(1, 2).flatten(2)
        got = seen["pre_out"][step].double()
        assert ((got - expected).norm() / expected.norm()).item() < 1e-5


def test_separate_cfg_equals_batched_cfg(arch):
    unet = make_unet(arch).double()  # float64: batching may only change rounding
    with attnreuse.patch(unet, attnreuse.hurry(10, 5)):
        batched = sample(unet, steps=10, cfg="batched")
        separate = sample(unet, steps=10, cfg="separate")
    assert ((batched - separate).norm() / batched.norm()).item() < 1e-9


def test_unpatch_restores_exact_processors_and_outputs():
    unet = make_unet("sdxl")
    originals = {n: m.processor for n, m in attention_layers(unet).items()}
    ref = sample(unet, steps=6)
    handle = attnreuse.patch(unet, "111000")
    assert all(isinstance(m.processor, MapReuseProcessor) for m in attention_layers(unet).values())
    sample(unet, steps=6)
    attnreuse.unpatch(unet)
    assert all(m.processor is originals[n] for n, m in attention_layers(unet).items())
    assert not unet._forward_pre_hooks and not unet._forward_hooks
    assert torch.equal(sample(unet, steps=6), ref)
    handle.remove()  # a second removal is a no-op
    attnreuse.unpatch(unet)


def test_patching_twice_replaces_the_first_patch():
    unet = make_unet("sd15")
    originals = {n: m.processor for n, m in attention_layers(unet).items()}
    attnreuse.patch(unet, "1100")
    second = attnreuse.patch(unet, "1110", layers="cross")
    for n, m in attention_layers(unet).items():
        if m.is_cross_attention:
            assert m.processor.original is originals[n]
        else:
            assert m.processor is originals[n]
    assert len(unet._forward_pre_hooks) == 1
    second.remove()
    assert all(m.processor is originals[n] for n, m in attention_layers(unet).items())


def test_repeated_generations_are_identical():
    unet = make_unet("sd2")
    with attnreuse.patch(unet, attnreuse.hurry(8, 4)):
        first = sample(unet, steps=8, seed=3)
        second = sample(unet, steps=8, seed=3)
    assert torch.equal(first, second)


@pytest.mark.parametrize("layers,expect", [("self", False), ("cross", True)])
def test_layer_selection(layers, expect):
    unet = make_unet("sd15")
    with attnreuse.patch(unet, "10", layers=layers) as handle:
        for name, m in attention_layers(unet).items():
            patched = isinstance(m.processor, MapReuseProcessor)
            assert patched == (m.is_cross_attention == expect)
            assert (name in handle.layers) == patched
    up_only = lambda name: name.startswith("up_blocks")  # noqa: E731
    with attnreuse.patch(unet, "10", layers=up_only) as handle:
        assert handle.layers and all(n.startswith("up_blocks") for n in handle.layers)


@pytest.mark.parametrize("cache_dtype,elem", [(None, 4), ("fp16", 2), ("bf16", 2), ("fp8", 1)])
def test_cache_bytes_reported(cache_dtype, elem):
    unet = make_unet("sd15")
    layers = attention_layers(unet)
    with attnreuse.patch(unet, "10", cache_dtype=cache_dtype) as handle:
        gen = handle.generation(2)
        sample(unet, steps=1, cfg="batched")  # step 0 captures
        gen.step(1)  # the reuse step holds the maps of step 0
        tokens = {}
        for n, m in layers.items():
            size = 8 if n.startswith(("down_blocks.0", "up_blocks.1")) else 4
            tokens[n] = (size * size, 7 if m.is_cross_attention else size * size)
        dtype = handle.current.cache.maps[(n, 0)].dtype
        expected = sum(storage_nbytes(2, layers[n].heads, q, k, dtype) for n, (q, k) in tokens.items())
        assert handle.cache_bytes == expected == handle.peak_cache_bytes
        assert dtype.itemsize == elem
        handle.reset()
        assert handle.cache_bytes == 0 and handle.step == -1 and handle.current is None
        assert handle.peak_cache_bytes == expected


def test_compressed_maps_close_to_fp32_maps():
    """Five reuse steps through a random UNet (measured: fp8 0.04, fp4 0.09); per-map bounds are in
    test_reference.py."""
    unet = make_unet("sd15")
    outs = {}
    for dtype in ("fp32", "fp16", "fp8", "fp4"):
        with attnreuse.patch(unet, attnreuse.hurry(10, 5), cache_dtype=dtype):
            outs[dtype] = sample(unet, steps=10)
    for dtype, bound in (("fp16", 1e-3), ("fp8", 1e-1), ("fp4", 2e-1)):
        rel = ((outs[dtype] - outs["fp32"]).norm() / outs["fp32"].norm()).item()
        assert rel < bound, (dtype, rel)
    assert not torch.equal(outs["fp8"], outs["fp32"]) and not torch.equal(outs["fp4"], outs["fp8"])


def test_resolution_or_batch_change_starts_a_new_generation():
    unet = make_unet("sd15")
    layers = attention_layers(unet)
    counts, hooks = count_calls({n: m.to_q for n, m in layers.items()})
    with attnreuse.patch(unet, "1100") as handle:
        cond, _ = contexts(1)
        for t in (900, 700):
            unet(torch.randn(1, 4, 8, 8), t, **unet_kwargs(unet, 1, cond))
        assert handle.step == 1
        assert handle.step == 1 and handle.cache_bytes > 0
        # next timestep at another resolution: must compute (new generation), never apply the 8x8 maps
        unet(torch.randn(1, 4, 16, 16), 500, **unet_kwargs(unet, 1, cond))
        assert handle.step == 0
        unet(torch.randn(2, 4, 16, 16), 300, **unet_kwargs(unet, 2, torch.cat([cond, cond])))
        assert handle.step == 0
        # a rising timestep restarts too
        unet(torch.randn(2, 4, 16, 16), 999, **unet_kwargs(unet, 2, torch.cat([cond, cond])))
        assert handle.step == 0
    for h in hooks:
        h.remove()
    assert set(counts.values()) == {5}


def test_pipeline_calls_start_from_empty_state():
    unet = make_unet("sd15")
    pipe = IteratingPipeline(unet, DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    full = pipe(4)
    with attnreuse.patch(pipe, "1100") as handle:
        assert type(pipe) is IteratingPipeline
        pipe(4, stop_after=1)  # interrupted generation, the next one starts at the same timestep
        reused = pipe(4)
        assert handle.cache_bytes == 0  # dropped when the call ended
        assert torch.equal(reused, pipe(4))
    assert type(pipe) is IteratingPipeline and "progress_bar" not in vars(pipe)
    assert torch.equal(pipe(4), full)
    assert not torch.equal(reused, full)


# ---- bad input ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule,match", [
    ("", "empty"), ([], "empty"), ("0111", "first step"), ([0, 1], "first step"), ("1102", "0 .reuse. or 1"),
    ([1, 0.5], "0 .reuse. or 1"), ([1, True], "0 .reuse. or 1"), (5, "0/1 sequence"),
])
def test_bad_schedules(schedule, match):
    with pytest.raises((ValueError, TypeError), match=match):
        attnreuse.patch(make_unet("sd15"), schedule)


def test_hurry_validation():
    assert attnreuse.hurry(5, 2) == (1, 1, 1, 0, 0)
    for steps, reuse in ((5, 5), (5, -1), (0, 0), (5.0, 1)):
        with pytest.raises(ValueError, match="0 <= reuse < steps"):
            attnreuse.hurry(steps, reuse)


def test_too_many_steps_names_both_numbers():
    unet = make_unet("sd15")
    with attnreuse.patch(unet, attnreuse.hurry(5, 2)):
        with pytest.raises(ValueError, match="reached step 6 but the schedule has 5 steps"):
            sample(unet, steps=6)


def test_bad_arguments():
    unet = make_unet("sd15")
    with pytest.raises(TypeError, match="no diffusers Attention layers"):
        attnreuse.patch(torch.nn.Linear(2, 2), "10")
    with pytest.raises(TypeError, match=r"pipeline with one \(.unet / .transformer\)"):
        attnreuse.patch(object(), "10")
    with pytest.raises(ValueError, match="cache_dtype='int8'"):
        attnreuse.patch(unet, "10", cache_dtype="int8")
    with pytest.raises(ValueError, match="layers='mlp'"):
        attnreuse.patch(unet, "10", layers="mlp")
    with pytest.raises(ValueError, match="selects none"):
        attnreuse.patch(unet, "10", layers=lambda name: False)
    with pytest.raises(ValueError, match="max_cache_bytes='1GB': pass a number of bytes"):
        attnreuse.patch(unet, "10", max_cache_bytes="1GB")
    with pytest.raises(ValueError, match="backend='cuda'"):
        attnreuse.patch(unet, "10", backend="cuda")
    with pytest.raises(ValueError, match="needs CUDA"):
        with attnreuse.patch(unet, "10", backend="triton"):
            sample(unet, steps=2)
    with pytest.raises(ValueError, match="different timesteps"):
        with attnreuse.patch(unet, "10"):
            cond, _ = contexts(2)
            unet(torch.randn(2, 4, 8, 8), torch.tensor([900, 800]), **unet_kwargs(unet, 2, cond))


def test_unsupported_layers_rejected_before_anything_changes():
    unet = make_unet("sd15")

    class Custom(AttnProcessor2_0):
        pass

    name = next(n for n, m in attention_layers(unet).items() if m.is_cross_attention)
    attention_layers(unet)[name].set_processor(type("MyProcessor", (), {"__call__": AttnProcessor.__call__})())
    before = {n: m.processor for n, m in attention_layers(unet).items()}
    with pytest.raises(TypeError, match=r"processor MyProcessor is not supported; call unet.set_attn_processor"):
        attnreuse.patch(unet, "10")
    assert {n: m.processor for n, m in attention_layers(unet).items()} == before
    assert not unet._forward_pre_hooks
    with attnreuse.patch(unet, "10", layers="self"):  # leaving the layer out works
        sample(unet, steps=2)
    attention_layers(unet)[name].set_processor(Custom())  # subclasses of supported processors are fine
    with attnreuse.patch(unet, "10"):
        sample(unet, steps=2)


@pytest.mark.parametrize("fmt", ["fp16", "fp8"])
def test_a_unet_on_the_kernel_path_matches_the_pytorch_path(monkeypatch, fmt):
    """The patched UNet's attention through the Triton kernels (Triton's interpreter on the CPU, fp32 activations let
    in for it) samples what the PyTorch path samples, within the map format's rounding; each map is one buffer."""
    from attnreuse.kernels import api, launchers
    monkeypatch.setattr(api, "KERNEL_DEVICES", {"cuda", "cpu"})
    monkeypatch.setitem(api.VALUE_DTYPES, "fp32", torch.float32)
    monkeypatch.setattr(api, "backend_available", lambda: True)
    monkeypatch.setattr(api, "_ROUTES", {})
    monkeypatch.setattr(launchers, "_EAGER", {})
    unet = make_unet("sd15")
    outs, maps = {}, []
    for backend in ("torch", "auto"):
        with attnreuse.patch(unet, "110101", cache_dtype=fmt, backend=backend) as handle:
            hook = unet.register_forward_pre_hook(lambda *a: maps.extend(handle.current.cache.maps.values()))
            outs[backend] = sample(unet, steps=6)
            hook.remove()
    assert len(launchers._EAGER) > 0 and all(m.layout is not None for m in maps[len(maps) // 2:])  # the kernels'
    err = ((outs["auto"] - outs["torch"]).norm() / outs["torch"].norm()).item()
    assert err < {"fp16": 1e-2, "fp8": 5e-2}[fmt]  # (fp32 activations run fp16 dots); reusing itself moves it 0.59


def test_a_reuse_step_at_another_resolution_with_the_same_token_count_is_refused():
    """8x16 latents captured, 16x8 reused: every attention layer sees the same token counts, yet the maps belong to
    another raster; a clear error, not a silently wrong image."""
    unet = make_unet("sd15")
    g = torch.Generator().manual_seed(0)
    context = torch.randn(1, 7, unet.config.cross_attention_dim, generator=g)
    wide = torch.randn(1, 4, 8, 16, generator=g)
    with attnreuse.patch(unet, "100", cache_dtype="fp16") as handle, torch.no_grad():
        with handle.generation(3) as gen:
            gen.step(0)
            unet(wide, 900, encoder_hidden_states=context)
            gen.step(1)
            unet(wide, 800, encoder_hidden_states=context)  # the same shape reuses
            gen.step(2)
            with pytest.raises(RuntimeError, match=r"shape \(1, 4, 16, 8\).*captured from one of shape \(1, 4, 8, 16\)"):
                unet(wide.transpose(2, 3).contiguous(), 700, encoder_hidden_states=context)
