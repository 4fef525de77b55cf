"""``python -m attnreuse search`` on a tiny SD pipeline loaded by path: one process and two gloo processes
agree, a killed search resumes to the identical result, and every wrong input is one line before any work."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attnreuse.__main__ import main as cli
from tests.helpers import cli_error
from tests.tiny_pipeline import save_tiny_pipeline, write_prompts

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--steps", "6", "--reuse", "2", "--max-rounds", "2", "--batch-size", "1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The saved pipeline, its prompts file and the result of one search in this process."""
    root = tmp_path_factory.mktemp("search")
    model, prompts = save_tiny_pipeline(root / "tiny-sd"), write_prompts(root / "prompts.txt")
    args = ["--model", str(model), "--prompts", str(prompts), *SMALL]
    cli(["search", *args, "--out", str(root / "one")])
    return root, args


def outcome(out: Path) -> tuple[dict, dict]:
    """schedule.json less its timing and process count, and trace.json."""
    found = json.loads((out / "schedule.json").read_text())
    for k in ("seconds", "processes"):
        found.pop(k)
    return found, json.loads((out / "trace.json").read_text())


def command(*args) -> list[str]:
    return [sys.executable, "-m", "attnreuse", "search", *args]


def test_search_writes_schedule_plot_and_trace(tiny):
    root, _ = tiny
    found, trace = outcome(root / "one")
    assert len(found["schedule"]) == 6 and found["schedule"].count("0") == 2 and found["schedule"][0] == "1"
    assert found["utility_db"] >= found["start_utility_db"] and found["start_schedule"] == "111100"
    assert found["model"] == str(root / "tiny-sd") and found["pipeline"] == "StableDiffusionPipeline"
    assert found["resolution"] == [8, 8] and found["steps"] == 6 and found["version"]
    assert found["calibration"] == {"prompts": ["a red circle", "two blue squares"], "seeds": [0], "batch_size": 1}
    assert 1 <= len(found["trace"]) <= 2 and found["samplings"] == 1 + len(trace["evaluated"])
    assert all(None not in e["psnr"] and len(e["psnr"]) == 2 for e in trace["evaluated"])
    assert (root / "one" / "utility.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in (root / "one").iterdir() if p.name.endswith(".tmp")]


def test_two_gloo_processes_give_the_identical_schedule_and_trace(tiny):
    root, args = tiny
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run([*torchrun, "-m", "attnreuse", "search", *args, "--out", str(root / "two")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = json.loads((root / "two" / "schedule.json").read_text())
    assert two["processes"] == 2
    assert outcome(root / "two") == outcome(root / "one")


def test_killed_search_resumes_to_the_identical_result(tiny):
    root, args = tiny
    out = root / "killed"
    proc = subprocess.Popen(command(*args, "--out", str(out)), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    trace, done = out / "trace.json", 0
    deadline = time.time() + 120
    while done < 2 and proc.poll() is None and time.time() < deadline:  # kill after a few scored candidates
        time.sleep(0.02)
        if trace.exists():
            done = sum(None not in e["psnr"] for e in json.loads(trace.read_text())["evaluated"])
    assert proc.poll() is None, "the search ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "schedule.json").exists()
    assert json.loads(trace.read_text())["evaluated"]  # the last complete trace, never half a file
    cli(["search", *args, "--out", str(out), "--resume"])
    assert outcome(out) == outcome(root / "one")


def test_resume_from_a_partial_trace_and_with_more_rounds(tiny):
    """Scores dropped from a finished trace are sampled again and give the same result; a larger
    --max-rounds continues where the finished search stopped."""
    root, args = tiny
    out = root / "partial"
    out.mkdir()
    trace = json.loads((root / "one" / "trace.json").read_text())
    trace["evaluated"] = trace["evaluated"][:5]
    trace["evaluated"][-1]["psnr"][1] = None
    (out / "trace.json").write_text(json.dumps(trace))
    cli(["search", *args, "--out", str(out), "--resume"])
    assert outcome(out) == outcome(root / "one")
    shutil.copy(root / "one" / "trace.json", out / "trace.json")
    more = cli(["search", *args, "--max-rounds", "3", "--out", str(out), "--resume"])  # the last flag counts
    one = outcome(root / "one")[0]
    assert more["trace"][:len(one["trace"])] == one["trace"] and more["utility_db"] >= one["utility_db"]


def test_embedded_model_search(tmp_path):
    found = cli(["search", "--model", "embedded", "--steps", "6", "--reuse", "2", "--max-rounds", "1",
                 "--out", str(tmp_path)])
    assert found["model"] == "embedded" and found["calibration"]["prompts"] == [0, 2, 3, 5, 7, 8]
    assert found["resolution"] == [8, 8] and found["utility_db"] >= found["start_utility_db"]


def test_errors_are_one_line_before_any_work(tiny, tmp_path, capsys):
    root, args = tiny
    model, prompts = str(root / "tiny-sd"), str(root / "prompts.txt")
    out = tmp_path / "out"

    def error(*argv):
        return cli_error(["search", *argv], capsys)

    assert "no such folder" in error("--model", str(tmp_path / "nowhere"), "--prompts", prompts)
    (tmp_path / "empty").mkdir()
    assert "has no model_index.json" in error("--model", str(tmp_path / "empty"), "--prompts", prompts)
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "model_index.json").write_text("{not json")
    assert "cannot read model_index.json" in error("--model", str(tmp_path / "garbled"), "--prompts", prompts)
    (tmp_path / "no-unet").mkdir()
    (tmp_path / "no-unet" / "model_index.json").write_text(json.dumps(
        {"_class_name": "PixArtSigmaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]}))
    assert "PixArtSigmaPipeline without a UNet" in error("--model", str(tmp_path / "no-unet"), "--prompts", prompts)
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert "holds no prompt" in error("--model", model, "--prompts", str(tmp_path / "blank.txt"))
    assert "--prompts is required" in error("--model", model)
    assert "pass 1 ≤ --reuse < --steps" in error("--model", model, "--prompts", prompts, "--steps", "6", "--reuse", "6")
    (tmp_path / "a-file").write_text("")
    assert "is a file" in error("--model", model, "--prompts", prompts, "--out", str(tmp_path / "a-file"))
    assert "run without --resume" in error(*args, "--out", str(out), "--resume")
    assert not out.exists() or not any(out.iterdir())  # nothing written by a refused run
    assert "holds a search already" in error(*args, "--out", str(root / "one"))
    other_model = error("--model", "embedded", *SMALL, "--out", str(root / "one"), "--resume")
    assert "search with model" in other_model and "pass the same --model" in other_model
    other_length = error("--model", model, "--prompts", prompts, "--steps", "8", "--reuse", "2", "--out",
                         str(root / "one"), "--resume")
    assert "search with steps 6, not 8" in other_length and "pass the same --steps" in other_length
    assert "not a digit class" in error("--model", "embedded", "--prompts", prompts)
