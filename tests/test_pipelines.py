"""Patched diffusers pipelines (tiny, built offline): the sampler's progress bar drives the clock."""
from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
from diffusers import (DDIMScheduler, HeunDiscreteScheduler, StableDiffusionImg2ImgPipeline,
                       StableDiffusionPipeline)
from diffusers.models.attention_processor import Attention

import attnreuse
from attnreuse.planner import layer_shapes
from tests.helpers import CROSS_DIM, SCHEDULERS, TEXT_TOKENS, IteratingPipeline, contexts, make_unet, tiny_vae, to_q_calls

def make_pipe(scheduler_cls=DDIMScheduler, unet=None) -> StableDiffusionPipeline:
    """SD-style txt2img pipeline: tiny VAE (scale factor 1: 8x8 pixels = 8x8 latents), the helpers' UNet, no
    text encoder (prompts come as embeddings)."""
    torch.manual_seed(0)
    vae = tiny_vae()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet or make_unet("sd15"),
                                   scheduler=scheduler_cls(num_train_timesteps=1000), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def img2img(pipe) -> StableDiffusionImg2ImgPipeline:
    """An img2img pipeline sharing ``pipe``'s UNet, with a scheduler of its own."""
    parts = dict(pipe.components, scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config))
    out = StableDiffusionImg2ImgPipeline(**parts)
    out.set_progress_bar_config(disable=True)
    return out


def run(pipe, steps=6, seed=0, **kwargs) -> torch.Tensor:
    cond, uncond = contexts(1)
    if isinstance(pipe, StableDiffusionImg2ImgPipeline):
        kwargs.setdefault("image", torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1)
    else:
        kwargs.update(height=8, width=8)
    return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps, output_type="latent",
                generator=torch.Generator().manual_seed(seed), **kwargs).images


def cancel_at(step):
    def callback(pipe, i, t, kwargs):
        if i == step:
            pipe._interrupt = True
        return kwargs
    return callback


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_schedulers_all_compute_exact_and_hurry_reuses(name):
    """One schedule entry per progress step, whatever the scheduler's evaluations per step."""
    scheduler_cls, evals = SCHEDULERS[name]  # evals: UNet calls per step (the last step: 1)
    pipe = make_pipe(scheduler_cls)
    ref = run(pipe, steps=6)
    with attnreuse.patch(pipe, "111111", cache_dtype="fp8") as handle:
        assert torch.equal(run(pipe, steps=6), ref)
        count, hook = to_q_calls(pipe.unet)
    with attnreuse.patch(pipe, attnreuse.hurry(6, 3)) as handle:
        out = run(pipe, steps=6)
        assert handle.current is None and handle.cache_bytes == 0 and handle.peak_cache_bytes > 0
    hook.remove()
    assert count[0] == 3 * evals  # q projected on the 3 computing steps only
    assert torch.isfinite(out).all() and not torch.equal(out, ref)


def test_img2img_strength_resolves_against_the_steps_it_runs():
    pipe = img2img(make_pipe())
    count, hook = to_q_calls(pipe.unet)
    with attnreuse.patch(pipe, attnreuse.hurry(20, 10)):  # strength 0.5 of 20 steps runs 10
        with pytest.raises(ValueError, match=r"runs 10 sampling steps but the schedule has 20.*hurry\(10, 5\)"):
            run(pipe, steps=20, strength=0.5)
    assert count[0] == 0  # refused before the first UNet call
    with attnreuse.patch(pipe, attnreuse.hurry_fraction(0.5)) as handle:
        fraction = run(pipe, steps=20, strength=0.5)
        assert handle.current is None
    assert count[0] == 5
    with attnreuse.patch(pipe, attnreuse.hurry(10, 5)):
        assert torch.equal(run(pipe, steps=20, strength=0.5), fraction)
    hook.remove()


def test_fewer_steps_than_a_fixed_schedule_and_length_free_schedules():
    pipe = make_pipe()
    with attnreuse.patch(pipe, attnreuse.hurry(20, 10)):
        with pytest.raises(ValueError, match="runs 10 sampling steps but the schedule has 20"):
            run(pipe, steps=10)
    phast = attnreuse.rescaled("11111111010001000000")
    count, hook = to_q_calls(pipe.unet)
    with attnreuse.patch(pipe, phast):
        run(pipe, steps=10)
        assert count[0] == phast.resolve(10).count(1) and 0 < count[0] < 10
        count[0] = 0
        run(pipe, steps=20)
        assert count[0] == 10
    hook.remove()


