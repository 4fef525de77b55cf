"""Runs bench/launches.py for tests/test_compiled_launches.py: record every launch once, then compile them under the
newest Triton (this environment's) and the oldest supported one at the same time, each in its own process.

It takes minutes of CPU, so tests/conftest.py starts it in a background thread as soon as that test module is
collected: the compiling processes then run beside the other tests instead of after them. The oldest Triton is
installed once per machine into a folder of its own (``pip install --target``), or taken from
``$ATTNREUSE_OLDEST_TRITON``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OLDEST_TRITON = "3.6.0"  # what torch 2.11 brings: setup.py's floor
TIMEOUT = 1800  # seconds per subprocess


def oldest_triton() -> Path:
    """A folder that holds the oldest supported Triton, for the front of PYTHONPATH."""
    if os.environ.get("ATTNREUSE_OLDEST_TRITON"):
        return Path(os.environ["ATTNREUSE_OLDEST_TRITON"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = cache / "attnreuse" / f"triton-{OLDEST_TRITON}"
    if not (folder / "triton" / "__init__.py").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent))
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(staging),
                               f"triton=={OLDEST_TRITON}"], capture_output=True, text=True)
        if proc.returncode:
            shutil.rmtree(staging, ignore_errors=True)
            raise RuntimeError(f"could not install triton=={OLDEST_TRITON} (pip: {proc.stderr[-500:]}); set "
                               "ATTNREUSE_OLDEST_TRITON to a folder made with pip install --target DIR "
                               f"triton=={OLDEST_TRITON}")
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    return folder


def _env(tmp: Path, name: str, pythonpath: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for real GPU targets
    env["TRITON_CACHE_DIR"] = str(tmp / f"cache-{name}")  # fresh: every kernel compiled by this Triton
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), str(ROOT), env.get("PYTHONPATH", "")])
    return env


class Matrix:
    """The launches and each Triton's compiled rows, made in a thread (``wait`` for them)."""

    def __init__(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="attnreuse-launches-"))
        self.procs: list[subprocess.Popen] = []
        self.error: BaseException | None = None
        self.launches: list[dict] = []
        self.results: dict[str, dict] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            import triton
            launches = self.tmp / "launches.json"
            proc = subprocess.run([sys.executable, "bench/launches.py", "record", "--json", str(launches)], cwd=ROOT,
                                  env=_env(self.tmp, "record"), capture_output=True, text=True, timeout=TIMEOUT)
            if proc.returncode:
                raise RuntimeError(f"bench/launches.py record failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
            tritons = {triton.__version__: None}
            if triton.__version__ != OLDEST_TRITON:
                tritons[OLDEST_TRITON] = oldest_triton()
            procs = {version: subprocess.Popen(
                [sys.executable, "bench/launches.py", "compile", str(launches), "--json",
                 str(self.tmp / f"compiled-{version}.json")], cwd=ROOT, env=_env(self.tmp, version, path),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for version, path in tritons.items()}
            self.procs = list(procs.values())
            for version, proc in procs.items():
                printed, _ = proc.communicate(timeout=TIMEOUT)
                found = self.tmp / f"compiled-{version}.json"
                if not found.exists():
                    raise RuntimeError(f"bench/launches.py compile under Triton {version} wrote nothing:\n"
                                       f"{printed[-3000:]}")
                self.results[version] = {**json.loads(found.read_text()), "printed": printed}
            self.launches = json.loads(launches.read_text())["launches"]
        except BaseException as e:  # noqa: BLE001 (the test that waits reports it)
            self.error = e

    def wait(self) -> tuple[list[dict], dict[str, dict]]:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.launches, self.results

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


_MATRIX: Matrix | None = None


def start() -> Matrix:
    global _MATRIX
    if _MATRIX is None:
        _MATRIX = Matrix()
    return _MATRIX


def stop() -> None:
    if _MATRIX is not None:
        _MATRIX.stop()
