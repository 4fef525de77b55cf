"""Quality of reuse schedules on the embedded model: ``python bench/quality.py --out out/quality``.

On held-out (class, seed) pairs (never the calibration pairs PHAST searched on), for DDIM and DPM-Solver++
at N steps and each reuse count r: PSNR and SSIM against the full N-step sample for HURRY, PHAST, early
reuse, random schedules, fp16 and fp8 instead of model-dtype maps, attention-output reuse (the T-GATE / PAB
strategy), DeepCache (the ``DeepCache`` package: interval 3, branch 0) alone and with PHAST map reuse, each with
the fraction of the full sampler's UNet FLOPs it spends (``torch.utils.flop_counter``), and step reduction at
equal cost. A reuse step costs ρ of a computing step, so a schedule costs
``#compute + ρ·#reuse`` steps; step reduction runs the most steps that cost no more. ρ is measured on GPUs
(per card and resolution: ``attnreuse/measured.json``, or ``--rho-from`` a ``bench/e2e.py --json`` file); with
no measurement, the labelled assumptions of ``measured.json`` (the paper's 0.31, the H200 SDPA ceiling 0.90).
Writes ``quality.md``, ``quality.csv`` and ``quality.png`` (PSNR against relative latency) into ``--out``
(``out/quality`` by default).
"""
from __future__ import annotations

import argparse
import csv
import math
import random
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import matplotlib
import numpy as np
import torch
from skimage.metrics import structural_similarity
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

if __package__ in (None, ""):  # run as a file: python bench/quality.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

import attnreuse  # noqa: E402
from attnreuse import measured  # noqa: E402
from attnreuse.embedded import CALIBRATION, HELD_OUT, generate, load_default, searched_schedules  # noqa: E402
from attnreuse.schedule import to_string  # noqa: E402
from bench.measure import DEEPCACHE_INTERVAL, deepcache  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def ssim(images: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    return np.array([structural_similarity(a[0].numpy(), b[0].numpy(), data_range=1.0, win_size=7)
                     for a, b in zip(images.double(), reference.double())])


def early(steps: int, r: int) -> tuple[int, ...]:
    return (1,) + (0,) * r + (1,) * (steps - 1 - r)


def random_schedule(steps: int, r: int, seed: int) -> tuple[int, ...]:
    reuse = set(random.Random(seed).sample(range(1, steps), r))
    return tuple(0 if i in reuse else 1 for i in range(steps))


# torch's flop counter knows SDPA's GPU kernels but not the CPU one (it would count plain attention as 0 FLOPs
# while a reuse step's map × V counts as a matmul): the same formula for it
_CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
             lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}


def flops_of(fn) -> tuple[torch.Tensor, int]:
    """``fn()``'s result and the FLOPs it spent (matmuls, convolutions, attention: torch's flop counter)."""
    with FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter:
        out = fn()
    return out, counter.get_total_flops()


@contextmanager
def deepcache_on(pipe):
    helper = deepcache(pipe)
    try:
        yield
    finally:
        helper.disable()


