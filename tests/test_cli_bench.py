"""``python -m attnreuse bench`` on a CPU: a tiny SD pipeline loaded by path and the embedded model, the
report's figures, what a CPU cannot show, and measured.json entries in the package's form."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from attnreuse import measured
from attnreuse.__main__ import main as cli
from attnreuse.cli.bench import measured_entry, update_measured
from tests.helpers import cli_error
from tests.tiny_pipeline import save_tiny_pipeline, write_prompts


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is as fast, and never spin-waits for cores other processes hold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def schedule_file(path, schedule: str, **searched) -> str:
    path.write_text(json.dumps({"schedule": schedule, **searched}))
    return str(path)


def test_bench_a_pipeline_folder_on_cpu(tmp_path):
    model = save_tiny_pipeline(tmp_path / "tiny-sd")
    prompts = write_prompts(tmp_path / "prompts.txt")
    sched = schedule_file(tmp_path / "schedule.json", "110110")
    out = tmp_path / "report"
    report = cli(["bench", "--model", str(model), "--prompts", str(prompts), "--schedule", sched, "--out", str(out),
                  "--reps", "1"])
    assert report["device"] == "cpu" and report["step_timing"] == "eager" and "CPU" in report["notes"][0]
    assert set(report["step_ms"]) >= {"compute", "capture", "reuse", "rho"} and report["step_ms"]["compute"] > 0
    assert 1 <= report["fewer_steps"] <= 6 and report["calibration_images"] == 2 and report["batch"] == 1
    assert set(report["psnr_db"]) == {"schedule", "fewer_steps"} and report["psnr_db"]["schedule"] > 20
    assert json.loads((out / "report.json").read_text()) == report
    md = (out / "report.md").read_text()
    assert "| reusing |" in md and "fewer steps in the schedule's time" in md and "CPU" in md
    assert (out / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plan = report["default_plan"]
    assert (plan["reuse_steps"], plan["capture_steps"]) == (2, 2)
    eager, graphed = plan["eager"], plan["graphed"]
    assert graphed == {"available": False, "note": "CUDA graphs need a CUDA GPU: not available on cpu"}
    assert eager["available"] and "no cost table" in eager["note"]  # a CPU: every layer reuses, nothing planned
    assert len(eager["layers"]) == eager["reusing_layers"] == 14 and all(x["reuse"] for x in eager["layers"])
    assert eager["measured_rho"] == pytest.approx(eager["reuse_ms"] / eager["compute_ms"])
    saved = sum(x["compute_ms"] - x["reuse_ms"] for x in eager["layers"])
    assert eager["predicted_rho"] == pytest.approx((eager["compute_ms"] - saved) / eager["compute_ms"])
    first = eager["layers"][0]
    assert first["saving_ms"] == pytest.approx(2 * (first["compute_ms"] - first["reuse_ms"])
                                               - 2 * (first["capture_ms"] - first["compute_ms"]))
    assert "| predicted ρ |" in md and "| measured ρ |" in md and "| layer | eager |" in md
    assert "not available on cpu" in md and f"| {first['name']} | reuse fp32: " in md


def test_bench_reports_a_measured_plans_decisions(tmp_path, monkeypatch):
    """The path a GPU takes, on a CPU: a cost table (injected: self-attention at 8x8 pays, the rest does not)
    decides per layer, and the prediction comes from the plan's own costs."""
    from attnreuse import plans
    from attnreuse.costs import CostStore, MeasuredCosts
    from attnreuse.planner import LayerCost

    def fake(shape, fmt, device, dtype, backend, mode):
        return LayerCost(1.0, 1.1, 0.5) if shape.kv_tokens == 64 else LayerCost(1.0, 1.5, 2.0)

    monkeypatch.setattr(plans, "MeasuredCosts", lambda: MeasuredCosts(CostStore(tmp_path / "costs"), measure=fake,
                                                                      device_types=("cpu",)))
    model = save_tiny_pipeline(tmp_path / "tiny-sd")
    prompts = write_prompts(tmp_path / "prompts.txt")
    sched = schedule_file(tmp_path / "schedule.json", "110110")
    report = cli(["bench", "--model", str(model), "--prompts", str(prompts), "--schedule", sched, "--out",
                  str(tmp_path / "report"), "--reps", "1"])
    eager = report["default_plan"]["eager"]
    top = {"down_blocks.0.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1"}
    assert eager["note"] is None and eager["reusing_layers"] == 3
    for x in eager["layers"]:
        assert x["reuse"] == (x["name"].endswith("attn1") and x["name"].rsplit(".", 3)[0] in top), x
    assert all((x["saving_ms"] > 0) == x["reuse"] for x in eager["layers"])
    assert eager["predicted_rho"] == pytest.approx((eager["compute_ms"] - 3 * 0.5) / eager["compute_ms"])
    assert list((tmp_path / "costs").glob("costs-cpu-*.json"))
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| layers reusing | 3 of 14 | n/a |" in md and "computes: 1.000 / 1.500 / 2.000, -3.000 ms" in md


