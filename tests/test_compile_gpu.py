"""A patched pipeline under torch.compile(mode="reduce-overhead") (CUDA graphs). Needs a GPU."""
from __future__ import annotations

import pytest
import torch

import attnreuse
from tests.helpers import contexts, rel_err
from tests.test_pipelines import make_pipe, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("cache_dtype", ["fp16", "fp8"])
def test_reduce_overhead_compiled_pipeline_matches_eager(cache_dtype):
    """Every layer reusing (plan="all"): the kernels under CUDA graphs give the eager result."""
    pipe = make_pipe().to("cuda", torch.float16)
    unet = pipe.unet
    torch._dynamo.reset()
    with attnreuse.patch(pipe, attnreuse.hurry(20, 10), cache_dtype=cache_dtype, plan="all"):
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


def _unet_inputs():
    """What the pipeline's UNet gets in run(): batched CFG latents and text embeddings, fp16 on the GPU."""
    cond, uncond = contexts(1)
    context = torch.cat([uncond, cond]).to("cuda", torch.float16)
    return torch.empty(2, 4, 8, 8, device="cuda", dtype=torch.float16), context


def test_default_plan_under_reduce_overhead_needs_a_graphed_plan(tmp_path, monkeypatch):
    """plan="measured" (the default): without handle.prepare the compiled UNet says how to fix it; with
    handle.prepare(..., mode="graphed") the graphed costs decide and compiled runs give the eager result."""
    monkeypatch.setenv("ATTNREUSE_CACHE_DIR", str(tmp_path))
    from attnreuse import costs
    monkeypatch.setattr(costs, "STORE", costs.CostStore())
    pipe = make_pipe().to("cuda", torch.float16)
    unet = pipe.unet
    torch._dynamo.reset()
    try:
        with attnreuse.patch(pipe, attnreuse.hurry(20, 10), cache_dtype="fp8") as handle:
            pipe.unet = torch.compile(unet, mode="reduce-overhead", fullgraph=True)
            with pytest.raises(Exception, match=r"handle\.prepare\(sample, encoder_hidden_states, num_steps\).*"
                                                r"mode='graphed'.*plan='all'"):
                run(pipe, steps=20)
            pipe.unet = unet
            torch._dynamo.reset()
            plan = handle.prepare(*_unet_inputs(), num_steps=20, mode="graphed")
            assert plan is not None and {p.mode for p in plan} == {"graphed"}
            assert all(p.reuse == (p.net_ms > 0) and p.cost.compute > 0 for p in plan)
            eager = run(pipe, steps=20)  # the same plan: made for this input, in graphed mode
            pipe.unet = torch.compile(unet, mode="reduce-overhead", fullgraph=True)
            first, second = run(pipe, steps=20), run(pipe, steps=20)
    finally:
        pipe.unet = unet
        torch._dynamo.reset()
    assert list(tmp_path.glob("costs-*.json"))  # the graphed table, on disk
    assert rel_err(first, eager) < 2e-2, rel_err(first, eager)
    assert torch.equal(first, second)
