"""The arguments ``search`` and ``bench`` share (model, sampler, calibration set) and their checks.

Every check runs before any work and raises :class:`UsageError`; the command prints it as one line,
``attnreuse <command>: <what> — <fix>``, and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from attnreuse.kernels import formats

from .models import DTYPES, EMBEDDED, SCHEDULERS, Calibration, Model, NoUNetError, load, model_kind
from .world import World

# the embedded model's default calibration (seed 0), the demo's digits: six keep a 20-step search of two rounds
# (164 samplings) near two minutes on 2 CPU cores, where all ten take three
EMBEDDED_CLASSES = (0, 2, 3, 5, 7, 8)
NO_UNET_FIX = "attnreuse reuses a UNet's attention maps: pass a UNet pipeline (SD1.5, SD2.x, SDXL, ...)"


class UsageError(Exception):
    """A wrong argument or input, with what is wrong and the fix."""

    def __init__(self, what: str, fix: str):
        super().__init__(f"{what} — {fix}")


def fail(command: str, error: UsageError):
    """Print ``error`` as one line (once, from the first process of a distributed run) and exit with 2."""
    if World().first:
        print(f"attnreuse {command}: {error}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def add_model_arguments(p: argparse.ArgumentParser, defaults_from: str = "") -> None:
    """--model and the sampling arguments; ``defaults_from`` names where unset ones come from."""
    also = f"; default: {defaults_from}" if defaults_from else ""
    p.add_argument("--model", required=True, metavar="DIR_OR_ID",
                   help="a diffusers UNet pipeline: a folder written by save_pretrained (works offline) or a hub ID "
                        f"for DiffusionPipeline.from_pretrained; '{EMBEDDED}' for the shipped digits model")
    p.add_argument("--prompts", metavar="FILE",
                   help="calibration prompts, one per line (required for a text pipeline; for the embedded model: "
                        f"digit classes 0-9, one per line, default 0 2 3 5 7 8){also}")
    p.add_argument("--seeds", type=int, nargs="+", metavar="S",
                   help=f"every prompt is sampled once per seed (default: 0){also}")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS),
                   help=f"the sampler, built from the checkpoint's scheduler config (default: the checkpoint's own, "
                        f"ddim for the embedded model){also}")
    p.add_argument("--resolution", metavar="PX_OR_WxH",
                   help=f"image size, e.g. 512 or 768x512 (default: the pipeline's own){also}")
    p.add_argument("--cache-dtype", choices=formats.names(),
                   help=f"how cached maps are stored: fp8 (e4m3) halves the bytes of fp16, fp4 (E2M2) about "
                        f"quarters them (default: the model's dtype){also}")
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="the model's dtype (default: fp16 on a GPU, fp32 on a CPU)")
    p.add_argument("--guidance", type=float, metavar="G",
                   help=f"classifier-free guidance scale (default: the pipeline's own){also}")
    p.add_argument("--batch-size", type=int, metavar="B",
                   help="calibration images per pipeline call; cached maps grow with it (default: 1 for a pipeline, "
                        f"the whole set for the embedded model){also}")


def check_model(value: str) -> None:
    """A readable UNet pipeline folder, a hub ID, or the embedded model."""
    kind = model_kind(value)
    if kind != "folder":
        return
    path = Path(value).expanduser()
    fix = "pass the folder save_pretrained wrote (the one holding model_index.json), a hub ID, or 'embedded'"
    if not path.exists():
        raise UsageError(f"--model {value}: no such folder", fix)
    if not path.is_dir():
        raise UsageError(f"--model {value} is a file, not a pipeline folder", fix)
    index = path / "model_index.json"
    if not index.is_file():
        raise UsageError(f"--model {value} has no model_index.json", fix)
    try:
        components = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"--model {value}: cannot read model_index.json ({e})",
                         "re-save the pipeline with save_pretrained, or pass another folder") from None
    if not isinstance(components, dict) or "unet" not in components:
        name = components.get("_class_name", "pipeline") if isinstance(components, dict) else "pipeline"
        raise UsageError(f"--model {value} is a {name} without a UNet", NO_UNET_FIX)


def check_out_dir(out: Path) -> Path:
    """``out``, unless it is a file: the commands create it as a folder once every other check has passed."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file", "pass a folder (created if missing)")
    return out


