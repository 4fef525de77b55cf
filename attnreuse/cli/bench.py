"""``python -m attnreuse bench``: a schedule on your checkpoint and device.

Per UNet call: a computing step (the unpatched UNet), a capturing step (computes and stores the maps) and a
reusing step with every layer reusing, replayed as CUDA graphs on a GPU (``handle.generation`` / ``gen.hold``,
as ``bench/e2e.py`` does). The default plan (``plan="measured"``): every layer's decision and its per-call
costs, and the reuse step's ρ = reusing / computing call predicted from them and measured, eager and under
CUDA graphs side by side (graphed on a GPU only). Per generation of one calibration batch (the default
plan): the full sampler, the schedule, and the full sampler with as many steps as fit in the schedule's time.
PSNR of each against the full sampler on the whole calibration set. Writes OUT/report.md, OUT/report.json
and OUT/grid.png; ``--update-measured`` records ρ = reuse (fp8 maps, every layer) / computing step in
``attnreuse/measured.json``'s form.
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
from pathlib import Path

import diffusers
import torch

import attnreuse
from attnreuse import measured
from attnreuse.config import as_cache_dtype, resolve_format
from attnreuse.costs import MODES, entry_key, measure_costs
from attnreuse.kernels import storage_nbytes
from attnreuse.phast import psnr
from attnreuse.planner import LayerPlan, layer_shapes
from attnreuse.schedule import actions, as_schedule, step_counts, to_string
from attnreuse.steps import capture_and_reuse, predicted_rho, step_times
from attnreuse.timing import graphed, median_ms, wall_ms

from . import files
from .figures import image_grid
from .models import EMBEDDED, Model, model_key
from .options import (UsageError, add_model_arguments, check_model, check_out_dir, check_sampling, device_and_dtype,
                      fail, load_model)
from .world import World

GRID_COLUMNS = 8
CPU_NOTE = ("CPU: eager PyTorch timings, no CUDA graphs and no Triton kernels; attention is a small share of a "
            "step here, so they do not show what a GPU gains. The PSNR columns hold on any device.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m attnreuse bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, defaults_from="what --schedule was searched with")
    p.add_argument("--schedule", required=True, metavar="SCHEDULE_JSON",
                   help="the schedule.json python -m attnreuse search wrote")
    p.add_argument("--out", default="attnreuse_bench", metavar="DIR",
                   help="folder for report.md, report.json and grid.png, created if missing (default: %(default)s)")
    p.add_argument("--reps", type=int, metavar="N", help="timed repetitions per figure, after one warm-up "
                                                         "(default: 10 on a GPU, 3 on a CPU)")
    p.add_argument("--update-measured", nargs="?", const=str(measured.FIGURES), metavar="MEASURED_JSON",
                   help="record this card's ρ (reuse step with fp8 maps / computing step, CUDA graphs) in "
                        "attnreuse/measured.json, or in the file given; GPU only")
    return p


def read_schedule(path: str) -> dict:
    fix = "pass the schedule.json that python -m attnreuse search wrote"
    try:
        found = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--schedule {path}: no such file", fix) from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"--schedule {path}: cannot read it ({e})", fix) from None
    try:
        schedule = as_schedule(found["schedule"])
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"--schedule {path} holds no valid schedule ({e})", fix) from None
    if 0 not in schedule:
        raise UsageError(f"--schedule {path}: {to_string(schedule)} reuses no step", "pass a schedule with reuse steps")
    return found


def check(args):
    """Arguments checked, defaults taken from the schedule file, the model loaded."""
    if World().size > 1:
        raise UsageError("bench measures one device", "run it without torchrun or accelerate launch")
    found = read_schedule(args.schedule)
    check_model(args.model)
    embedded = args.model == EMBEDDED
    same_kind = (found.get("model") == EMBEDDED) == embedded  # digit classes are no text prompts, and back
    stored = found.get("calibration", {}) if same_kind else {}
    for name, value in (("scheduler", found.get("scheduler")), ("cache_dtype", found.get("cache_dtype")),
                        ("guidance", found.get("guidance")), ("seeds", stored.get("seeds")),
                        ("batch_size", stored.get("batch_size"))):
        if getattr(args, name) is None and value is not None:
            setattr(args, name, value)
    if args.resolution is None and same_kind and found.get("resolution") and model_key(args.model) == found.get("model"):
        args.resolution = "x".join(map(str, found["resolution"]))
    calibration, resolution = check_sampling(args, embedded, prompts=stored.get("prompts"))
    if args.reps is not None and args.reps < 1:
        raise UsageError(f"--reps {args.reps}", "pass 1 or more repetitions")
    out = check_out_dir(Path(args.out).expanduser())
    if args.update_measured is not None:
        if not torch.cuda.is_available():
            raise UsageError("--update-measured needs a GPU: ρ is a CUDA-graph measurement",
                             "run bench on a GPU, or drop --update-measured")
        target = Path(args.update_measured)
        try:
            json.loads(target.read_text())["rho"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"--update-measured {target}: not a measured.json ({e})",
                             "pass attnreuse/measured.json or a copy of it") from None
        if not os.access(target.parent, os.W_OK):  # an installed package's folder may be read-only
            raise UsageError(f"--update-measured {target}: its folder is not writable",
                             "pass a writable copy: --update-measured my_measured.json")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create it ({e.strerror})", "pass a writable folder") from None
    device, dtype = device_and_dtype(args)
    model = load_model(args, device, dtype, resolution)
    return found, calibration, model, out


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


class FirstCall:
    """The inputs of the first UNet call while installed: what the step timings replay."""

    def __init__(self, unet):
        self.args = self.kwargs = None
        self.params = list(inspect.signature(type(unet).forward).parameters)[1:]
        self._hook = unet.register_forward_pre_hook(self._grab, with_kwargs=True)

    def _grab(self, module, args, kwargs):
        if self.args is None:
            self.args, self.kwargs = _clone(args), _clone(kwargs)

    def argument(self, name: str):
        if name in self.kwargs:
            return self.kwargs[name]
        i = self.params.index(name)
        return self.args[i] if i < len(self.args) else None

    def sample_and_context(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sample, encoder_hidden_states)`` of the call: what a plan is made for."""
        return self.argument(self.params[0]), self.argument("encoder_hidden_states")

    def remove(self):
        self._hook.remove()


