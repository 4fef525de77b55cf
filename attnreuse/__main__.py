"""``python -m attnreuse demo``: the embedded digits model with and without attention-map reuse.
``python -m attnreuse warmup ...``: compile the Triton kernels ahead of a first generation (``attnreuse.warmup``).
``python -m attnreuse search ...`` / ``bench ...``: PHAST and its measurement on your own checkpoint
(``attnreuse.cli``)."""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

import attnreuse
from attnreuse import measured, warmup
from attnreuse.cli import bench, search
from attnreuse.embedded import generate, load_default, searched_schedules
from attnreuse.embedded.grid import save_grid
from attnreuse.kernels import formats

DEMO_HELP = """\
Samples the embedded model (class-conditional 8x8 digits, 20-step DDIM by default) four ways: the full
sampler, HURRY (compute the first STEPS-REUSE steps, reuse the attention maps for the last REUSE), PHAST
(the searched schedule shipped for STEPS/REUSE: 20 steps with 5, 10 or 15 reuse steps), and plain DDIM with
fewer steps at the same cost as the reuse schedules (a reuse step costs rho of a computing step). Prints
PSNR against the full sampler and wall time per method, and writes a labelled image grid (one row per
method, one column per class).

rho comes from GPU measurements (the package's measured.json, or --rho-from) when there are any, else the
paper's assumed 0.31. On a CPU the timings show little: attention is a small share of each step there and
the Triton kernels do not run, so the speed claim is a GPU measurement."""


def rho_in_use(found: list[measured.Rho]) -> tuple[measured.Rho, bool]:
    """The ρ for the fewer-steps row, and whether it was measured: this card's (else any card's) measured
    figure at the smallest resolution, else the paper's assumption."""
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    found = [r for r in found if r.card == card] or found
    if found:
        return min(found, key=lambda r: r.px), True
    return next(r for r in measured.assumed() if r.label == "paper"), False


def speed_note(device: str, found: list[measured.Rho]) -> str:
    """What the demo's timings can and cannot show, with the measured GPU figures beside it."""
    gpu = ("; ".join(f"ρ = {r.value:.2f} on {r.source}" for r in found) if found
           else "not measured on a GPU yet")
    if device == "cpu":
        why = ("On a CPU these timings cannot show the speed-up: attention is a small share of each step here and "
               "the Triton kernels do not run (the PyTorch path does), so reuse saves little time; the table shows "
               "quality. The speed claim is a GPU measurement")
    else:
        why = ("This 1 M-parameter 8x8 model is launch-bound on a GPU, so its timings say little about a real "
               "UNet. The speed claim is the end-to-end GPU measurement (bench/e2e.py)")
    return f"{why}: reuse-step cost ρ (reuse / computing step) {gpu}."


def demo(args) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = load_default("ddim", device=device, dtype=dtype)
    pairs = [(c, 7) for c in args.classes]
    n, r = args.steps, args.reuse
    found = measured.measured(args.rho_from)
    rho, was_measured = rho_in_use(found)
    phast = searched_schedules().get(f"ddim-{n}-{r}", {}).get("schedule")
    fewer = math.floor(n - r * (1 - rho.value))
    methods = [(f"full {n} steps", None, n), (f"HURRY-{r}", attnreuse.hurry(n, r), n)]
    if phast:
        methods.append((f"PHAST-{r}", attnreuse.as_schedule(phast), n))
    methods.append((f"{fewer} steps (same cost, rho {rho.value:.2f} "
                    f"{rho.label if was_measured else 'assumed'})", None, fewer))

    generate(pipe, pairs, n)  # warm-up (and Triton compilation on a GPU)
    rows, labels, reference = [], [], None
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; classes {args.classes}; "
          f"map dtype {args.cache_dtype or str(dtype).removeprefix('torch.') + ' (the model’s)'}")
    print(f"{'method':38} {'schedule (1 compute, 0 reuse)':30} {'reuse':>5} {'PSNR vs full':>12} {'ms':>8}")
    for name, schedule, steps in methods:
        if schedule is not None:
            with attnreuse.patch(pipe, schedule, cache_dtype=args.cache_dtype):
                generate(pipe, pairs, steps)  # warm-up of the patched path
                t0 = time.perf_counter()
                images = generate(pipe, pairs, steps)
        else:
            t0 = time.perf_counter()
            images = generate(pipe, pairs, steps)
        if device == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        if reference is None:
            reference, quality, psnr = images, "reference", "reference"
        else:
            quality = f"{attnreuse.psnr(images, reference).mean().item():.2f} dB"
            psnr = f"PSNR {quality}"
        reuse = schedule.count(0) if schedule else 0
        sched = "".join(map(str, schedule)) if schedule else ""
        print(f"{name:38} {sched:30} {reuse:5d} {quality:>12} {ms:8.1f}")
        rows.append(images.cpu())
        labels.append(f"{name}\n{reuse} reuse steps · {psnr} · {ms:.0f} ms")
    save_grid(rows, args.out, pad=4, labels=labels, columns=[f"class {c}" for c in args.classes],
              title=f"embedded digits model, DDIM, {device}: PSNR against the full {n}-step sampler")
    print(speed_note(device, found))
    print(f"image grid (rows: {', '.join(m[0] for m in methods)}) -> {args.out}")


