"""Packaging: the installed wheel coexists with Hugging Face's ``kernels``; the bench scripts run both ways."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH_SCRIPTS = ["e2e", "fidelity", "kernel_table", "quality"]


def run(args, cwd, timeout=300):
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert proc.returncode == 0, f"{' '.join(map(str, args))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def skip_outputs(folder, names) -> set[str]:
    """What a build of the tree does not read: VCS data, build and test outputs, virtualenvs."""
    skip = {".git", "build", "dist", "out", "__pycache__", ".pytest_cache", ".benchmarks"}
    return {n for n in names if n in skip or n.endswith(".egg-info") or (Path(folder, n, "pyvenv.cfg")).exists()}


def test_wheel_installs_beside_hugging_face_kernels(tmp_path):
    # a copy of the tree, so that the build's egg-info and build/ never land in the working tree
    src = shutil.copytree(ROOT, tmp_path / "src", ignore=skip_outputs)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "wheels", src], tmp_path)
    (wheel,) = (tmp_path / "wheels").glob("attnreuse-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "attnreuse/kernels/__init__.py" in names and "attnreuse/measured.json" in names
    assert not [n for n in names if n.split("/")[0] == "kernels" or n == "kernels.py"]
    (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["attnreuse"]

    # torch, diffusers and the rest come from this interpreter's environment, not from a download
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", venv], tmp_path)
    python = venv / "bin" / "python"
    purelib = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path).strip())
    if sys.prefix != sys.base_prefix:  # pytest runs in a virtualenv: --system-site-packages alone skips its packages
        (purelib / "outer.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", wheel], tmp_path)
    # Hugging Face's kernels may already be there (transformers depends on it): install it only if it is not
    has_theirs = run([python, "-c", "import importlib.util as u; print(u.find_spec('kernels') is not None)"], tmp_path)
    if has_theirs.split()[-1] != "True":
        run([python, "-m", "pip", "install", "-q", "kernels"], tmp_path)

    probe = ("import json, importlib.metadata as md, attnreuse.kernels, kernels; "
             "print(json.dumps({'ours': attnreuse.kernels.__file__, 'theirs': kernels.__file__, "
             "'theirs_listed': str(md.distribution('kernels').locate_file('kernels/__init__.py')), "
             "'get_kernel': callable(getattr(kernels, 'get_kernel', None)), "
             "'files': [str(f) for f in md.distribution('attnreuse').files]}))")
    found = json.loads(run([python, "-c", probe], tmp_path).splitlines()[-1])
    assert Path(found["ours"]).is_relative_to(purelib / "attnreuse")  # the installed copy, not the tree
    # `import kernels` is Hugging Face's package, the file its own distribution installed, wherever that is
    assert Path(found["theirs"]).resolve() == Path(found["theirs_listed"]).resolve() and found["get_kernel"]
    assert "attnreuse" not in Path(found["theirs"]).parts
    assert not [f for f in found["files"] if f.split("/")[0] == "kernels"]


@pytest.mark.parametrize("form", ["file", "module"])
@pytest.mark.parametrize("script", BENCH_SCRIPTS)
def test_bench_script_runs_as_file_and_module(script, form):
    # with peft installed, diffusers imports transformers, which imports any module named `kernels` it finds
    # on sys.path: running bench/X.py puts bench/ first there
    assert importlib.util.find_spec("peft"), "peft is in the test extra: pip install -e '.[test]'"
    args = [f"bench/{script}.py"] if form == "file" else ["-m", f"bench.{script}"]
    assert "usage:" in run([sys.executable, *args, "--help"], ROOT)