class StepTimer:
    """Milliseconds of one UNet call as the UNet is now patched; CUDA-graph replay where capture works (``graphs``:
    on a GPU unless False), else eager: wall time, device synchronised around the call."""

    def __init__(self, model: Model, inputs: FirstCall, reps: int, graphs: bool | None = None):
        self.unet, self.inputs, self.reps, self.device = model.unet, inputs, reps, model.device
        self.graphs = self.device.type == "cuda" and graphs is not False
        self.note = None

    @torch.no_grad()
    def call(self):
        return self.unet(*self.inputs.args, **self.inputs.kwargs)

    def ms(self) -> float:
        if self.graphs:
            try:
                graph = graphed(self.call)
                return median_ms(graph.replay, self.device, self.reps)
            except RuntimeError as e:  # e.g. inputs on the host: the rest is timed eagerly
                self.graphs = False
                self.note = f"CUDA-graph capture failed ({str(e).splitlines()[0][:200]}): eager step timings"
        return wall_ms(self.call, self.device, calls=1, reps=self.reps)

    def steps(self, cache_dtype) -> dict:
        """A computing (unpatched), capturing and reusing step with ``cache_dtype`` maps."""
        compute = self.ms()
        capture, reuse, nbytes = capture_and_reuse(self.unet, self.ms, cache_dtype)
        return {"compute": compute, "capture": capture, "reuse": reuse, "rho": reuse / compute, "cache_bytes": nbytes}


