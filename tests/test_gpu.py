"""attnreuse's CUDA path (Triton kernels) against its CPU path (PyTorch reference). Needs a GPU."""
from __future__ import annotations

import pytest
import torch

import attnreuse
from attnreuse.timing import graphed
from tests.helpers import make_unet, sample

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("cache_dtype", ["fp16", "fp8", "fp4"])
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_triton_path_matches_torch_path(arch, cache_dtype):
    unet = make_unet(arch, sample_size=16).to("cuda", torch.float16)
    outs = {}
    for backend in ("torch", "triton"):
        with attnreuse.patch(unet, attnreuse.hurry(10, 5), cache_dtype=cache_dtype, backend=backend, plan="all"):
            outs[backend] = sample(unet, steps=10, size=16, device="cuda").float()
    rel = ((outs["triton"] - outs["torch"]).norm() / outs["torch"].norm()).item()
    assert rel < {"fp16": 5e-3, "fp8": 2e-2, "fp4": 5e-2}[cache_dtype], rel


def test_all_compute_is_bit_identical_on_gpu():
    unet = make_unet("sd15", sample_size=16).to("cuda", torch.float16)
    ref = sample(unet, steps=6, size=16, device="cuda")
    with attnreuse.patch(unet, "111111", cache_dtype="fp8"):
        assert torch.equal(sample(unet, steps=6, size=16, device="cuda"), ref)


def test_kernels_under_torch_compile_and_cuda_graphs():
    from attnreuse.kernels import FP8, cached_pv, capture

    b, h, n, d = 2, 4, 300, 40
    q, k, v = (torch.randn(b, n, h * d, device="cuda", dtype=torch.float16) for _ in range(3))
    _, ref_map = capture(q, k, v, h, d ** -0.5, FP8, backend="triton")
    ref_pv = cached_pv(ref_map, v, h, backend="triton")

    def reuse(q, k, v):
        _, cmap = capture(q, k, v, h, d ** -0.5, FP8, backend="triton")
        return cached_pv(cmap, v, h, backend="triton")

    assert torch.equal(torch.compile(reuse, fullgraph=True)(q, k, v), ref_pv)

    out = None

    def step():
        nonlocal out
        out = cached_pv(ref_map, v, h, backend="triton")

    graph = graphed(step)
    v.copy_(torch.randn_like(v))
    graph.replay()
    assert torch.equal(out, cached_pv(ref_map, v, h, backend="triton"))


def test_measured_plan_on_gpu(tmp_path, monkeypatch):
    """The default plan on a GPU: costs measured eager and graphed into a table on disk (read back by another
    store without measuring), every layer's decision following its costs, the output finite; where no layer
    reuses, exactly the unpatched output."""
    from attnreuse import costs
    from attnreuse.planner import layer_shapes

    monkeypatch.setenv("ATTNREUSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(costs, "STORE", costs.CostStore())
    unet = make_unet("sd15", sample_size=16).to("cuda", torch.float16)
    names = [n for n, m in unet.named_modules() if type(m).__name__ == "Attention"]
    shapes = list(dict.fromkeys(layer_shapes(unet, names, (2, 4, 16, 16), 7).values()))
    table = costs.measure_costs(shapes, ["fp16", "fp8"], "cuda", torch.float16)
    assert len(table) == len(shapes) * 2 * 2 and all(c.compute > 0 and c.reuse > 0 for c in table.values())
    assert costs.measure_costs(shapes, ["fp8"], "cuda", torch.float16, store=costs.CostStore(tmp_path),
                               measure=lambda *a: pytest.fail("measured again")).keys() <= table.keys()
    ref = sample(unet, steps=10, size=16, device="cuda")
    with attnreuse.patch(unet, attnreuse.hurry(10, 5), cache_dtype="fp8") as handle:
        out = sample(unet, steps=10, size=16, device="cuda")
        plan = handle.plan
        assert plan is not None and {p.mode for p in plan} == {"eager"}
        assert all(p.reuse == (p.net_ms > 0) for p in plan)
    assert torch.isfinite(out).all()
    if not any(p.reuse for p in plan):
        assert torch.equal(out, ref)
