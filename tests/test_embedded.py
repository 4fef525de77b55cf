"""The embedded model, the demo and the benchmarks' CPU runs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

import attnreuse
from attnreuse.embedded import CALIBRATION, HELD_OUT, generate, load_default
from attnreuse.embedded.model import WEIGHTS

ROOT = Path(__file__).resolve().parents[1]


def run(*args, timeout=600):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_model_loads_from_package_data_and_samples_digits():
    assert WEIGHTS.is_file() and WEIGHTS.stat().st_size < 8 * 2 ** 20
    pipe = load_default()
    assert pipe.unet.config.sample_size == 8 and not set(CALIBRATION) & set(HELD_OUT)
    a = generate(pipe, [(3, 0), (7, 1)], steps=10)
    b = generate(pipe, [(7, 1)], steps=10)
    assert torch.equal(a, generate(pipe, [(3, 0), (7, 1)], steps=10))  # deterministic given the seeds
    assert a.shape == (2, 1, 8, 8) and 0 <= a.min() and a.max() <= 1
    torch.testing.assert_close(a[1:], b, rtol=0, atol=1e-5)  # a sample depends on its (class, seed) alone
    assert not torch.equal(a[0], a[1])
    assert a.std() > 0.2  # ink on paper, not grey noise


def test_reuse_on_the_embedded_model_stays_close():
    pipe = load_default()
    pairs = HELD_OUT[:10]
    full = generate(pipe, pairs)
    with attnreuse.patch(pipe, attnreuse.hurry(20, 5)):
        hurried = generate(pipe, pairs)
    assert attnreuse.psnr(hurried, full).mean() > 20


def test_demo_runs(tmp_path):
    out = run("-m", "attnreuse", "demo", "--out", str(tmp_path / "demo.png"))
    assert (tmp_path / "demo.png").stat().st_size > 0
    assert "HURRY-10" in out and "PSNR" in out


def test_quality_benchmark_tiny(tmp_path):
    run("bench/quality.py", "--tiny", "--out", str(tmp_path))
    md = (tmp_path / "quality.md").read_text()
    for method in ("hurry", "phast", "early", "random", "output reuse", "fp16 maps", "fp8 maps", "steps"):
        assert method in md
    assert (tmp_path / "quality.png").stat().st_size > 0 and (tmp_path / "quality.csv").is_file()


def test_e2e_benchmark_dry_run():
    out = run("bench/e2e.py", "--dry-run")
    assert "tiny 128" in out