def read_prompts(path: str, embedded: bool) -> tuple:
    """The non-blank lines of ``path``: text prompts, or digit classes for the embedded model."""
    fix = ("write one digit class 0-9 per line" if embedded else "write one prompt per line")
    try:
        lines = [line.strip() for line in Path(path).expanduser().read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        raise UsageError(f"--prompts {path}: no such file", f"pass a text file: {fix}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--prompts {path}: cannot read it ({e})", f"pass a readable UTF-8 text file: {fix}") from None
    prompts = tuple(line for line in lines if line)
    if not prompts:
        raise UsageError(f"--prompts {path} holds no prompt", fix)
    if embedded:
        bad = [p for p in prompts if p not in {str(c) for c in EMBEDDED_CLASSES}]
        if bad:
            raise UsageError(f"--prompts {path}: {bad[0]!r} is not a digit class", f"for --model {EMBEDDED}, {fix}")
        return tuple(int(p) for p in prompts)
    return prompts


def parse_resolution(value: str | None, embedded: bool) -> tuple[int, int] | None:
    """``"512"`` or ``"768x512"`` as (width, height); None keeps the pipeline's own."""
    if value is None:
        return None
    try:
        width, height = (int(v) for v in value.lower().split("x")) if "x" in value.lower() else (int(value),) * 2
    except ValueError:
        raise UsageError(f"--resolution {value} is not a size", "pass pixels, e.g. 512 or 768x512") from None
    if embedded and (width, height) != (8, 8):
        raise UsageError(f"--resolution {value}: the embedded model samples 8x8 images only",
                         "leave --resolution out")
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise UsageError(f"--resolution {value}: width and height must be positive multiples of 8",
                         "pass e.g. 512 or 768x512")
    return width, height


def check_sampling(args, embedded: bool, prompts: tuple | None = None) -> tuple[Calibration, tuple[int, int] | None]:
    """The calibration set (``prompts`` when ``--prompts`` is unset) and the resolution; raises
    :class:`UsageError`."""
    if args.prompts is not None:
        prompts = read_prompts(args.prompts, embedded)
    elif prompts is None and embedded:
        prompts = EMBEDDED_CLASSES
    elif prompts is None:
        raise UsageError("--prompts is required for a text pipeline",
                         "pass a text file of calibration prompts, one per line")
    seeds = tuple(args.seeds) if args.seeds else (0,)
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {' '.join(map(str, seeds))} repeats a seed", "pass each seed once")
    n = len(prompts) * len(seeds)
    batch = args.batch_size if args.batch_size is not None else (n if embedded else 1)
    if batch < 1:
        raise UsageError(f"--batch-size {batch}", "pass 1 or more images per pipeline call")
    return Calibration(tuple(prompts), seeds, batch), parse_resolution(args.resolution, embedded)


def device_and_dtype(args, local_rank: int = 0) -> tuple[torch.device, torch.dtype]:
    """This process's device (its own GPU under torchrun) and the model dtype."""
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    default = "fp16" if device.type == "cuda" else "fp32"
    return device, DTYPES[args.dtype or default]


def load_model(args, device: torch.device, dtype: torch.dtype, resolution) -> Model:
    """``--model`` loaded, or a :class:`UsageError` naming why not."""
    try:
        return load(args.model, args.scheduler, device, dtype, resolution, args.guidance)
    except NoUNetError as e:
        raise UsageError(f"--model {args.model}: {e}", NO_UNET_FIX)
    except Exception as e:  # diffusers and the hub raise many kinds; the first line of any says enough
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise UsageError(f"--model {args.model} cannot be loaded ({type(e).__name__}: {first})",
                         "check that the folder is complete, or that the hub ID is right and downloaded") from None
