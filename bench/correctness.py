"""The correctness matrix on a GPU: every shipped attention shape class x map format x activation dtype, each case in
a process of its own, so that an illegal memory access names its case and spares the rest.

    python bench/correctness.py --out DIR [--tree PATH ...] [--jobs 8]   # every case of every tree, then a table
    python bench/correctness.py --case NAME [--tree PATH]               # one case, in this process (JSON line)
    python bench/correctness.py --list

Cases: the attention shapes the kernels take in SD1.5 512², SD2.1 768² and SDXL 1024² UNets (self-attention and
77-key cross-attention at each level, batch 2) and a ragged one (1000 queries x 333 keys), with fp16 activations
and fp16, bf16, fp8 and 4-bit maps, and with bf16 activations and bf16, fp8 and 4-bit maps for SD1.5's shapes and
the ragged one. A case runs through the public API of the tree under test (``attnreuse.kernels.capture`` and
``cached_pv`` with ``backend="triton"``), so the landed tree and this one run side by side
(``--tree .baseline --tree .``); with ``CUDA_LAUNCH_BLOCKING=1``. It measures, against float64 attention on the
first 256 and the last 128 query rows of every head: the capture's output; ``cached_pv`` over the capture's own
map with fresh values (the map as stored); ``cached_pv`` over a map the PyTorch path encoded (the reuse
kernel alone); and a second capture and its map's ``cached_pv``, which (in a tree that has it) take the direct
launch path a checked, compiled launch shape takes: the map passed as addresses into its one buffer. A tree with first-use checks (:mod:`attnreuse.kernels.selfcheck`) runs its kernels raw here, the
check only reporting whether it would have caught the variant. A case is clean (finite, within the format's
bound), wrong, crashed (the process died: an illegal address, a timeout) or failed (a Python error, e.g. a
compile error). ``--smoke`` runs the script itself on a CPU, the kernels in Triton's interpreter.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"sd15": 512, "sd21": 768, "sdxl": 1024}
RAGGED = ("ragged", (2, 4, 1000, 333, 64))
FP16_MAPS, BF16_MAPS = ("fp16", "bf16", "fp8", "fp4"), ("bf16", "fp8", "fp4")
BOUND = {"fp16": 1e-2, "bf16": 2e-2, "fp8": 6e-2, "fp4": 0.25}  # max error / max |reference|; broken kernels: ~1, NaN
OUTPUT_BOUND = 2e-2  # capture's output, any map format
ROWS = (256, 128)  # the first and the last query rows compared


def shapes() -> dict[str, tuple]:
    """``{name: (batch, heads, q tokens, kv tokens, head dim)}`` of the kernels' shape classes."""
    sys.path.insert(0, str(ROOT))
    from attnreuse.architectures import attention_shapes
    from attnreuse.kernels.tuning import MAX_HEAD_DIM
    out = {}
    for model, px in MODELS.items():
        for shape in attention_shapes(model, px):
            b, h, nq, nk, d = shape
            if d <= MAX_HEAD_DIM:
                out[f"{model}_{int(nq ** 0.5)}_{'cross' if nk != nq else 'self'}_d{d}"] = shape
    out[RAGGED[0]] = RAGGED[1]
    return out


def cases() -> dict[str, tuple]:
    """``{case name: (shape, map format, activation dtype)}``."""
    out = {}
    for name, shape in shapes().items():
        for fmt in FP16_MAPS:
            out[f"{name}/{fmt}/fp16"] = (shape, fmt, "float16")
        if name.startswith("sd15") or name == RAGGED[0]:
            for fmt in BF16_MAPS:
                out[f"{name}/{fmt}/bf16"] = (shape, fmt, "bfloat16")
    return out