def check(parser: argparse.ArgumentParser, args) -> None:
    """Every argument checked before any work, each error naming the fix."""
    if args.steps < 2:
        parser.error(f"--steps {args.steps}: pass at least 2 sampling steps")
    if not 0 <= args.reuse < args.steps:
        parser.error(f"--reuse {args.reuse}: pass 0 to {args.steps - 1} reuse steps (the first step computes)")
    bad = [c for c in args.classes if not 0 <= c <= 9]
    if bad:
        parser.error(f"--classes {' '.join(map(str, bad))}: the classes are the digits 0 to 9")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        parser.error(f"--out {args.out}: the grid is a PNG, give a file name ending in .png")
    folder = out.parent
    if not folder.is_dir():
        parser.error(f"--out {args.out}: folder {folder} does not exist; create it or pick another")
    existed = out.exists()
    try:  # the one sure test of writability: open it (minutes of sampling come before the grid is written)
        with open(out, "ab"):
            pass
    except OSError as e:
        parser.error(f"--out {args.out}: cannot write there ({e.strerror}); pick a writable file path")
    if not existed:
        out.unlink()
    if args.rho_from:
        try:
            measured.measured(args.rho_from)
        except ValueError as e:
            parser.error(f"--rho-from {args.rho_from}: {e}")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["warmup"]:  # its own parser reads the rest, --help included
        return warmup.main(argv[1:])
    if argv[:1] == ["search"]:
        return search.main(argv[1:])
    if argv[:1] == ["bench"]:
        return bench.main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m attnreuse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,warmup,search,bench}")
    sub.add_parser("warmup", help="compile and cache the Triton kernels for a model before its first generation "
                                  "(python -m attnreuse warmup --help)")
    sub.add_parser("search", help="search a PHAST schedule for your checkpoint, on one GPU or many with torchrun "
                                  "(python -m attnreuse search --help)")
    sub.add_parser("bench", help="time and judge a schedule on your checkpoint and device "
                                 "(python -m attnreuse bench --help)")
    p = sub.add_parser("demo", help="sample the embedded model with the full sampler, HURRY, PHAST and fewer steps",
                       description=DEMO_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, metavar="N",
                   help="sampling steps of the full sampler, N ≥ 2 (default: %(default)s)")
    p.add_argument("--reuse", type=int, default=10, metavar="R",
                   help="reuse steps in the HURRY and PHAST schedules, 0 ≤ R < N; PHAST is shipped for N = 20, "
                        "R = 5, 10, 15 (default: %(default)s)")
    p.add_argument("--classes", type=int, nargs="+", default=[0, 2, 3, 5, 7, 8], metavar="C",
                   help="digits to sample, 0-9, one grid column each (default: 0 2 3 5 7 8)")
    p.add_argument("--cache-dtype", choices=formats.names(), default=None,
                   help="how cached maps are stored (a map format): fp8 is e4m3 with one scale per row and 128-key "
                        "block, about half the bytes of fp16; fp4 is 4-bit unsigned E2M2, about a quarter on rows "
                        "of 128 keys or more (default: the model's dtype, fp32 on a CPU, fp16 on a GPU)")
    p.add_argument("--out", default="attnreuse_demo.png", metavar="FILE.png",
                   help="the labelled image grid, a .png in an existing, writable folder (default: %(default)s)")
    p.add_argument("--rho-from", metavar="E2E_JSON",
                   help="take the reuse-step cost ρ from this `bench/e2e.py --json` file of a GPU run instead of "
                        "the package's measured figures (default: attnreuse/measured.json, empty until measured)")
    args = parser.parse_args(argv)
    check(p, args)
    demo(args)


if __name__ == "__main__":
    main()