def evaluate(args, rhos: list[measured.Rho]) -> list[dict]:
    rows = []
    searched = searched_schedules()
    for sched_name in args.schedulers:
        pipe = load_default(sched_name)
        run = lambda n=args.steps: generate(pipe, args.pairs, n)  # noqa: E731
        reference, full_flops = flops_of(run)

        def record(method, schedule=None, images=None, steps=args.steps, r=None, flops=False, cache=False, **extra):
            """One row; ``flops``: also the fraction of the full sampler's UNet FLOPs; ``cache``: under DeepCache."""
            spent = None
            if images is None:
                with attnreuse.patch(pipe, schedule, **extra) if schedule is not None else nullcontext():
                    with deepcache_on(pipe) if cache else nullcontext():
                        images, spent = flops_of(run) if flops else (run(), None)
            p = attnreuse.psnr(images, reference)
            s = ssim(images, reference)
            n_reuse = 0 if schedule is None else schedule.count(0)
            row = {"scheduler": sched_name, "r": r, "method": method,
                   "schedule": "" if schedule is None else to_string(schedule),
                   "steps": steps, "compute_steps": steps - n_reuse, "reuse_steps": n_reuse,
                   "psnr": p.mean().item(), "psnr_std": p.std().item(), "ssim": float(s.mean()),
                   "unet_flops": None if spent is None else spent / full_flops}
            for rho in rhos:  # DeepCache's steps cost what the GPU rows of bench/e2e.py measure: not modelled here
                row[f"latency_{rho.label}"] = None if cache else (steps - n_reuse + rho.value * n_reuse) / args.steps
            rows.append(row)
            print(f"{sched_name:5} r={r!s:>3} {method:22} {row['schedule']:>22} {row['psnr']:6.2f} dB "
                  f"SSIM {row['ssim']:.3f}" + ("" if spent is None else f", {row['unet_flops']:.1%} of the FLOPs"),
                  flush=True)

        record(f"deepcache N={DEEPCACHE_INTERVAL}", flops=True, cache=True)
        for r in args.reuse:
            hurry = attnreuse.hurry(args.steps, r)
            record("hurry", hurry, r=r)  # maps in the model's dtype (fp32 here)
            record("hurry fp16 maps", hurry, r=r, cache_dtype="fp16")
            record("hurry fp8 maps", hurry, r=r, cache_dtype="fp8")
            key = f"{sched_name}-{args.steps}-{r}"
            if key in searched:
                phast = attnreuse.as_schedule(searched[key]["schedule"])
            else:  # not shipped for this size: search now, on the calibration pairs
                phast = attnreuse.phast(pipe, lambda: generate(pipe, args.calibration, args.steps), args.steps, r,
                                        max_rounds=args.phast_rounds).schedule
            record("phast", phast, r=r, flops=True)
            record(f"deepcache N={DEEPCACHE_INTERVAL} + phast", phast, r=r, flops=True, cache=True)
            record("phast fp16 maps", phast, r=r, cache_dtype="fp16")
            record("phast fp8 maps", phast, r=r, cache_dtype="fp8")
            record("early", early(args.steps, r), r=r)
            for i in range(args.random):
                record(f"random #{i}", random_schedule(args.steps, r, seed=i), r=r)
            record("output reuse (hurry)", hurry, r=r, target="output")
            for rho in rhos:
                n = math.floor(args.steps - r * (1 - rho.value))  # the most steps that cost no more
                record(f"{n} steps (ρ {rho.label})", images=run(n), steps=n, r=r)
    return rows