def _kernels(tree: Path):
    """``attnreuse.kernels`` of ``tree``, without importing the package around it (diffusers: seconds per case)."""
    package = types.ModuleType("attnreuse")
    package.__path__ = [str(tree / "attnreuse")]
    sys.modules["attnreuse"] = package
    spec = importlib.util.spec_from_file_location("attnreuse.kernels", tree / "attnreuse" / "kernels" / "__init__.py",
                                                  submodule_search_locations=[str(tree / "attnreuse" / "kernels")])
    kernels = importlib.util.module_from_spec(spec)
    sys.modules["attnreuse.kernels"] = kernels
    spec.loader.exec_module(kernels)
    return kernels


def run_case(name: str, shape: tuple, fmt: str, dtype: str, tree: Path, smoke: bool = False) -> dict:
    """One case; ``smoke``: on the CPU at a sixteenth of the tokens (this script's own test), the kernels in
    Triton's interpreter where the tree lets CPU tensors take them, else the PyTorch path."""
    import torch
    kernels = _kernels(tree)
    device, backend = ("cpu", "torch") if smoke else ("cuda", "triton")
    if smoke and hasattr(kernels.api, "KERNEL_DEVICES"):
        kernels.api.KERNEL_DEVICES.add("cpu")
        kernels.api.backend_available = lambda: True
        backend = "triton"
    if smoke:
        shape = (*shape[:2], max(1, shape[2] // 16), max(1, shape[3] // 16) if shape[3] != 77 else 77, shape[4])
    checks = []
    try:
        from attnreuse.kernels import selfcheck
    except ImportError:
        selfcheck = None
    if selfcheck is not None:  # the kernels raw; what the first-use check says, on the side
        def raw(launch, tensors, aligned, check, reference):
            launch(tensors, aligned)
            errors = check() or {}
            checks.append({"variant": str(launch.variant), "caught": not all(e <= a for e, a in errors.values())})
            if hasattr(launch, "ready"):  # later calls of the shape launch it directly, on addresses, as checked ones do
                launch.ready = launch.compiled is not None
        selfcheck.run = raw
    b, h, nq, nk, d = shape
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, v2 = (torch.randn(b, n, h * d, device=device, generator=g, dtype=getattr(torch, dtype))
                   for n in (nq, nk, nk, nk))
    rows = torch.cat([torch.arange(min(ROWS[0], nq)), torch.arange(max(0, nq - ROWS[1]), nq)]).unique().to(device)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    split = lambda x: x.double().unflatten(-1, (h, d)).transpose(1, 2)  # noqa: E731  [B, N, H·D] -> [B, H, N, D]
    probs = (split(q[:, rows]) @ split(k).transpose(-1, -2) * d ** -0.5).softmax(-1)
    merge = lambda x: x.transpose(1, 2).flatten(2)  # noqa: E731

    def err(got, ref) -> float:
        got = got.double()
        return float("nan") if not torch.isfinite(got).all() else ((got - ref).abs().max() / ref.abs().max()).item()

    result = {"case": name, "tree": str(tree), "shape": list(shape)}
    stage = "capture"
    try:
        for again in ("", "_again"):  # the second round takes the direct launch path of a checked, compiled shape
            stage = f"capture{again}"
            out, cmap = kernels.capture(q, k, v, h, d ** -0.5, fmt, backend=backend)
            sync()
            result[f"capture{again}_err"] = err(out[:, rows], merge(probs @ split(v)))
            stage = f"cached_pv of the captured map{again}"
            result[f"captured_map{again}_err"] = err(kernels.cached_pv(cmap, v2, h, backend=backend)[:, rows],
                                                     merge(probs @ split(v2)))
            sync()
        stage = "cached_pv of a reference map"
        ref_map = kernels.CachedMap.from_probs(probs, fmt)
        result["cached_pv_err"] = err(kernels.cached_pv(ref_map, v2, h, backend=backend), merge(probs @ split(v2)))
        sync()
    except Exception as e:  # noqa: BLE001 (an exception is this case's finding)
        result.update(failed=f"{stage}: {type(e).__name__}: {e}".replace("\n", " ")[:300])
    bound = BOUND[fmt]
    wrong = [key for key, limit in (("capture_err", OUTPUT_BOUND), ("captured_map_err", bound),
                                    ("cached_pv_err", bound), ("capture_again_err", OUTPUT_BOUND),
                                    ("captured_map_again_err", bound))
             if key in result and not result[key] <= limit]
    result["status"] = "failed" if "failed" in result else "wrong" if wrong else "clean"
    result["wrong"] = wrong
    if selfcheck is not None:
        result["selfcheck_caught"] = [c["variant"] for c in checks if c["caught"]]
    return result


def _one(name: str, spec: tuple, tree: Path, out: Path, timeout: int, smoke: bool) -> dict:
    env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1", "PYTHONUNBUFFERED": "1"}
    if smoke:
        env["TRITON_INTERPRET"] = "1"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--case", name, "--spec", json.dumps(spec), "--tree",
                               str(tree)] + ["--smoke"] * smoke, env=env, capture_output=True, text=True,
                              timeout=timeout)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
            "case": name, "tree": str(tree), "status": "crashed",
            "crash": f"exit {proc.returncode}: " + (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]}
    except subprocess.TimeoutExpired:
        result = {"case": name, "tree": str(tree), "status": "crashed", "crash": f"timeout after {timeout} s"}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    with (out / "cases.jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")
    return result


