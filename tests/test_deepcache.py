"""Map reuse and DeepCache on one pipeline (the real ``DeepCache`` package): a layer that did not run when maps
were captured (DeepCache skipped its block) computes at the reuse step, and stores its map for later ones."""
from __future__ import annotations

import pytest
import torch

import attnreuse
from bench.measure import deepcache
from attnreuse.embedded import HELD_OUT, generate, load_default
from tests.test_pipelines import make_pipe, run


@pytest.mark.parametrize("interval", [2, 3])
@pytest.mark.parametrize("schedule", ["1101010010", "1100000000", "1111100100"])
def test_any_schedule_composes_with_any_deepcache_interval(schedule, interval):
    pipe = make_pipe()
    helper = deepcache(pipe, interval)
    alone = run(pipe, steps=10)
    with attnreuse.patch(pipe, schedule) as handle:
        both = run(pipe, steps=10)
        assert handle.fallbacks > 0 and handle.peak_cache_bytes > 0  # skipped blocks captured later
        with attnreuse.patch(pipe, "1" * 10):  # all-compute under DeepCache: DeepCache alone, exactly
            assert torch.equal(run(pipe, steps=10), alone)
    helper.disable()
    assert torch.isfinite(both).all() and not torch.equal(both, alone)


def test_fallback_layers_reuse_their_own_later_capture():
    """Step 1 captures, but DeepCache skips the deep blocks there (it runs them at steps 0, 3, 6, 9 only): their
    layers have no map at step 3, compute and store one there, and reuse it at steps 6 and 9."""
    pipe = make_pipe()
    helper = deepcache(pipe, 3)
    with attnreuse.patch(pipe, "1100000000") as handle:
        run(pipe, steps=10)
        first = handle.fallbacks
        run(pipe, steps=10)
        assert first > 0 and handle.fallbacks == 2 * first  # the skipped layers at step 3, once per generation
    helper.disable()


def test_embedded_model_with_deepcache_and_phast():
    pipe = load_default("ddim")
    pairs = HELD_OUT[:4]
    full = generate(pipe, pairs, 20)
    helper = deepcache(pipe, 2)
    cached = generate(pipe, pairs, 20)
    with attnreuse.patch(pipe, "11100111010010001010") as handle:  # the embedded model's DDIM PHAST-10
        both = generate(pipe, pairs, 20)
        assert handle.peak_cache_bytes > 0
    helper.disable()
    alone, composed = attnreuse.psnr(cached, full).mean(), attnreuse.psnr(both, full).mean()
    assert alone > 20 and composed > alone - 1  # measured: 23.7 and 23.4 dB; map reuse adds little to DeepCache's loss