def test_cancelled_generation_leaves_nothing_behind():
    """Cancel after step 0, then another seed: equal to a freshly patched model."""
    pipe = make_pipe()
    fresh = make_pipe()
    with attnreuse.patch(fresh, attnreuse.hurry(6, 3)):
        expected = run(fresh, steps=6, seed=1)
    def boom(pipe, i, t, kwargs):
        if i == 4:
            raise KeyError("boom")
        return kwargs

    with attnreuse.patch(pipe, attnreuse.hurry(6, 3)) as handle:
        run(pipe, steps=6, seed=0, callback_on_step_end=cancel_at(0))
        assert handle.current is None and handle.cache_bytes == 0
        assert torch.equal(run(pipe, steps=6, seed=1), expected)
        with pytest.raises(KeyError, match="boom"):  # fails on a reuse step, maps held
            run(pipe, steps=6, seed=0, callback_on_step_end=boom)
        assert handle.current is None and handle.cache_bytes == 0
        assert torch.equal(run(pipe, steps=6, seed=1), expected)


def test_iterated_progress_bar_drives_the_clock():
    pipe = IteratingPipeline(make_unet("sd15"), DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    with attnreuse.patch(pipe, attnreuse.hurry_fraction(0.5)) as handle:
        full = pipe(6)
        pipe(6, stop_after=4)  # the loop breaks on a reuse step: the generation ends with it
        assert handle.current is None and handle.cache_bytes == 0
        assert torch.equal(pipe(6), full)
    with attnreuse.patch(pipe.unet, attnreuse.hurry(6, 3)):  # the UNet alone: the timestep guess
        assert torch.equal(pipe(6), full)


def test_cancel_txt2img_at_step_11_then_img2img_on_the_same_unet():
    pipe = make_pipe()
    i2i = img2img(pipe)
    with attnreuse.patch(i2i, attnreuse.hurry_fraction(0.5)):
        expected = run(i2i, steps=20, strength=0.5)
    with attnreuse.patch(pipe, attnreuse.hurry_fraction(0.5)) as handle:
        handle.attach(i2i)
        run(pipe, steps=20, callback_on_step_end=cancel_at(11))
        assert torch.equal(run(i2i, steps=20, strength=0.5), expected)
    assert "progress_bar" not in i2i.__dict__  # unpatching detaches every pipeline


def test_two_threads_sharing_one_patched_unet_match_sequential_runs():
    pipes = [make_pipe()]
    pipes.append(make_pipe(unet=pipes[0].unet))
    jobs = [(0, 6, 0), (1, 8, 1), (0, 6, 2), (1, 8, 3)]  # (pipeline, steps, seed)
    with attnreuse.patch(pipes[0], attnreuse.hurry_fraction(0.5)) as handle:
        handle.attach(pipes[1])
        sequential = [run(pipes[p], steps=s, seed=seed) for p, s, seed in jobs]
        results = {}
        barrier = threading.Barrier(2)

        def worker(p):
            barrier.wait()
            for j, (q, s, seed) in enumerate(jobs):
                if q == p:
                    results[j] = run(pipes[p], steps=s, seed=seed)
        threads = [threading.Thread(target=worker, args=(p,)) for p in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(torch.equal(results[j], sequential[j]) for j in range(len(jobs)))


def test_failed_patch_keeps_the_earlier_patch():
    pipe = make_pipe()
    unet = pipe.unet
    handle = attnreuse.patch(pipe, attnreuse.hurry(6, 3), layers="self")
    before = ({n: m.processor for n, m in unet.named_modules() if isinstance(m, Attention)},
              dict(unet._forward_pre_hooks), dict(unet._forward_hooks), pipe.__dict__["progress_bar"])
    expected = run(pipe)
    cross = next(m for n, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention)
    original = cross.processor
    cross.processor = type("MyProcessor", (), {"__call__": original.__call__})()  # unsupported
    with pytest.raises(TypeError, match="processor MyProcessor is not supported"):
        attnreuse.patch(pipe, "10")
    cross.processor = original
    with pytest.raises(ValueError, match="selects none"):
        attnreuse.patch(unet, "10", layers=lambda name: False)
    after = ({n: m.processor for n, m in unet.named_modules() if isinstance(m, Attention)},
             dict(unet._forward_pre_hooks), dict(unet._forward_hooks), pipe.__dict__["progress_bar"])
    assert after == before and unet._attnreuse_handle is handle
    assert torch.equal(run(pipe), expected)
    second = attnreuse.patch(pipe, "111000")  # patching again still replaces
    assert unet._attnreuse_handle is second and len(unet._forward_pre_hooks) == 1
    second.remove()
    assert "progress_bar" not in pipe.__dict__


def test_patched_pipeline_pickles_deep_copies_and_saves(tmp_path):
    pipe = make_pipe()
    attnreuse.patch(pipe, attnreuse.hurry(6, 3), layers=lambda name: "attn1" in name)
    expected = run(pipe)
    for clone in (pickle.loads(pickle.dumps(pipe)), copy.deepcopy(pipe)):
        assert type(clone) is StableDiffusionPipeline
        handle = clone.unet._attnreuse_handle
        assert handle is not pipe.unet._attnreuse_handle and handle.layers == pipe.unet._attnreuse_handle.layers
        assert torch.equal(run(clone), expected)
        attnreuse.unpatch(clone)  # the clone unpatches on its own
        assert "progress_bar" not in clone.__dict__
    assert pipe.unet._attnreuse_handle.current is None
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "unet" / "config.json").exists()
    assert torch.equal(run(pipe), expected)


def test_compiled_unet_one_graph_per_step_kind():
    """fullgraph=True: no graph break, one compilation per step kind (compute, capture, reuse)."""
    pipe = make_pipe()
    with attnreuse.patch(pipe, attnreuse.hurry(20, 10)):
        eager = run(pipe, steps=20)
        compiles = []

        def backend(gm, example_inputs):
            compiles.append(gm)
            return gm.forward

        torch._dynamo.reset()
        unet = pipe.unet
        pipe.unet = torch.compile(unet, fullgraph=True, backend=backend)
        try:
            first = run(pipe, steps=20)
            assert len(compiles) == 3  # compute, capture, reuse
            second = run(pipe, steps=20)  # a new generation object: no recompilation
            assert len(compiles) == 3
        finally:
            pipe.unet = unet
            torch._dynamo.reset()
    assert torch.allclose(first, eager, rtol=1e-4, atol=1e-5) and torch.equal(first, second)


@pytest.mark.parametrize("first_layer_reuses", [True, False])
def test_compiled_unet_follows_a_plan_whatever_its_first_layer_does(first_layer_reuses):
    """A plan in which the first patched layer computes still compiles one graph per step kind (torch.compile once
    kept a single graph for every kind then: nothing was ever reused, silently)."""
    from attnreuse.planner import LayerCost
    pipe = make_pipe()
    unpatched = run(pipe, steps=6)
    first = next(n for n, m in pipe.unet.named_modules() if isinstance(m, Attention))
    with attnreuse.patch(pipe, attnreuse.hurry(6, 3)) as handle:
        paying, not_paying = LayerCost(1.0, 1.2, 0.5), LayerCost(1.0, 1.5, 2.0)
        shape = layer_shapes(pipe.unet, [first], (2, 4, 8, 8), TEXT_TOKENS)[first]
        handle.plans.cost = lambda *a: lambda s, f: paying if (s == shape) == first_layer_reuses else not_paying
        plan = handle.prepare(torch.empty(2, 4, 8, 8), torch.empty(2, TEXT_TOKENS, CROSS_DIM), 6)
        assert plan[0].name == first and plan[0].reuse == first_layer_reuses and any(p.reuse for p in plan)
        eager = run(pipe, steps=6)
        torch._dynamo.reset()
        unet = pipe.unet
        pipe.unet = torch.compile(unet, fullgraph=True, backend="eager")
        try:
            compiled = run(pipe, steps=6)
        finally:
            pipe.unet = unet
            torch._dynamo.reset()
    assert not torch.equal(eager, unpatched)
    assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-5)


def test_patching_through_a_second_pipeline_keeps_the_first_counting_steps():
    first = make_pipe(HeunDiscreteScheduler)
    second = StableDiffusionPipeline.from_pipe(first)
    with attnreuse.patch(first, attnreuse.hurry_fraction(0.5)):
        expected = run(first)
    attnreuse.patch(first, "111111")
    handle = attnreuse.patch(second, attnreuse.hurry_fraction(0.5))  # replaces the patch made through `first`
    assert torch.equal(run(first), expected)
    handle.remove()
    assert "progress_bar" not in first.__dict__ and "progress_bar" not in second.__dict__
