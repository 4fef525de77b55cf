"""The model a command samples, behind one call: the embedded digits model or any diffusers UNet pipeline,
and the calibration set it is judged on."""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

EMBEDDED = "embedded"

# --scheduler name: (diffusers class, config overrides); each is built from the checkpoint's own scheduler
# config, so the noise schedule it was trained with stays
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "kdpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class NoUNetError(ValueError):
    """The pipeline loaded has no UNet to patch."""


@dataclass(frozen=True)
class Calibration:
    """Every prompt sampled with every seed, in batches of ``batch_size`` items.

    The batches are fixed by the set alone, never by the number of processes: an image computed in another
    batch could differ in its last bits, and a distributed search must score exactly as one process does.
    """

    prompts: tuple  # text prompts, or digit classes for the embedded model
    seeds: tuple[int, ...]
    batch_size: int

    @property
    def items(self) -> list[tuple]:
        return [(p, s) for p in self.prompts for s in self.seeds]

    def batches(self) -> list[list[tuple]]:
        items = self.items
        return [items[i: i + self.batch_size] for i in range(0, len(items), self.batch_size)]


def model_kind(value: str) -> str:
    """``"embedded"``, ``"folder"`` (an existing path) or ``"hub"`` (a hub ID such as ``org/name``)."""
    if value == EMBEDDED:
        return EMBEDDED
    if Path(value).expanduser().exists() or not _HUB_ID.match(value):
        return "folder"
    return "hub"


def model_key(value: str) -> str:
    """How a model is named in traces and reports: local folders by absolute path."""
    return str(Path(value).expanduser().resolve()) if model_kind(value) == "folder" else value


class Model:
    """A loaded pipeline: ``sample(items, steps)`` gives ``[n, C, H, W]`` images in [0, 1], sample ``i``
    depending on ``items[i] = (prompt, seed)`` alone (one noise generator per item)."""

    name: str
    pipe: object
    resolution: tuple[int, int]  # width, height
    guidance: float | None

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def sample(self, items, steps: int) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        """What a report says about the model."""
        return {"model": self.name, "pipeline": type(self.pipe).__name__,
                "scheduler_class": type(self.pipe.scheduler).__name__, "resolution": list(self.resolution),
                "dtype": str(self.unet.dtype).removeprefix("torch."), "guidance": self.guidance}

    def arch(self) -> str:
        """A short tag for ``measured.json``: the public architecture the UNet's text width suggests."""
        from attnreuse.architectures import CONFIGS
        by_width = {config["cross_attention_dim"]: name for name, config in CONFIGS.items()}
        return by_width.get(self.unet.config.cross_attention_dim, re.sub(r"\W+", "_", Path(self.name).name))


class EmbeddedModel(Model):
    """The shipped digits model; prompts are digit classes."""

    def __init__(self, scheduler: str | None, device, dtype, guidance: float | None):
        from attnreuse.embedded import load_default
        self.name, self.guidance = EMBEDDED, guidance
        self.pipe = load_default("ddim", device=device, dtype=dtype)
        if scheduler is not None:
            self.pipe.scheduler = make_scheduler(scheduler, self.pipe.scheduler)
        self.resolution = (self.pipe.unet.config.sample_size,) * 2

    def sample(self, items, steps: int) -> torch.Tensor:
        from attnreuse.embedded import generate
        kwargs = {} if self.guidance is None else {"guidance_scale": self.guidance}
        return generate(self.pipe, [(int(p), s) for p, s in items], steps, **kwargs)


class PipelineModel(Model):
    """A diffusers text-to-image UNet pipeline (SD1.5, SD2.x, SDXL, ...) loaded with ``from_pretrained``."""

    def __init__(self, name: str, scheduler: str | None, device, dtype, resolution, guidance: float | None):
        from diffusers import DiffusionPipeline
        self.name, self.guidance = model_key(name), guidance
        path = str(Path(name).expanduser()) if model_kind(name) == "folder" else name
        with warnings.catch_warnings():  # newer diffusers call it dtype, older ones know torch_dtype only
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            self.pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype)
        if getattr(self.pipe, "unet", None) is None:
            raise NoUNetError(f"it is a {type(self.pipe).__name__} without a UNet")
        if getattr(self.pipe, "safety_checker", None) is not None:
            self.pipe.safety_checker = None  # its black squares would score as errors of the schedule
        if scheduler is not None:
            self.pipe.scheduler = make_scheduler(scheduler, self.pipe.scheduler)
        self.pipe.to(device)
        default = self.pipe.unet.config.sample_size * getattr(self.pipe, "vae_scale_factor", 8)
        self.resolution = tuple(resolution) if resolution else (default, default)

    @torch.no_grad()
    def sample(self, items, steps: int) -> torch.Tensor:
        width, height = self.resolution
        kwargs = {} if self.guidance is None else {"guidance_scale": self.guidance}
        out = self.pipe(prompt=[p for p, _ in items], num_inference_steps=steps, width=width, height=height,
                        generator=[torch.Generator().manual_seed(s) for _, s in items], output_type="pt", **kwargs)
        return out.images.float()


def make_scheduler(name: str, current):
    """Scheduler ``name`` (a key of :data:`SCHEDULERS`) with the noise schedule of ``current``."""
    import diffusers
    cls_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(current.config, **overrides)


def load(name: str, scheduler: str | None, device, dtype, resolution, guidance) -> Model:
    """The model ``name`` names, on ``device`` in ``dtype``, its progress bars off."""
    if name == EMBEDDED:
        model = EmbeddedModel(scheduler, device, dtype, guidance)
    else:
        model = PipelineModel(name, scheduler, device, dtype, resolution, guidance)
    model.pipe.set_progress_bar_config(disable=True)  # a patched pipeline still counts its steps on it
    return model
