"""The per-layer plan and the memory budget, with a fixed cost table."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import attnreuse
from attnreuse import architectures
from attnreuse.planner import LayerCost, LayerShape, auto_formats, layer_shapes, make_plan
from attnreuse.kernels import formats, storage_nbytes
from tests.helpers import make_unet, patch_with_costs, sample

F16, FP8, FP4 = (formats.get(n) for n in ("fp16", "fp8", "fp4"))


def shape(tokens, heads=8, kv=None):
    return LayerShape(batch=2, heads=heads, q_tokens=tokens, kv_tokens=kv or tokens, head_dim=40, q_dim=320,
                      kv_dim=320)


def table(costs):
    """A cost function from ``{(q_tokens, map format): (compute, capture, reuse)}``."""
    return lambda s, fmt: LayerCost(*costs[(s.q_tokens, fmt)])


SHAPES = {"big": shape(4096), "mid": shape(1024), "small": shape(256)}
COSTS = table({
    (4096, F16): (0.20, 0.30, 0.16), (4096, FP8): (0.20, 0.28, 0.08),  # fp8 saves more
    (1024, F16): (0.03, 0.04, 0.02), (1024, FP8): (0.03, 0.04, 0.025),  # fp16 saves more
    (256, F16): (0.01, 0.02, 0.012), (256, FP8): (0.01, 0.02, 0.011),  # never pays
})


def nbytes(name, dtype):
    s = SHAPES[name]
    return storage_nbytes(s.batch, s.heads, s.q_tokens, s.kv_tokens, dtype)


def test_plan_picks_dtype_and_skips_layers_that_do_not_pay():
    plan = {p.name: p for p in make_plan(SHAPES, COSTS, (F16, FP8), n_reuse=10, n_capture=1)}
    assert plan["big"].reuse and plan["big"].format == FP8 and plan["big"].bytes == nbytes("big", FP8)
    assert plan["mid"].reuse and plan["mid"].format == F16
    assert not plan["small"].reuse and "not faster" in plan["small"].reason
    assert plan["big"].saving_ms == pytest.approx(10 * (0.20 - 0.08) - (0.28 - 0.20))


@pytest.mark.parametrize("budget", [0, 1e6, nbytes("mid", F16), nbytes("big", FP8), 1e12])
def test_plan_never_exceeds_the_budget(budget):
    with _no_warning():  # make_plan is pure: the patch tells the user (once)
        plan = make_plan(SHAPES, COSTS, (F16, FP8), n_reuse=10, n_capture=1, max_bytes=budget)
    assert sum(p.bytes for p in plan) <= budget
    chosen = {p.name for p in plan if p.reuse}
    expect = {0: set(), 1e6: set(), nbytes("mid", F16): {"mid"}, nbytes("big", FP8): {"big"}, 1e12: {"big", "mid"}}
    assert chosen == expect[budget]


def test_plan_prefers_time_saved_per_byte():
    free = {p.name: p for p in make_plan(SHAPES, COSTS, (F16, FP8), 10, 1)}
    assert free["big"].saving_ms / free["big"].bytes > free["mid"].saving_ms / free["mid"].bytes
    budget = nbytes("big", FP8) + nbytes("mid", F16) - 1  # room for either, not both
    plan = {p.name: p for p in make_plan(SHAPES, COSTS, (F16, FP8), 10, 1, max_bytes=budget)}
    assert plan["big"].reuse and not plan["mid"].reuse
    assert plan["mid"].reason == "over the memory budget"


def test_single_dtype_is_respected():
    plan = make_plan(SHAPES, COSTS, (F16,), 10, 1)
    assert {p.format for p in plan if p.reuse} == {F16}


class _no_warning:
    def __enter__(self):
        import warnings
        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)


def test_layer_shapes_follow_the_unet(arch):
    unet = make_unet(arch)
    layers = {n: m for n, m in unet.named_modules() if type(m).__name__ == "Attention"}
    shapes = layer_shapes(unet, layers, (2, 4, 8, 8), context_tokens=7)
    seen = {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, kwargs, n=n: seen.__setitem__(n, (args[0].shape, (kwargs.get("encoder_hidden_states")
                                                                           if kwargs.get("encoder_hidden_states")
                                                                           is not None else args[0]).shape)),
        with_kwargs=True) for n, m in layers.items()]
    sample(unet, steps=1)
    for h in hooks:
        h.remove()
    for n, s in shapes.items():
        (b, nq, _), (_, nk, _) = seen[n]
        assert (s.batch, s.q_tokens, s.kv_tokens) == (b, nq, nk), n
        assert s.heads == layers[n].heads


def fixed_costs(s, fmt):
    """Cross-attention never pays, self-attention pays with fp8 best."""
    if s.kv_tokens == 7:
        return LayerCost(1.0, 1.5, 2.0)
    return LayerCost(1.0, 1.2, 0.2 if fmt == FP8 else 0.5)


def test_patch_with_auto_dtype_follows_the_plan():
    unet = make_unet("sd15")
    with patch_with_costs(unet, attnreuse.hurry(6, 3), fixed_costs, cache_dtype="auto") as handle:
        assert handle.plan is None
        maps = {}  # what the last reuse step holds
        hook = unet.register_forward_pre_hook(lambda m, a: maps.update(handle.current.cache.maps))
        sample(unet, steps=6)
        hook.remove()
        plan = {p.name: p for p in handle.plan}
        assert all(p.reuse == (not n.endswith("attn2")) for n, p in plan.items())
        assert {p.format for p in plan.values() if p.reuse} == {FP8}
        assert {k[0] for k in maps} == {n for n, p in plan.items() if p.reuse}
        assert all(m.format == FP8 for m in maps.values())


def test_patch_budget_is_never_exceeded_even_with_separate_cfg_calls():
    unet = make_unet("sd15")
    ref = sample(unet, steps=4, cfg="separate")
    with patch_with_costs(unet, "1100", fixed_costs, cache_dtype="fp8", max_cache_bytes=math.inf) as handle:
        sample(unet, steps=4, cfg="separate")
        plan_bytes = sum(p.bytes for p in handle.plan)
        full = handle.peak_cache_bytes
    assert full == 2 * plan_bytes  # two branches, each with its own maps
    budget = full * 3 // 4
    with patch_with_costs(unet, "1100", fixed_costs, cache_dtype="fp8", max_cache_bytes=budget) as handle:
        with pytest.warns(UserWarning, match="left no room"):
            out = sample(unet, steps=4, cfg="separate")
        assert 0 < handle.peak_cache_bytes <= budget
    assert torch.isfinite(out).all() and not torch.equal(out, ref)


def test_budget_too_small_means_plain_attention():
    unet = make_unet("sd15")
    ref = sample(unet, steps=4)
    with patch_with_costs(unet, "1100", fixed_costs, max_cache_bytes=10) as handle:
        with pytest.warns(UserWarning, match="plain attention"):
            out = sample(unet, steps=4)
        assert handle.peak_cache_bytes == 0 and not any(p.reuse for p in handle.plan)
    assert torch.equal(out, ref)


def test_output_reuse_baseline():
    unet = make_unet("sd15")
    layers = {n: m for n, m in unet.named_modules() if type(m).__name__ == "Attention"}
    calls = {n: 0 for n in layers}
    hooks = [m.to_v.register_forward_hook(lambda *a, n=n: calls.__setitem__(n, calls[n] + 1))
             for n, m in layers.items()]
    with attnreuse.patch(unet, "1100", target="output") as handle:
        held = []
        hook = unet.register_forward_pre_hook(lambda m, a: held.extend(handle.current.cache.maps.values()))
        out = sample(unet, steps=4)
        hook.remove()
        assert held and all(isinstance(t, torch.Tensor) for t in held)
    for h in hooks:
        h.remove()
    assert set(calls.values()) == {2}  # nothing of the layer runs on reuse steps
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="target='map'"):
        attnreuse.patch(unet, "10", target="output", cache_dtype="auto")


def test_hold_keeps_the_step():
    unet = make_unet("sd15")
    with attnreuse.patch(unet, "10") as handle, handle.generation(2) as gen:
        gen.hold(0)
        sample(unet, steps=2)  # both calls capture, as call 0 of step 0
        gen.hold(1)
        a = sample(unet, steps=3)  # every call reuses the maps of step 0
        assert handle.step == 1 and gen.call == 0
        b = sample(unet, steps=3)
        assert torch.equal(a, b)
        with pytest.raises(ValueError, match="pass an int from 0 to 1"):
            gen.hold(2)


def test_sd15_512_fp8_cache_fits_in_1_5_gb():
    """The public SD1.5 config at 512², batch 2 (CFG): every map of a reuse step, counted from the layer
    shapes (built on the meta device: no weights)."""
    shapes = architectures.attention_shapes("sd15", 512)
    total = {dt: sum(n * storage_nbytes(b, h, nq, nk, dt) for (b, h, nq, nk, _), n in shapes.items())
             for dt in (F16, FP8)}
    assert sum(shapes.values()) == 32 and max(s[2] for s in shapes) == 4096
    assert 2.9e9 < total[F16] < 3.0e9  # 2.93 GB of fp16 maps
    assert total[FP8] <= 1.52e9  # 1.47 GB of fp8 data + 3 % of per-(row, 128-key block) statistics


def test_attention_shapes_of_the_public_configs():
    """Per UNet call with CFG: SD1.5 at 512² (heads 8, head dims 40/80/160 by level, 77 text tokens); layer
    counts of SD2.1 at 768² and SDXL at 1024² (10 transformer blocks per 32² block)."""
    assert architectures.attention_shapes("sd15", 512) == {
        (2, 8, 4096, 4096, 40): 5, (2, 8, 4096, 77, 40): 5, (2, 8, 1024, 1024, 80): 5, (2, 8, 1024, 77, 80): 5,
        (2, 8, 256, 256, 160): 5, (2, 8, 256, 77, 160): 5, (2, 8, 64, 77, 160): 1, (2, 8, 64, 64, 160): 1}
    assert sum(architectures.attention_shapes("sd21", 768).values()) == 32
    sdxl = architectures.attention_shapes("sdxl", 1024)
    assert sum(sdxl.values()) == 140 and sdxl[(2, 20, 1024, 1024, 64)] == 60


def test_plans_use_the_cost_model_set_last_and_keep_it_when_patched_again():
    unet = make_unet("sd15")
    with attnreuse.patch(unet, attnreuse.hurry(4, 2), plan="all") as handle:
        assert handle.plans is None and handle.prepare(torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32), 4) is None
    with attnreuse.patch(unet, attnreuse.hurry(4, 2)) as handle:  # plan="measured": no cost table on a CPU
        assert handle.plans is not None and not handle.plans.planning(torch.device("cpu"))
        assert handle.prepare(torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32), 4) is None
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)
    with patch_with_costs(unet, attnreuse.hurry(4, 2), lambda s, fmt: LayerCost(1.0, 1.2, 0.5), cache_dtype="auto"):
        handle = attnreuse.patch(unet, attnreuse.hurry(4, 2), cache_dtype="auto")  # patched again: no timing
        assert all(p.reuse for p in handle.prepare(x, context, 4))
        handle.plans.cost = lambda device, dtype, backend: lambda s, fmt: LayerCost(1.0, 1.2, 2.0)
        assert handle.plan is None
        with pytest.warns(UserWarning, match="no layer is worth reusing"):
            assert not any(p.reuse for p in handle.prepare(x, context, 4))


def test_auto_chooses_fp4_where_it_saves_most():
    candidates = auto_formats(torch.float16)
    assert candidates == (F16, FP8, FP4)
    reuse_ms = {F16: 0.16, FP8: 0.08, FP4: 0.05}
    plan = make_plan(SHAPES, lambda s, fmt: LayerCost(0.2, 0.3, reuse_ms[fmt]), candidates, n_reuse=10, n_capture=1)
    assert [p.format for p in plan] == [FP4] * 3 and plan[0].bytes == nbytes("big", FP4) < nbytes("big", FP8)


# ---- the default plan (plan="measured") with injected cost tables ------------------------------------------------

def _attention(unet):
    return {n: m for n, m in unet.named_modules() if type(m).__name__ == "Attention"}


def test_default_plan_reuses_exactly_the_layers_that_pay():
    """Self-attention pays, cross-attention does not (fixed_costs): only self-attention maps are stored, and a
    layer that computes gives exactly what the unpatched layer gives for its input."""
    unet = make_unet("sd15")
    layers = _attention(unet)
    seen = {}

    def record(name):
        return lambda mod, args, kwargs, out: seen.setdefault(name, []).append((args, dict(kwargs), out))
    hooks = [m.register_forward_hook(record(n), with_kwargs=True) for n, m in layers.items() if n.endswith("attn2")]
    with patch_with_costs(unet, attnreuse.hurry(6, 3), fixed_costs) as handle:
        assert handle.config.plan == "measured"
        maps = {}
        hook = unet.register_forward_pre_hook(lambda m, a: maps.update(handle.current.cache.maps))
        sample(unet, steps=6)
        hook.remove()
        plan = {p.name: p for p in handle.plan}
    for h in hooks:
        h.remove()
    self_attn = {n for n in layers if n.endswith("attn1")}
    assert {n for n, p in plan.items() if p.reuse} == self_attn == {k[0] for k in maps}
    for name, p in plan.items():
        assert (p.n_reuse, p.n_capture) == (3, 1) and p.reuse == (p.net_ms > 0)
        if p.reuse:
            assert p.saving_ms == pytest.approx(3 * (1.0 - 0.5) - (1.2 - 1.0)) == pytest.approx(p.net_ms)
            assert p.reason == "reuse (fp32): reuse saves 1.5 ms over 3 reuse step(s) and its 1 capture(s) add 0.2 ms"
        else:
            assert p.cost == LayerCost(1.0, 1.5, 2.0) and p.saving_ms == 0 and p.format is None
            assert p.reason.startswith("reuse is not faster than recomputing here: a reuse call takes 2 ms")
    assert set(seen) == set(layers) - self_attn and all(len(calls) == 6 for calls in seen.values())
    with torch.no_grad():  # unpatched now: the original processors, on the very inputs of the patched run
        for name, calls in seen.items():
            assert all(torch.equal(layers[name](*args, **kwargs), out) for args, kwargs, out in calls), name


def _never_pays(s, fmt):
    """Reuse saves 0.1 ms a step, a capture adds 0.5 ms: with 3 reuse steps and 1 capture, no layer pays."""
    return LayerCost(1.0, 1.5, 0.9)


def test_no_layer_pays_runs_unpatched_and_says_so_once():
    unet = make_unet("sd15")
    ref = sample(unet, steps=6)
    with patch_with_costs(unet, attnreuse.hurry(6, 3), _never_pays) as handle:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outs = [sample(unet, steps=6), sample(unet, steps=6)]  # two generations
            sample(unet, steps=6, size=16)  # another input: its own plan, nothing said again
        assert handle.peak_cache_bytes == 0 and not any(p.reuse for p in handle.plan)
    told = [str(w.message) for w in caught if "no layer is worth reusing" in str(w.message)]
    assert len(told) == 1, told
    assert "on cpu (eager costs" in told[0] and "every layer computes, exactly as unpatched" in told[0]
    assert "reuse saves 0.3 ms over 3 reuse step(s) but its 1 capture(s) add 0.5 ms" in told[0]
    assert "mode='graphed'" not in told[0] and "plan='all'" in told[0]  # graphs: a GPU's advice, not a CPU's
    assert all(torch.equal(out, ref) for out in outs)


def test_plan_all_and_the_cpu_default_reuse_every_layer():
    """plan="all" is the behaviour before plans; so is plan="measured" off a GPU (no cost table, nothing timed),
    and with costs where every layer pays."""
    unet = make_unet("sd15")
    ref = sample(unet, steps=6)
    outs = {}
    for plan in ("all", "measured"):
        with attnreuse.patch(unet, attnreuse.hurry(6, 3), plan=plan) as handle:
            outs[plan] = sample(unet, steps=6)
            assert handle.plan is None and handle.config.plan == plan
            assert (handle.plans is None) == (plan == "all")
    with patch_with_costs(unet, attnreuse.hurry(6, 3), lambda s, fmt: LayerCost(1.0, 1.2, 0.5)) as handle:
        outs["pays everywhere"] = sample(unet, steps=6)
        assert all(p.reuse for p in handle.plan) and len(handle.plan) == len(handle.layers)
    assert not torch.equal(outs["all"], ref)
    assert all(torch.equal(out, outs["all"]) for out in outs.values())


@pytest.mark.parametrize("bad", ["fast", "ALL", None, 1])
def test_bad_plan_value_is_an_error(bad):
    with pytest.raises(ValueError, match=r"plan=.*: pass 'measured' .* or 'all' \(every selected layer reuses\)"):
        attnreuse.patch(make_unet("sd15"), "10", plan=bad)
    with pytest.raises(ValueError, match="plan="):
        attnreuse.ReuseConfig("10", plan=bad)


def test_compiled_unet_without_a_plan_names_prepare_and_plan_all():
    unet = make_unet("sd15")
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)

    def two_steps(model, handle):
        with torch.no_grad(), handle.generation(2) as gen:
            model(x, 900, encoder_hidden_states=context)
            gen.step(1)
            return model(x, 800, encoder_hidden_states=context).sample

    torch._dynamo.reset()
    try:
        with patch_with_costs(unet, "10", fixed_costs) as handle:  # plan="measured" with costs: plans on a CPU
            compiled = torch.compile(unet, fullgraph=True, backend="eager")
            with pytest.raises(Exception, match=r"plan='measured' \(the default\) needs a per-layer plan .* inside "
                                                r"torch.compile: call handle.prepare\(sample, encoder_hidden_states, "
                                                r"num_steps\) .*mode='graphed'.*or patch with plan='all'"):
                two_steps(compiled, handle)
            plan = handle.prepare(x, context, num_steps=2, mode="graphed")
            assert {p.mode for p in plan} == {"graphed"} and any(p.reuse for p in plan)
            assert torch.allclose(two_steps(compiled, handle), two_steps(unet, handle), atol=1e-5)
    finally:
        torch._dynamo.reset()


def test_a_model_whose_layers_cannot_be_placed_names_plan_all():
    """AnimateDiff's UNetMotionModel takes 5-D samples: with costs (a GPU) its layers cannot be placed for a plan,
    and the error names plan='all', with which it samples."""
    from diffusers import MotionAdapter, UNetMotionModel
    adapter = MotionAdapter(block_out_channels=(16, 32), motion_layers_per_block=1,
                            motion_transformer_layers_per_block=1, motion_num_attention_heads=2,
                            motion_norm_num_groups=8, motion_max_seq_length=8, use_motion_mid_block=False)
    unet = UNetMotionModel.from_unet2d(make_unet("sd15"), adapter).eval()
    x, context = torch.randn(1, 4, 3, 8, 8), torch.randn(3, 7, 32)

    def generation(handle):
        with torch.no_grad(), handle.generation(3) as gen:
            for i, t in enumerate([900, 500, 100]):
                gen.step(i)
                unet(x, t, encoder_hidden_states=context)

    with patch_with_costs(unet, "110", lambda s, fmt: LayerCost(1.0, 1.2, 0.5)) as handle:
        with pytest.raises(TypeError, match=r"cannot be placed for a per-layer plan. Patch with plan='all'"):
            generation(handle)
    with attnreuse.patch(unet, "110", plan="all") as handle:
        generation(handle)


def test_prepare_names_what_is_wrong_with_its_arguments():
    unet = make_unet("sd15")
    x, context = torch.empty(2, 4, 8, 8), torch.empty(2, 7, 32)
    with patch_with_costs(unet, attnreuse.hurry(6, 3), lambda s, fmt: LayerCost(1.0, 1.2, 0.5)) as handle:
        with pytest.raises(ValueError, match="num_steps=0: pass the number of sampling steps"):
            handle.prepare(x, context, 0)
        with pytest.raises(TypeError, match=r"encoder_hidden_states must be \[batch, tokens, width\]"):
            handle.prepare(x, context[0], 6)
        with pytest.raises(TypeError, match="sample must be the UNet's input tensor"):
            handle.prepare(6, x, context)
        assert len(handle.prepare(x, context, 6)) == len(handle.layers)