def test_bench_takes_what_the_search_used(tmp_path):
    """Scheduler, calibration and cache dtype come from schedule.json unless given."""
    sched = schedule_file(tmp_path / "schedule.json", "11011010", model="embedded", scheduler="dpm++",
                          cache_dtype="fp8", calibration={"prompts": [3, 7], "seeds": [5], "batch_size": 2})
    report = cli(["bench", "--model", "embedded", "--schedule", sched, "--out", str(tmp_path / "r"), "--reps", "1"])
    assert report["scheduler_class"] == "DPMSolverMultistepScheduler" and report["cache_dtype"] == "fp8"
    assert report["calibration_images"] == 2 and report["steps"] == 8 and report["reuse"] == 3


def test_bench_errors(tmp_path, capsys):
    def error(*argv):
        return cli_error(["bench", *argv], capsys)

    sched = schedule_file(tmp_path / "s.json", "1100")
    assert "no such file" in error("--model", "embedded", "--schedule", str(tmp_path / "none.json"))
    assert "no valid schedule" in error("--model", "embedded", "--schedule", schedule_file(tmp_path / "b.json", "0110"))
    assert "needs a GPU" in error("--model", "embedded", "--schedule", sched, "--update-measured")
    (tmp_path / "file").write_text("")
    assert "is a file" in error("--model", "embedded", "--schedule", sched, "--out", str(tmp_path / "file"))


def test_update_measured_writes_the_packages_form(tmp_path):
    path = tmp_path / "measured.json"
    shutil.copy(measured.FIGURES, path)
    report = {"resolution": [512, 512], "date": "2026-11-27", "model": "/ckpt/sd15", "batch": 1, "torch": "2.13"}
    entry = measured_entry(report, {"compute": 10.0, "reuse": 7.0}, SimpleNamespace(arch=lambda: "sd15"),
                           "NVIDIA H100 80GB HBM3")
    e2e = tmp_path / "e2e.json"  # the keys python -m attnreuse.measured writes from a bench/e2e.py run
    e2e.write_text(json.dumps({"card": "x", "cases": [{"arch": "sd15", "px": 512, "mode": "graph",
                                                       "default": {"graph": 1.0}, "reuse_fp8": {"graph": 0.5}}]}))
    assert set(entry) == set(measured.e2e_entries(e2e)[0]) and entry["rho"] == 0.7
    update_measured(path, entry)
    update_measured(path, dict(entry, rho=0.6, reuse_fp8_ms=6.0))  # the same card, model and size: replaced
    data = json.loads(path.read_text())
    assert data["rho"] == [dict(entry, rho=0.6, reuse_fp8_ms=6.0)]
    assert data["assumed_rho"] == json.loads(measured.FIGURES.read_text())["assumed_rho"]
    rho = measured._rho(data["rho"][0])  # read back as the demo reads it
    assert rho.value == 0.6 and rho.label == "h100_sd15_512"