def write(rows: list[dict], out: Path, steps: int, rhos: list[measured.Rho]) -> None:
    with open(out / "quality.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"PSNR / SSIM against the full {steps}-step sample, held-out pairs. Relative latency = "
             f"(compute + ρ·reuse) / {steps}, a reuse step costing ρ of a computing step:", "",
             *(f"- ρ = {rho.value} ({rho.label}): {rho.source}" for rho in rhos), "",
             "UNet FLOPs: the fraction of the full sampler's, counted by torch.utils.flop_counter (DeepCache and map "
             "reuse rows, and PHAST alone beside them).", "",
             "| scheduler | r | method | schedule | PSNR dB | SSIM | UNet FLOPs | "
             + " | ".join(f"latency ρ={rho.value}" for rho in rhos) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(rhos)]
    for row in rows:
        lat = " | ".join("-" if row[f"latency_{rho.label}"] is None else f"{row[f'latency_{rho.label}']:.2f}"
                         for rho in rhos)
        flops = "-" if row["unet_flops"] is None else f"{row['unet_flops']:.1%}"
        lines.append(f"| {row['scheduler']} | {row['r']} | {row['method']} | `{row['schedule'] or '-'}` | "
                     f"{row['psnr']:.2f} ± {row['psnr_std']:.2f} | {row['ssim']:.3f} | {flops} | {lat} |")
    (out / "quality.md").write_text("\n".join(lines) + "\n")

    schedulers = sorted({r["scheduler"] for r in rows})
    fig, axes = plt.subplots(len(schedulers), len(rhos), figsize=(6 * len(rhos), 4 * len(schedulers)),
                             squeeze=False)
    families = {"hurry": "hurry", "phast": "phast", "early": "early", "random": "random",
                "output reuse": "output reuse (hurry)", "fewer steps": " steps (ρ "}
    for i, sched in enumerate(schedulers):
        for j, rho in enumerate(rhos):
            key = rho.label
            ax = axes[i][j]
            for label, tag in families.items():
                pts = [(r[f"latency_{key}"], r["psnr"]) for r in rows if r["scheduler"] == sched and (
                    (label == "fewer steps" and tag in r["method"] and key in r["method"])
                    or (label != "fewer steps" and r["method"].split(" #")[0] == tag))]
                if pts:
                    xs, ys = zip(*sorted(pts))
                    ax.plot(xs, ys, "o" if label == "random" else "o-", label=label)
            ax.set(title=f"{sched}, ρ = {rho.value} ({key})", xlabel="relative latency", ylabel="PSNR vs full (dB)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=100)


def rhos_to_use(args, error) -> list[measured.Rho]:
    """``--rho`` values, else measured ones (``--rho-from``, else the package's), else the labelled assumptions."""
    if args.rho:
        try:
            return [measured.Rho(k, float(v), "given with --rho") for k, v in (item.split("=") for item in args.rho)]
        except ValueError:
            error(f"--rho {' '.join(args.rho)}: pass NAME=VALUE pairs such as h100_sd15_512=0.93")
    try:
        found = measured.measured(args.rho_from)
    except ValueError as e:
        error(f"--rho-from {args.rho_from}: {e}")
    if found:
        return found
    assumed = measured.assumed()
    print("ρ: no GPU measurement yet (attnreuse/measured.json is empty, no --rho-from): using the assumptions "
          + "; ".join(f"{r.label} = {r.value} ({r.source})" for r in assumed), flush=True)
    return assumed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/quality", help="folder for quality.md, .csv and .png (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reuse", type=int, nargs="+", default=[5, 10, 15])
    ap.add_argument("--schedulers", nargs="+", default=["ddim", "dpm"])
    ap.add_argument("--random", type=int, default=5, help="random schedules per r")
    ap.add_argument("--pairs", type=int, default=len(HELD_OUT), help="held-out pairs to use")
    ap.add_argument("--phast-rounds", type=int, default=None, help="bound a PHAST search run here")
    ap.add_argument("--tiny", action="store_true", help="a quick end-to-end run: few pairs and schedules")
    ap.add_argument("--rho-from", metavar="E2E_JSON",
                    help="take ρ per card and resolution from this `bench/e2e.py --json` file of a GPU run "
                         "(reuse_fp8 / default, graph mode) instead of attnreuse/measured.json")
    ap.add_argument("--rho", nargs="+", metavar="NAME=VALUE",
                    help="reuse-step costs to compare at instead, e.g. h100_sd15_512=0.93")
    args = ap.parse_args(argv)
    rhos = rhos_to_use(args, ap.error)
    out = Path(args.out)
    try:  # before the minutes of sampling
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        ap.error(f"--out {args.out}: {e.strerror}; pick a writable folder")
    if args.tiny:
        args.steps, args.reuse, args.random, args.pairs, args.phast_rounds = 6, [2], 1, 3, 1
    args.pairs = HELD_OUT[:args.pairs]
    args.calibration = CALIBRATION[:len(args.pairs)] if args.tiny else CALIBRATION
    with torch.no_grad():
        rows = evaluate(args, rhos)
    write(rows, out, args.steps, rhos)
    print((out / "quality.md").read_text())


if __name__ == "__main__":
    main()