def _unplanned(model: Model, inputs: FirstCall, schedule, cache_dtype) -> list[LayerPlan]:
    """The default plan off a GPU, where there is no cost table: every layer reuses. Its costs, for the
    prediction only, are timed here (eager, kept nowhere)."""
    unet, device = model.unet, model.device
    sample, context = inputs.sample_and_context()
    names = [n for n, m in unet.named_modules() if type(m).__name__ == "Attention"]
    shapes = layer_shapes(unet, names, tuple(sample.shape), context.shape[1])
    fmt = resolve_format(as_cache_dtype(cache_dtype), sample.dtype)
    table = measure_costs(shapes.values(), [fmt], device, sample.dtype, modes=("eager",), persist=False)
    counts = step_counts(actions(schedule))
    plan = []
    for name, shape in shapes.items():
        cost = table[entry_key(shape, fmt, sample.dtype, "auto", "eager")]
        saving = counts.reuse * (cost.compute - cost.reuse) - counts.capture * (cost.capture - cost.compute)
        plan.append(LayerPlan(name, True, fmt, storage_nbytes(shape.batch, shape.heads, shape.q_tokens,
                                                              shape.kv_tokens, fmt), saving,
                              f"no cost table on {device.type}: every selected layer reuses", cost=cost,
                              considered=fmt, n_reuse=counts.reuse, n_capture=counts.capture, mode="eager"))
    return plan


def _layer_row(p: LayerPlan) -> dict:
    c = p.cost
    return {"name": p.name, "reuse": p.reuse, "format": p.format.name if p.format is not None else None,
            "compute_ms": c.compute if c else None, "capture_ms": c.capture if c else None,
            "reuse_ms": c.reuse if c else None, "saving_ms": p.net_ms, "reason": p.reason}


def plan_report(model: Model, inputs: FirstCall, schedule, cache_dtype, reps: int) -> dict:
    """The default plan per mode (eager; graphed on a GPU): every layer's decision, the computing, capturing and
    reusing call, and ρ = reusing / computing call predicted by the plan's costs and measured."""
    counts = step_counts(actions(schedule))
    out = {"reuse_steps": counts.reuse, "capture_steps": counts.capture}
    for mode in MODES:
        if mode == "graphed" and model.device.type != "cuda":
            out[mode] = {"available": False, "note": f"CUDA graphs need a CUDA GPU: not available on "
                                                     f"{model.device.type}"}
            continue
        timer = StepTimer(model, inputs, reps, graphs=mode == "graphed")
        compute = timer.ms()
        if mode == "graphed" and not timer.graphs:
            out[mode] = {"available": False, "note": timer.note}
            continue
        r = step_times(model.unet, timer.ms, schedule, inputs=inputs.sample_and_context(), mode=mode,
                       cache_dtype=cache_dtype)
        plan, note = r["plan"], None
        if plan is None:
            plan = _unplanned(model, inputs, schedule, cache_dtype)
            note = (f"{model.device.type}: no cost table, so the default plan reuses every layer; the prediction "
                    "uses layer costs bench timed here (eager)")
        out[mode] = {"available": True, "note": note, "compute_ms": compute, "capture_ms": r["capture"],
                     "reuse_ms": r["reuse"], "cache_bytes": r["cache_bytes"],
                     "reusing_layers": sum(p.reuse for p in plan), "layers": [_layer_row(p) for p in plan],
                     "predicted_rho": predicted_rho(plan, compute), "measured_rho": r["reuse"] / compute}
    return out


def sample_all(model: Model, batches, steps: int) -> torch.Tensor:
    return torch.cat([model.sample(b, steps).cpu() for b in batches])


