"""The embedded model, the demo and the benchmarks' CPU runs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import attnreuse
from attnreuse import measured
from attnreuse.__main__ import main as cli
from attnreuse.embedded import CALIBRATION, HELD_OUT, generate, load_default
from attnreuse.embedded.grid import save_grid
from attnreuse.embedded.model import WEIGHTS
from attnreuse.embedded.search import search

ROOT = Path(__file__).resolve().parents[1]


def run(*args, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


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


def test_search_writes_where_it_is_told(tmp_path):
    path = tmp_path / "sub" / "phast.json"
    found = search(schedulers=("ddim",), reuses=(2,), steps=6, pairs=CALIBRATION[:2], max_rounds=1, path=path)
    assert json.loads(path.read_text()) == found and found["ddim-6-2"]["schedule"].count("0") == 2


def test_demo_runs(tmp_path):
    proc = run("-m", "attnreuse", "demo", "--out", str(tmp_path / "demo.png"))
    for text in ("HURRY-10", "PHAST-10", "PSNR vs full", "Triton kernels do not run", "not measured on a GPU yet"):
        assert text in proc.stdout
    assert proc.stderr == ""  # no library warnings
    grid = np.asarray(Image.open(tmp_path / "demo.png"))
    assert grid.shape[0] > 4 * 64 and grid.shape[1] > 6 * 64 + 200  # 4 rows × 6 classes of 64 px, plus labels
    assert (grid[:, :150] < 128).mean() > 0.01  # the label column holds text


def test_grid_labels_rows_and_columns(tmp_path):
    rows = [torch.rand(3, 1, 8, 8) for _ in range(2)]
    save_grid(rows, tmp_path / "plain.png")
    save_grid(rows, tmp_path / "labelled.png", labels=["full 20 steps\nreference", "HURRY-10\n31.2 dB"],
              columns=["class 0", "class 1", "class 2"], title="title")
    plain, labelled = (np.asarray(Image.open(tmp_path / f)) for f in ("plain.png", "labelled.png"))
    assert plain.shape == (2 * 66 + 2, 3 * 66 + 2)
    assert labelled.shape[0] > plain.shape[0] and labelled.shape[1] > plain.shape[1]
    assert (labelled[:, : labelled.shape[1] - plain.shape[1]] < 128).any()


@pytest.mark.parametrize("args, message", [
    (["--steps", "1"], "at least 2"),
    (["--reuse", "20"], "pass 0 to 19 reuse steps"),
    (["--steps", "8", "--reuse", "-1"], "pass 0 to 7 reuse steps"),
    (["--classes", "3", "10"], "digits 0 to 9"),
    (["--cache-dtype", "int8"], "invalid choice"),
    (["--out", "grid.jpg"], "ending in .png"),
    (["--out", "no/such/folder/grid.png"], "does not exist"),
    (["--rho-from", "no-such-e2e.json"], "bench/e2e.py"),
])
def test_demo_rejects_bad_arguments_before_any_work(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["demo", *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err.splitlines()[-1]


def test_demo_checks_out_is_writable(tmp_path, capsys):
    (tmp_path / "grid.png").mkdir()
    with pytest.raises(SystemExit):
        cli(["demo", "--out", str(tmp_path / "grid.png")])
    assert "cannot write there" in capsys.readouterr().err


def test_warmup_subcommand_passes_its_arguments_on(monkeypatch):
    calls = []
    monkeypatch.setattr(attnreuse.__main__, "warmup", SimpleNamespace(main=calls.append))
    cli(["warmup", "--model", "sd15", "--help"])
    assert calls == [["--model", "sd15", "--help"]]


def test_quality_benchmark_tiny(tmp_path):
    e2e = tmp_path / "e2e.json"  # ρ measured on a GPU: the fields bench/e2e.py --json writes
    e2e.write_text(json.dumps({"card": "NVIDIA H100 80GB HBM3", "torch": "2.13.0", "cases": [
        {"arch": "sd15", "px": 512, "mode": "graph", "default": {"graph": 20.0}, "reuse_fp8": {"graph": 15.0}}]}))
    run("bench/quality.py", "--tiny", "--out", str(tmp_path / "q"), "--rho-from", str(e2e))
    md = (tmp_path / "q" / "quality.md").read_text()
    for method in ("hurry", "phast", "early", "random", "output reuse", "fp16 maps", "fp8 maps",
                   "steps (ρ h100_sd15_512)", "deepcache N=3 | ", "deepcache N=3 + phast"):
        assert method in md
    deepcache = [line for line in md.splitlines() if "| deepcache N=3 |" in line]
    assert deepcache and all(0.2 < float(line.split("|")[7].strip(" %")) / 100 < 0.9 for line in deepcache)
    assert "ρ = 0.75 (h100_sd15_512): NVIDIA H100 80GB HBM3, sd15 512²" in md and "paper" not in md
    assert (tmp_path / "q" / "quality.png").stat().st_size > 0 and (tmp_path / "q" / "quality.csv").is_file()


def test_e2e_benchmark_dry_run(tmp_path):
    out = run("bench/e2e.py", "--dry-run", "--json", str(tmp_path / "e2e.json")).stdout
    assert "tiny 128" in out and "deepcache+hurry-2" in out
    case = json.loads((tmp_path / "e2e.json").read_text())["cases"][0]
    assert case["dc_cached"]["eager"] > 0 and case["loops_deepcache"]["deepcache+none"] > 0
    with pytest.raises(ValueError, match="no CUDA-graph cases"):  # a CPU run never counts as a GPU figure
        measured.e2e_entries(tmp_path / "e2e.json")
    results = json.loads((tmp_path / "e2e.json").read_text())
    for case in results["cases"]:  # the same fields as a GPU run's
        case["mode"] = "graph"
        for key in ("default", "reuse_fp8"):
            case[key]["graph"] = case[key]["eager"]
    (tmp_path / "gpu.json").write_text(json.dumps(results))
    (entry,) = measured.e2e_entries(tmp_path / "gpu.json")
    assert entry["rho"] == pytest.approx(entry["reuse_fp8_ms"] / entry["default_ms"], abs=1e-3)


def test_rho_assumptions_are_labelled_and_no_gpu_figure_is_invented():
    assert measured.measured() == []  # no GPU figures of these kernels exist yet
    assumed = {r.label: r for r in measured.assumed()}
    assert assumed["paper"].value == 0.31 and assumed["h200_ceiling"].value == 0.90
    assert all(r.source.startswith("assumed") for r in assumed.values())
