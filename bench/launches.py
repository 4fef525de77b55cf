"""Every kernel launch that real SD1.5 512², SD2.1 768² and SDXL 1024² UNets make, compiled for GPUs that are not here.

    python bench/launches.py record --json launches.json [--arch sm_90a sm_89 sm_80]
    python bench/launches.py compile launches.json --json compiled.json     # under each Triton to check
    python bench/launches.py [--arch ...]                                   # both, in this interpreter

``record``: each public UNet config is built on the meta device, patched with ``attnreuse.patch`` and called once
as a capturing and once as a reusing step, at batch 1 and 2, in fp16 with fp16, bf16, fp8 and 4-bit maps and in
bf16 with bf16 maps (what ``cache_dtype=None`` gives a bf16 model). The package's own launchers run as on a GPU of
each target (configs by that target's rule, strides in 16-byte units, buffers laid out as allocated); each launch
is kept by what Triton's JIT specialises on (dtypes, pointer alignment, integers equal to 1, divisible by 16 or
64-bit), with the model calls that made it. ``compile``: each recorded launch compiled for its target with this
interpreter's Triton (and its ptxas), and its SASS read (:mod:`bench.sass`): registers, spills, the widths of the
map's and V's loads and stores, and registers read before anything wrote them (:mod:`bench.sass_dataflow`). Prints one line per kernel
and a summary; exits 1 on a compile error or an uninitialised read. tests/test_compiled_launches.py runs
``compile`` under the oldest and the newest supported Triton.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python bench/launches.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

ARCHS = {"sm_90a": 90, "sm_89": 89, "sm_80": 80}
MODELS = {"sd15": 512, "sd21": 768, "sdxl": 1024}
BATCHES = (1, 2)
MAP_FORMATS = {"float16": ("fp16", "bf16", "fp8", "fp4"), "bfloat16": ("bf16",)}
TEXT_TOKENS = 77


def _encode(value):
    """A launch argument as JSON: tensors by dtype (recorded 16-byte aligned), Triton dtypes by name."""
    import triton.language as tl
    if hasattr(value, "data_ptr"):
        if value.data_ptr() % 16:
            raise ValueError("a recorded tensor is not 16-byte aligned: the replay could not reproduce it")
        return {"tensor": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, tl.dtype):
        return {"tl": str(value)}
    return value


def _decode(value):
    import torch
    import triton.language as tl
    if isinstance(value, dict):
        if "tensor" in value:
            return torch.empty(1, dtype=getattr(torch, value["tensor"]), device="meta")
        return {"fp16": tl.float16, "bf16": tl.bfloat16}[value["tl"]]
    return value


@contextlib.contextmanager
def _recording(archs: list[int], found: dict, who: list):
    """Inside the block, tensors on the meta device take the kernels, and each kernel launch is made once per target
    in ``archs`` (the JIT targeting it) and recorded instead of run."""
    from triton.runtime import jit
    from triton.runtime.driver import driver

    from attnreuse.kernels import api, custom_ops, launchers
    from bench.sass import FakeDriver

    run = jit.JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        # the JIT's own binder says what it specialises on: one compiled kernel per (specialisation, options)
        binder = self.device_caches[driver.active.get_current_device()][-1]
        _, specialisation, options = binder(*args, **kwargs)
        arch = driver.active.get_current_target().arch
        key = (self.fn.__name__, arch, str(specialisation), str(sorted(options.items())))
        launch = found.setdefault(key, {"kernel": self.fn.__name__, "arch": arch, "args": [_encode(a) for a in args],
                                        "kwargs": {k: _encode(v) for k, v in kwargs.items()}, "made_by": []})
        launch["made_by"].append(who[0])

    def per_target(call):
        def each(*args, **kwargs):
            for arch in archs:
                driver.set_active(FakeDriver(arch))
                launchers._LAUNCHES.clear()  # launch constants follow the target's config rule
                launchers._EAGER.clear()
                result = call(*args, **kwargs)
            return result
        return each

    previous = driver._active
    originals = custom_ops.cached_pv, custom_ops.capture  # the eager calls api makes
    jit.JITFunction.run = record
    custom_ops.cached_pv, custom_ops.capture = map(per_target, originals)
    api.KERNEL_DEVICES.add("meta")
    try:
        yield
    finally:
        jit.JITFunction.run = run
        custom_ops.cached_pv, custom_ops.capture = originals
        driver._active = previous
        api.KERNEL_DEVICES.discard("meta")
        api._ROUTES.clear()  # meta tensors' routes were the kernels only in here
        launchers._LAUNCHES.clear()
        launchers._EAGER.clear()


def record(archs) -> list[dict]:
    """Every distinct launch of the public UNets (see the module docstring) for each target in ``archs``."""
    import torch
    from diffusers.utils import logging

    import attnreuse
    from attnreuse.architectures import build

    logging.set_verbosity_error()  # casting a meta UNet's dtype warns about modules kept in fp32: there are none
    found: dict[tuple, dict] = {}
    who = [""]
    with torch.no_grad(), _recording([ARCHS[a] for a in archs], found, who):
        for model, px in MODELS.items():
            unet = build(model, px, "meta")
            for dtype_name, fmts in MAP_FORMATS.items():
                dtype = getattr(torch, dtype_name)
                unet.to(dtype)
                for batch in BATCHES:
                    meta = dict(device="meta", dtype=dtype)
                    kwargs = dict(encoder_hidden_states=torch.empty(batch, TEXT_TOKENS,
                                                                    unet.config.cross_attention_dim, **meta))
                    if unet.config.addition_embed_type == "text_time":
                        kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(batch, 1280, **meta),
                                                       "time_ids": torch.empty(batch, 6, **meta)}
                    sample = torch.empty(batch, 4, px // 8, px // 8, **meta)
                    for fmt in fmts:
                        with attnreuse.patch(unet, "10", cache_dtype=fmt, plan="all") as handle, \
                                handle.generation(2) as gen:
                            for step, kind in enumerate(("capture", "reuse")):
                                who[0] = f"{model}@{px} b{batch} {dtype_name} {fmt} {kind}"
                                gen.hold(step)
                                unet(sample, 999, **kwargs)
    return list(found.values())


def compile_one(launch: dict) -> dict:
    """Compile one recorded launch for its target and read its SASS."""
    import triton
    from triton.runtime.driver import driver

    from attnreuse.kernels import triton_kernels
    from bench.sass import FakeDriver, analyse, disassemble
    from bench.sass_dataflow import uninitialised_reads

    arch = next(name for name, cc in ARCHS.items() if cc == launch["arch"])
    kwargs = {k: _decode(v) for k, v in launch["kwargs"].items()}
    row = dict(arch=arch, kernel=launch["kernel"], made_by=launch["made_by"],
               meta={k: str(v) for k, v in kwargs.items() if k.isupper() or k.startswith("num_")})
    fn = getattr(triton_kernels, launch["kernel"])
    previous = driver._active
    driver.set_active(FakeDriver(launch["arch"]))
    t0 = time.perf_counter()
    try:
        kernel = triton.runtime.jit.JITFunction.run(fn, *map(_decode, launch["args"]), grid=None, warmup=True,
                                                    **kwargs)
    except Exception as e:  # noqa: BLE001 (a compile failure is a finding, reported with its cause)
        row.update(error=f"{type(e).__name__}: {e}".replace("\n", " ")[:400], traceback=traceback.format_exc()[-3000:])
        return row
    finally:
        driver._active = previous
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    usage, sass = disassemble(kernel.asm["cubin"])
    a = analyse(usage, sass, kernel.metadata.shared)
    row.update(hash=kernel.hash, registers=a.registers, spill_bytes=a.spill_bytes, shared_bytes=a.shared_bytes,
               num_warps=kernel.metadata.num_warps, num_stages=kernel.metadata.num_stages,
               loads={k: {str(w): n for w, n in v.items()} for k, v in a.loads.items()},
               stores={k: {str(w): n for w, n in v.items()} for k, v in a.stores.items()},
               uninitialised_reads=[str(f) for f in uninitialised_reads(sass, kernel.asm["ptx"]) if f.kind != "undef"])
    return row


def compile_all(launches: list[dict], jobs: int = 1) -> list[dict]:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default; set, so it does not warn
    if jobs <= 1:
        return [compile_one(launch) for launch in launches]
    import concurrent.futures
    import multiprocessing
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(compile_one, launches, chunksize=4))


def summary(rows: list[dict]) -> tuple[str, bool]:
    import triton
    errors = [r for r in rows if "error" in r]
    reads = [r for r in rows if r.get("uninitialised_reads")]
    lines = []
    for r in rows:
        status = r.get("error") or (f"{len(r['uninitialised_reads'])} uninitialised reads: "
                                    f"{'; '.join(r['uninitialised_reads'][:2])}" if r["uninitialised_reads"] else "ok")
        more = f" +{len(r['made_by']) - 1}" if len(r["made_by"]) > 1 else ""
        widths = " ".join(f"{op} {min(map(int, r.get(kind, {}).get(op, {'0': 0})))}B"
                          for kind, op in (("loads", "map"), ("stores", "map"), ("loads", "V")) if op in r.get(kind, {}))
        lines.append(f"{r['arch']:7} {r['kernel']:16} d={r['meta'].get('HEAD_DIM', '?'):>3} "
                     f"{r.get('registers', '-'):>3} regs {r.get('spill_bytes', '-'):>4} B spilled  {widths:24} "
                     f"{status}  [{r['made_by'][0]}{more}]")
    lines.append(f"Triton {triton.__version__}: {len(rows)} distinct launches compiled, {len(errors)} compile errors, "
                 f"{len(reads)} with uninitialised reads")
    return "\n".join(lines), not errors and not reads


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="?", choices=("record", "compile"), help="one half (default: both)")
    ap.add_argument("launches", nargs="?", help="compile: the JSON that record wrote")
    ap.add_argument("--arch", nargs="+", choices=list(ARCHS), default=list(ARCHS), help="record: targets")
    ap.add_argument("--jobs", type=int, default=1, help="compile: processes")
    ap.add_argument("--json", help="write the launches (record) or the compiled rows here")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: this compiles for GPU targets")
    if args.command == "compile" and not args.launches:
        ap.error("compile needs the JSON file record wrote")
    if args.command == "compile":
        launches = json.loads(Path(args.launches).read_text())["launches"]
    else:
        launches = record(args.arch)
    if args.command == "record":
        print(f"{len(launches)} distinct launches recorded for {', '.join(args.arch)}")
        result = dict(launches=launches)
        clean = True
    else:
        import triton
        rows = compile_all(launches, args.jobs)
        text, clean = summary(rows)
        print(text)
        result = dict(triton=triton.__version__, rows=rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