def run(args, found: dict, calibration, model: Model, out: Path) -> dict:
    schedule = as_schedule(found["schedule"])
    n, r = len(schedule), schedule.count(0)
    cuda = model.device.type == "cuda"
    reps = args.reps or (10 if cuda else 3)
    batches = calibration.batches()
    first = batches[0]
    notes = [] if cuda else [CPU_NOTE]

    inputs = FirstCall(model.unet)
    reference = sample_all(model, batches, n)  # the full sampler; its first UNet call is the one timed below
    inputs.remove()
    with attnreuse.patch(model.pipe, schedule, cache_dtype=args.cache_dtype):
        patched = sample_all(model, batches, n)
        patched_ms = median_ms(lambda: model.sample(first, n), model.device, reps)
    full_ms = median_ms(lambda: model.sample(first, n), model.device, reps)
    fewer = max(1, min(n, math.floor(patched_ms / (full_ms / n))))  # the most full steps in the schedule's time
    fewer_images = sample_all(model, batches, fewer)
    fewer_ms = median_ms(lambda: model.sample(first, fewer), model.device, reps)

    timer = StepTimer(model, inputs, reps)
    steps = timer.steps(args.cache_dtype)
    default_plan = plan_report(model, inputs, schedule, args.cache_dtype, reps)
    fp8 = steps if args.cache_dtype == "fp8" else None
    if args.update_measured is not None and fp8 is None:
        fp8 = timer.steps("fp8")
    if timer.note:
        notes.append(timer.note)
    card = torch.cuda.get_device_name(model.device) if cuda else "cpu"
    per_image = {"schedule": psnr(patched, reference), "fewer_steps": psnr(fewer_images, reference)}
    report = {
        "device": card, "step_timing": "CUDA graphs" if timer.graphs else "eager",
        **model.describe(), "scheduler": args.scheduler, "cache_dtype": args.cache_dtype,
        "schedule": to_string(schedule), "steps": n, "reuse": r, "batch": len(first),
        "calibration_images": len(reference), "reps": reps,
        "step_ms": steps, "default_plan": default_plan,
        "generation_ms": {"full": full_ms, "schedule": patched_ms, "fewer_steps": fewer_ms},
        "fewer_steps": fewer,
        "psnr_db": {k: v.mean().item() for k, v in per_image.items()},
        "psnr_per_image_db": {k: v.tolist() for k, v in per_image.items()},
        "notes": notes, "date": datetime.date.today().isoformat(), "version": attnreuse.__version__,
        "torch": torch.__version__, "diffusers": diffusers.__version__,
    }
    text = markdown(report)
    files.write_json(out / "report.json", report)
    files.write_text(out / "report.md", text)
    k = min(GRID_COLUMNS, len(reference))
    rows = [reference[:k], patched[:k], fewer_images[:k]]
    labels = [f"full, {n} steps\n{full_ms:.0f} ms", f"schedule, {r} reuse\n{patched_ms:.0f} ms, "
              f"{report['psnr_db']['schedule']:.1f} dB", f"{fewer} steps\n{fewer_ms:.0f} ms, "
              f"{report['psnr_db']['fewer_steps']:.1f} dB"]
    files.write_png(out / "grid.png", image_grid(rows, labels, f"{Path(model.name).name}, {card}: "
                                                               f"{to_string(schedule)} against the full sampler"))
    if args.update_measured is not None:
        entry = measured_entry(report, fp8, model, card)
        update_measured(args.update_measured, entry)
        print(f"ρ = {entry['rho']} for {card} {entry['arch']} {entry['px']}² -> {args.update_measured}")
    print(text, flush=True)
    print(f"wrote {out / 'report.md'}, report.json, grid.png")
    return report


