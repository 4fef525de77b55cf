"""A patched pipeline under torch.compile(mode="reduce-overhead") (CUDA graphs). Needs a GPU."""
from __future__ import annotations

import pytest
import torch

import attnreuse
from tests.helpers import rel_err
from tests.test_pipelines import make_pipe, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("cache_dtype", ["fp16", "fp8"])
def test_reduce_overhead_compiled_pipeline_matches_eager(cache_dtype):
    pipe = make_pipe().to("cuda", torch.float16)
    unet = pipe.unet
    torch._dynamo.reset()
    with attnreuse.patch(pipe, attnreuse.hurry(20, 10), cache_dtype=cache_dtype):
        eager = run(pipe, steps=20)
        pipe.unet = torch.compile(unet, mode="reduce-overhead", fullgraph=True)
        try:
            first, second = run(pipe, steps=20), run(pipe, steps=20)
        finally:
            pipe.unet = unet
            torch._dynamo.reset()
    assert torch.isfinite(first).all()
    assert rel_err(first, eager) < 2e-2, rel_err(first, eager)
    assert torch.equal(first, second)
