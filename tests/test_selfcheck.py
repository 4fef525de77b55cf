"""The kernels' first-use check (attnreuse.kernels.selfcheck) with wrong kernels injected: a variant that computes a
wrong output or a NaN map warns once, naming it, the device and the Triton version, and from then on runs the
PyTorch path, so no result is ever wrong. Triton's interpreter runs the kernels on the CPU."""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
import triton

from attnreuse.kernels import CachedMap, api, launchers, selfcheck
from attnreuse.kernels import triton_kernels as tk
from attnreuse.kernels.launchers import capture_buffers, empty_rows, launch_cached_pv, launch_capture
from tests.helpers import out64, probs64, random_qkv, rel_err

SHAPE = (1, 2, 40, 150, 40)  # a ragged last row tile and key block
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on a CPU, the compiled kernels on a GPU


def inject(monkeypatch, tmp_path: Path, kernel: str, old: str, new: str) -> None:
    """Launch ``kernel`` (``"cached_pv_kernel"``, ``"capture_kernel"``) with ``old`` replaced by ``new`` in its
    source from now on."""
    monkeypatch.setattr(tk, kernel, getattr(kernels_with(tmp_path, old, new), kernel))


def kernels_with(tmp_path: Path, old: str, new: str):
    """attnreuse's Triton kernels with one line changed, as a module of their own (Triton reads kernel source)."""
    source = Path(tk.__file__).read_text()
    assert source.count(old) == 1
    path = tmp_path / "broken_kernels.py"
    path.write_text(source.replace("from . import formats", "from attnreuse.kernels import formats").replace(old, new))
    spec = importlib.util.spec_from_file_location("broken_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fresh(monkeypatch):
    """No variant checked or warned about yet, no launch cached."""
    monkeypatch.setattr(selfcheck, "_VERDICTS", {})
    monkeypatch.setattr(selfcheck, "_WARNED", set())
    monkeypatch.setattr(launchers, "_LAUNCHES", {})
    monkeypatch.setattr(launchers, "_EAGER", {})
    monkeypatch.setattr(api, "_ROUTES", {})


def launches(monkeypatch) -> list:
    """The kernel launches that run from now on (the PyTorch path makes none)."""
    made = []
    call = launchers._Launch.__call__
    monkeypatch.setattr(launchers._Launch, "__call__",
                        lambda self, tensors, aligned: (made.append(self.variant), call(self, tensors, aligned)))
    return made


def reuse(cmap: CachedMap, v, h):
    out = empty_rows(v.shape[0], cmap.data.shape[2], v.shape[2], v.dtype, v.device).fill_(float("nan"))
    launch_cached_pv(out, cmap.data.view(cmap.format.op_dtype), cmap.block_max, cmap.row_lse, v, h, cmap.format)
    return out


def test_a_correct_kernel_passes_its_check_once(fresh, monkeypatch):
    b, h, nq, nk, d = SHAPE
    q, k, v = random_qkv(SHAPE, seed=1, device=DEVICE)
    cmap = CachedMap.from_probs(probs64(q, k, h, d ** -0.5), "fp8")
    made = launches(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reuse(cmap, v, h)
        reuse(cmap, v, h)
    (variant, verdict), = selfcheck.verdicts().items()
    assert verdict.ok and variant.kernel == "cached_pv" and variant.format == "fp8" and variant.head_dim == 40
    assert made == [variant, variant]  # checked once, launched both times
    assert 0 < verdict.errors["output"][0] < 1e-2


@pytest.mark.wrong_kernel
def test_a_wrong_output_warns_once_and_the_pytorch_path_takes_over(fresh, monkeypatch, tmp_path):
    b, h, nq, nk, d = SHAPE
    inject(monkeypatch, tmp_path, "cached_pv_kernel", "out_scale = INV_TOP * _decoded_scale(MAP_FORMAT, FP8_CVT)",
           "out_scale = 1.25 * INV_TOP * _decoded_scale(MAP_FORMAT, FP8_CVT)")
    q, k, v = random_qkv(SHAPE, seed=2, device=DEVICE)
    p = probs64(q, k, h, d ** -0.5)
    cmap = CachedMap.from_probs(p, "fp16")
    made = launches(monkeypatch)
    with pytest.warns(RuntimeWarning) as caught:
        first = reuse(cmap, v, h)
    (warning,) = [w for w in caught if "attnreuse" in str(w.message)]
    message = str(warning.message)
    assert "cached_pv fp16 maps, d=40" in message
    assert ("Triton's interpreter" if DEVICE == "cpu" else torch.cuda.get_device_name()) in message
    assert f"Triton {triton.__version__}" in message and "PyTorch path" in message
    assert rel_err(first, out64(p, v, h)) < 1e-3  # the call that found it out is right too
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        second = reuse(cmap, v, h)
    assert rel_err(second, out64(p, v, h)) < 1e-3
    assert len(made) == 1 and [v.ok for v in selfcheck.verdicts().values()] == [False]  # never launched again
    # the kernels still run what the wrong variant does not cover: another format
    reuse(CachedMap.from_probs(p, "fp8"), v, h)
    assert len(made) == 2 and made[1] != made[0]


@pytest.mark.wrong_kernel
def test_a_nan_map_is_caught_although_the_output_is_right(fresh, monkeypatch, tmp_path):
    """What Triton 3.6's ptxas did to the 4-bit capture on an H200: the output right, the map's row statistics
    NaN, so every reuse NaN."""
    b, h, nq, nk, d = SHAPE
    inject(monkeypatch, tmp_path, "capture_kernel", "    lse = m_i + tl.math.log2(",
           "    lse = float('nan') + m_i + tl.math.log2(")
    q, k, v = random_qkv(SHAPE, seed=3, device=DEVICE)
    p = probs64(q, k, h, d ** -0.5)
    bufs = capture_buffers(q, k, v, h, "fp4")
    with pytest.warns(RuntimeWarning, match="capture fp4 maps, d=40"):
        launch_capture(*bufs, q, k, v, h, d ** -0.5, "fp4")
    out, data, block_max, row_lse = bufs
    (verdict,) = selfcheck.verdicts().values()
    assert verdict.errors["output"][0] < 1e-2 and verdict.errors["map"][0] == float("inf")
    assert torch.isfinite(row_lse).all()  # the PyTorch path's map replaced the kernel's
    cmap = CachedMap(data.view(torch.float4_e2m1fn_x2), block_max, row_lse, nk, "fp4")
    v2 = torch.randn_like(v)
    assert rel_err(reuse(cmap, v2, h), out64(p, v2, h)) < 0.15
    assert rel_err(out, out64(p, v, h)) < 2e-3


def test_warmup_prints_one_line_per_variant(fresh, monkeypatch, capsys):
    """``python -m attnreuse warmup``'s checks, on tiny shapes in the interpreter."""
    from attnreuse import warmup
    monkeypatch.setattr(api, "KERNEL_DEVICES", {"cuda", DEVICE})
    monkeypatch.setattr(api, "backend_available", lambda: True)
    monkeypatch.setattr(warmup, "attention_shapes", lambda *a: {(1, 2, 40, 150, 40): 2, (1, 2, 40, 77, 40): 2,
                                                                 (1, 2, 16, 16, 160): 1})
    verdicts = warmup.warm("sd15", 512, ["fp8", "fp4"], torch.float16, device=DEVICE)
    printed = capsys.readouterr().out
    assert len(verdicts) == 8 and all(v.ok for v in verdicts.values())
    checks = [line for line in printed.splitlines() if line.startswith("    ok")]
    assert len(checks) == 8 and len(set(checks)) == 8
    assert sum("PyTorch path" in line for line in printed.splitlines()) == 2  # d=160, per format


def test_non_finite_inputs_leave_the_variant_unjudged(fresh):
    """A NaN in the values says nothing about the kernel: no verdict, no warning; the next call checks."""
    b, h, nq, nk, d = SHAPE
    q, k, v = random_qkv(SHAPE, seed=4, device=DEVICE)
    cmap = CachedMap.from_probs(probs64(q, k, h, d ** -0.5), "fp8")
    bad = v.clone()
    bad[0, 3, 5] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reuse(cmap, bad, h)
        assert not selfcheck.verdicts()
        reuse(cmap, v, h)
    assert [verdict.ok for verdict in selfcheck.verdicts().values()] == [True]


@pytest.mark.wrong_kernel
def test_a_variant_that_cannot_compile_runs_the_pytorch_path(fresh, monkeypatch, tmp_path):
    """A compile error (or, on a GPU, resources the chip lacks) at a variant's first launch: a warning, the PyTorch
    path's result, never a crash."""
    b, h, nq, nk, d = SHAPE
    inject(monkeypatch, tmp_path, "cached_pv_kernel", "out_scale = INV_TOP * _decoded_scale(MAP_FORMAT, FP8_CVT)",
           "out_scale = INV_TOP * _decoded_scale(MAP_FORMAT, FP8_CVT) + tl.undefined_name")
    q, k, v = random_qkv(SHAPE, seed=5, device=DEVICE)
    p = probs64(q, k, h, d ** -0.5)
    with pytest.warns(RuntimeWarning, match=r"launch \("):
        out = reuse(CachedMap.from_probs(p, "fp16"), v, h)
    assert rel_err(out, out64(p, v, h)) < 1e-3


def test_a_variant_checked_at_one_launch_shape_is_known_checked_at_the_others(fresh):
    """Batch is not specialised: a second launch shape of a variant is not checked again, and its launch holds the
    verdict (the direct launch path takes only launches that know theirs)."""
    for batch in (1, 2):
        q, k, v = random_qkv((batch, *SHAPE[1:]), device=DEVICE)
        launch_capture(*capture_buffers(q, k, v, SHAPE[1], "fp8"), q, k, v, SHAPE[1], 0.25, "fp8")
    assert len(selfcheck.verdicts()) == 1 and len(launchers._LAUNCHES) == 2
    assert all(launch.verdict.ok for launch in launchers._LAUNCHES.values())