def markdown(report: dict) -> str:
    s, g, q = report["step_ms"], report["generation_ms"], report["psnr_db"]
    n, full = report["steps"], g["full"]
    lines = [
        f"# {report['schedule']} on {report['model']}", "",
        f"{report['device']}; {report['pipeline']}, {report['scheduler_class']}, {n} steps, "
        f"{report['resolution'][0]}x{report['resolution'][1]}, {report['dtype']}, maps "
        f"{report['cache_dtype'] or 'in the model dtype'}; attnreuse {report['version']}, torch {report['torch']}, "
        f"diffusers {report['diffusers']}, {report['date']}.", "",
        f"One UNet call, every layer reusing ({report['step_timing']}, median of {report['reps']}):", "",
        "| step | ms |", "|---|---|",
        f"| computing | {s['compute']:.2f} |", f"| capturing (computes and stores the maps) | {s['capture']:.2f} |",
        f"| reusing | {s['reuse']:.2f} |", f"| ρ = reusing / computing | {s['rho']:.3f} |", "",
        *plan_markdown(report["default_plan"]),
        f"Whole generation of {report['batch']} image(s) (median of {report['reps']}); PSNR against the full "
        f"sampler on {report['calibration_images']} calibration image(s):", "",
        "| run | steps | ms | speed-up | PSNR dB |", "|---|---|---|---|---|",
        f"| full sampler (unpatched) | {n} | {full:.1f} | 1.00× | reference |",
        f"| schedule ({report['reuse']} reuse steps) | {n} | {g['schedule']:.1f} | {full / g['schedule']:.2f}× | "
        f"{q['schedule']:.2f} |",
        f"| fewer steps in the schedule's time | {report['fewer_steps']} | {g['fewer_steps']:.1f} | "
        f"{full / g['fewer_steps']:.2f}× | {q['fewer_steps']:.2f} |",
    ]
    if report["notes"]:
        lines += [""] + [f"Note: {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def plan_markdown(plan: dict) -> list[str]:
    """The default plan's section of report.md: ρ predicted and measured, then every layer, per mode."""
    modes = [m for m in MODES if m in plan]
    cell = {m: plan[m] for m in modes}

    def row(label, fn):
        return f"| {label} | " + " | ".join(fn(c) if c["available"] else "n/a" for c in cell.values()) + " |"
    lines = [f"The default plan (plan=\"measured\"): a layer reuses where its {plan['reuse_steps']} reuse step(s) "
             f"save more than its {plan['capture_steps']} capture(s) add; one UNet call of its reuse step:", "",
             "| | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes),
             row("layers reusing", lambda c: f"{c['reusing_layers']} of {len(c['layers'])}"),
             row("computing call ms", lambda c: f"{c['compute_ms']:.2f}"),
             row("capturing call ms", lambda c: f"{c['capture_ms']:.2f}"),
             row("reusing call ms", lambda c: f"{c['reuse_ms']:.2f}"),
             row("predicted ρ", lambda c: f"{c['predicted_rho']:.3f}"),
             row("measured ρ", lambda c: f"{c['measured_rho']:.3f}"), ""]
    lines += [f"Note ({m}): {c['note']}" for m, c in cell.items() if c.get("note")]
    shown = [c for c in cell.values() if c["available"]]
    if shown:
        lines += ["", "Per layer, per call: compute / capture / reuse ms, and the saving per generation:", "",
                  "| layer | " + " | ".join(m for m, c in cell.items() if c["available"]) + " |",
                  "|---|" + "---|" * len(shown)]
        for i, layer in enumerate(shown[0]["layers"]):
            cells = []
            for c in shown:
                x = c["layers"][i]
                what = f"reuse {x['format']}" if x["reuse"] else "computes"
                cells.append(f"{what}: {x['compute_ms']:.3f} / {x['capture_ms']:.3f} / {x['reuse_ms']:.3f}, "
                             f"{x['saving_ms']:+.3f} ms")
            lines.append(f"| {layer['name']} | " + " | ".join(cells) + " |")
    return lines + [""]


def measured_entry(report: dict, fp8: dict, model: Model, card: str) -> dict:
    """One ``rho`` entry of ``measured.json`` from ``report`` and ``fp8``, :meth:`StepTimer.steps` with fp8 maps."""
    source = f"python -m attnreuse bench, {report['model']}, batch {report['batch']}, torch {report['torch']}"
    return measured.rho_entry(card, model.arch(), report["resolution"][1], report["date"], fp8["compute"],
                              fp8["reuse"], source)


def update_measured(path, entry: dict) -> None:
    """Put ``entry`` in ``path``'s ``rho`` list, replacing the one for the same card, architecture and size."""
    data = json.loads(Path(path).read_text())
    same = (entry["card"], entry["arch"], entry["px"])
    data["rho"] = [e for e in data["rho"] if (e.get("card"), e.get("arch"), e.get("px")) != same] + [entry]
    files.write_json(path, data)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        found, calibration, model, out = check(args)
    except UsageError as e:
        fail("bench", e)
    return run(args, found, calibration, model, out)
