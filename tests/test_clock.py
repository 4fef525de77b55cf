"""The step clock without a pipeline: length-free schedules, the explicit generation API, the timestep guess."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

import attnreuse
from attnreuse.planner import LayerCost
from tests.helpers import contexts, make_unet, patch_with_costs, sample, unet_kwargs


@torch.no_grad()
def loop(unet, steps=6, seed=0, gen=None, stop_after=None):
    """Separate conditional / unconditional UNet calls per step; ``gen.step(i)`` when a generation is marked."""
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    cond, uncond = contexts(1)
    for i, t in enumerate(scheduler.timesteps):
        if i == stop_after:
            break
        if gen is not None:
            gen.step(i)
        eps_c = unet(x, t, **unet_kwargs(unet, 1, cond)).sample
        eps_u = unet(x, t, **unet_kwargs(unet, 1, uncond)).sample
        x = scheduler.step(eps_u + 4 * (eps_c - eps_u), t, x).prev_sample
    return x


def call(unet, x, t):
    return unet(x, t, **unet_kwargs(unet, 1, contexts(1)[0]))


def test_length_free_schedules_resolve_per_step_count():
    assert attnreuse.hurry_fraction(0.5).resolve(10) == attnreuse.hurry(10, 5)
    assert attnreuse.hurry_fraction(0.5).resolve(3) == (1, 0, 0)
    assert attnreuse.hurry_fraction(0).resolve(4) == (1, 1, 1, 1)
    with pytest.raises(ValueError, match=r"hurry_fraction\(0.1\) of 4 steps reuses no step"):
        attnreuse.hurry_fraction(0.1).resolve(4)
    with pytest.raises(ValueError, match="0 <= f < 1"):
        attnreuse.hurry_fraction(1.0)
    phast = "11111111010001000000"
    assert attnreuse.rescaled(phast).resolve(20) == attnreuse.as_schedule(phast)
    assert attnreuse.rescaled("1100").resolve(8) == (1, 1, 1, 1, 0, 0, 0, 0)
    assert attnreuse.rescaled("1100").resolve(2) == (1, 0)
    with pytest.raises(ValueError, match="rescaled to 1 steps reuses no step"):
        attnreuse.rescaled("10").resolve(1)
    with pytest.raises(ValueError, match="first step"):
        attnreuse.rescaled("0110")


def test_explicit_generation_equals_the_guess_and_ends_empty():
    unet = make_unet("sd15")
    with attnreuse.patch(unet, attnreuse.hurry(6, 3)) as handle:
        guessed = loop(unet)
        with handle.generation(6) as gen:
            marked = loop(unet, gen=gen)
            assert handle.current is gen and gen.step_index == 5 and gen.call == 1 and handle.cache_bytes > 0
        assert handle.current is None and handle.cache_bytes == 0
    assert torch.equal(marked, guessed)


def test_length_free_schedule_needs_a_known_step_count():
    unet = make_unet("sd15")
    with attnreuse.patch(unet, attnreuse.hurry_fraction(0.5)) as handle:
        with pytest.raises(ValueError, match=r"length-free.*handle.generation\(num_steps\)"):
            loop(unet)
        with handle.generation(6) as gen:
            out = loop(unet, gen=gen)
    with attnreuse.patch(unet, attnreuse.hurry(6, 3)):
        assert torch.equal(loop(unet), out)


def test_reuse_step_with_more_calls_than_the_capture_step_is_an_error():
    unet = make_unet("sd15")
    x = torch.randn(1, 4, 8, 8)
    with attnreuse.patch(unet, "10") as handle, handle.generation(2) as gen:
        call(unet, x, 900)
        gen.step(1)
        call(unet, x, 800)
        with pytest.raises(RuntimeError, match="called the UNet 2 times, but the step that captured"):
            call(unet, x, 800)
    with attnreuse.patch(unet, "10") as handle, handle.generation(2) as gen:
        call(unet, x, 900)
        gen.advance()
        call(unet, x, 800)
        gen.advance()
        with pytest.raises(RuntimeError, match="after this generation ended or ran all its 2 steps"):
            call(unet, x, 700)


def test_guess_rules():
    """Same timestep: a further call only with the very same sample object; else a new generation."""
    unet = make_unet("sd15")
    x, y = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    with attnreuse.patch(unet, "1100") as handle:
        call(unet, x, 900)
        first = handle.current
        call(unet, x, 900)
        assert handle.current is first and first.call == 1
        call(unet, x.clone(), 700)
        assert handle.current is first and first.step_index == 1
        with pytest.warns(UserWarning, match="Heun, KDPM2"):  # what a second evaluation per step looks like
            call(unet, y, 700)  # same timestep, another sample: an abandoned generation is not continued
        assert handle.current is not first and handle.step == 0 and first.kind is None
        assert not first.cache.maps


def test_guess_after_a_cancelled_generation_equals_a_fresh_patch():
    unet, fresh = make_unet("sd15"), make_unet("sd15")
    with attnreuse.patch(fresh, attnreuse.hurry(6, 3)):
        expected = loop(fresh, seed=1)
    with attnreuse.patch(unet, attnreuse.hurry(6, 3)):
        loop(unet, seed=0, stop_after=1)  # cancelled after step 0
        assert torch.equal(loop(unet, seed=1), expected)
        loop(unet, seed=0, stop_after=4)  # cancelled on a reuse step
        assert torch.equal(loop(unet, seed=1), expected)


def test_guess_is_per_thread():
    import threading

    unet = make_unet("sd15")
    with attnreuse.patch(unet, attnreuse.hurry(8, 4)):
        expected = [sample(unet, steps=8, seed=s, cfg="separate") for s in (0, 1)]
        got = {}
        barrier = threading.Barrier(2)

        def worker(s):
            barrier.wait()
            got[s] = sample(unet, steps=8, seed=s, cfg="separate")
        threads = [threading.Thread(target=worker, args=(s,)) for s in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@torch.no_grad()
def _two_steps(unet, handle, x, context):
    with handle.generation(2) as gen:
        unet(x, 900, encoder_hidden_states=context)
        gen.step(1)
        return unet(x, 800, encoder_hidden_states=context).sample


def _compiled(unet):
    torch._dynamo.reset()
    return torch.compile(unet, fullgraph=True, backend="eager")


def test_compiled_unet_needs_a_marked_generation_and_a_prepared_plan():
    unet = make_unet("sd15")
    x = torch.randn(2, 4, 8, 8)
    context = torch.cat(contexts(1))
    try:
        with patch_with_costs(unet, "10", lambda s, fmt: LayerCost(1.0, 1.2, 0.5), cache_dtype="auto") as handle:
            compiled = _compiled(unet)
            with pytest.raises(Exception, match=r"outside a marked generation.*handle.generation"):
                compiled(x, 900, encoder_hidden_states=context)
            with handle.generation(2):
                with pytest.raises(Exception, match=r"handle.prepare\(sample, encoder_hidden_states, num_steps\)"):
                    compiled(x, 900, encoder_hidden_states=context)
            assert handle.plan is None
            plan = handle.prepare(x, context, num_steps=2)
            assert plan is handle.plan and all(p.reuse for p in plan)
            large = torch.randn(2, 4, 16, 16)
            handle.prepare(large, context, num_steps=2)  # the plan made last is another shape's
            for inp in (x, large):  # the second shape makes its dimensions symbolic
                out = _two_steps(compiled, handle, inp, context)
                assert torch.allclose(_two_steps(unet, handle, inp, context), out, atol=1e-5)
    finally:
        torch._dynamo.reset()


def test_patching_a_compiled_unet_patches_the_module_it_wraps():
    unet = make_unet("sd15")
    compiled = torch.compile(unet, fullgraph=True, backend="eager")  # lazy: nothing is traced here
    handle = attnreuse.patch(compiled, "10")
    assert handle.unet is unet and unet._attnreuse_handle is handle
    assert all(not n.startswith("_orig_mod") for n in handle.layers)
    attnreuse.unpatch(compiled)
    assert not hasattr(unet, "_attnreuse_handle") and not unet._forward_pre_hooks


@pytest.mark.parametrize("target", ["map", "output"])
def test_a_cached_map_is_never_applied_to_another_shape(target):
    unet = make_unet("sd15")
    with attnreuse.patch(unet, "10", target=target) as handle:
        for x in (torch.randn(1, 4, 16, 16), torch.randn(2, 4, 8, 8)):
            with handle.generation(2) as gen:
                call(unet, torch.randn(1, 4, 8, 8), 900)
                gen.step(1)
                with pytest.raises(RuntimeError, match="keep one batch size"):
                    unet(x, 800, **unet_kwargs(unet, x.shape[0], torch.cat([contexts(1)[0]] * x.shape[0])))


def test_an_ended_generation_cannot_be_stepped():
    unet = make_unet("sd15")
    with attnreuse.patch(unet, attnreuse.hurry(4, 2)) as handle:
        with handle.generation(4) as gen:
            call(unet, torch.randn(1, 4, 8, 8), 900)
            with pytest.raises(ValueError, match="pass an int from 0 to 3"):
                gen.step(1.0)
        for misuse in (lambda: gen.step(1), lambda: gen.hold(1)):
            with pytest.raises(RuntimeError, match=r"has ended.*handle.generation\(num_steps\)"):
                misuse()
        gen.advance()  # the sampler's late update: no effect
        assert gen.kind is None and handle.current is None


def _planned_costs(s, fmt):
    """Only the 8x8 top level pays: plans differ per resolution."""
    return LayerCost(1.0, 1.2, 0.2) if s.q_tokens == 64 else LayerCost(1.0, 1.5, 2.0)


def test_plans_for_two_resolutions_in_two_threads():
    """Each generation uses the plan for its own input: threads at two resolutions do not swap plans."""
    import threading

    unet = make_unet("sd15")
    context = torch.cat(contexts(1))
    inputs = {size: torch.randn(2, 4, size, size) for size in (8, 16)}
    with patch_with_costs(unet, "10", _planned_costs, cache_dtype="auto") as handle:
        expected = {size: _two_steps(unet, handle, x, context) for size, x in inputs.items()}
        got, errors = {size: [] for size in inputs}, []
        barrier = threading.Barrier(2)

        def worker(size):
            barrier.wait()
            try:
                for _ in range(3):
                    got[size].append(_two_steps(unet, handle, inputs[size], context))
            except Exception as e:  # noqa: BLE001 (reported below)
                errors.append(e)
        threads = [threading.Thread(target=worker, args=(size,)) for size in inputs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert all(torch.equal(out, expected[size]) for size, outs in got.items() for out in outs)


def test_forgetting_gen_step_warns():
    unet = make_unet("sd15")
    with attnreuse.patch(unet, attnreuse.hurry(4, 2)) as handle:
        with pytest.warns(UserWarning, match=r"all 4 UNet calls .* ran as step 0.*gen.step\(i\)"):
            with handle.generation(4):
                for t in (900, 700, 500, 300):
                    call(unet, torch.randn(1, 4, 8, 8), t)