def table(results: list[dict]) -> str:
    lines = ["| tree | cases | clean | wrong | crashed | failed |", "|---|---|---|---|---|---|"]
    for tree in dict.fromkeys(r["tree"] for r in results):
        mine = [r for r in results if r["tree"] == tree]
        count = lambda s: sum(r["status"] == s for r in mine)  # noqa: E731
        lines.append(f"| {tree} | {len(mine)} | {count('clean')} | {count('wrong')} | {count('crashed')} | "
                     f"{count('failed')} |")
    bad = [r for r in results if r["status"] != "clean"]
    for r in bad[:40]:
        detail = r.get("crash") or r.get("failed") or ", ".join(f"{k} {r[k]:.3g}" for k in r["wrong"])
        lines.append(f"{r['tree']}: {r['case']}: {r['status']} ({detail})")
    if len(bad) > 40:
        lines.append(f"... {len(bad) - 40} more in cases.jsonl")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", help="run this one case here and print its result as a JSON line")
    ap.add_argument("--spec", help="with --case: [shape, map format, activation dtype] (the parent passes it)")
    ap.add_argument("--list", action="store_true", help="print the case names")
    ap.add_argument("--tree", action="append", type=Path, help="a source tree to test (default: this one)")
    ap.add_argument("--out", type=Path, default=Path("out/correctness"), help="cases.jsonl and table.md go here")
    ap.add_argument("--jobs", type=int, default=8, help="cases at a time (each its own process)")
    ap.add_argument("--timeout", type=int, default=120, help="seconds per case")
    ap.add_argument("--smoke", action="store_true", help="this script's own check on a CPU: a sixteenth of the tokens, "
                                                         "the kernels in Triton's interpreter")
    ap.add_argument("--only", nargs="+", help="these cases only")
    args = ap.parse_args(argv)
    trees = [t.resolve() for t in (args.tree or [ROOT])]
    if args.list:
        print("\n".join(cases()))
        return 0
    if args.case:
        shape, fmt, dtype = json.loads(args.spec) if args.spec else cases()[args.case]
        print(json.dumps(run_case(args.case, tuple(shape), fmt, dtype, trees[0], args.smoke)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cases.jsonl").unlink(missing_ok=True)
    known = cases()
    unknown = sorted(set(args.only or ()) - set(known))
    if unknown:
        ap.error(f"--only {' '.join(unknown)}: no such case (python bench/correctness.py --list)")
    todo = [(name, spec, tree) for tree in trees for name, spec in known.items() if not args.only or name in args.only]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda c: _one(*c, args.out, args.timeout, args.smoke), todo))
    text = table(results)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return 0 if all(r["status"] == "clean" for r in results if r["tree"] == str(trees[-1])) else 1


if __name__ == "__main__":
    sys.exit(main())
