"""The embedded default model: class-conditional 8×8 digits, a diffusers UNet with self- and cross-attention.

Conditioning is cross-attention on a learned sequence of tokens per class (ten digits plus a null class
for classifier-free guidance), so the UNet has the same attention structure as a text-to-image UNet.
Weights are trained by ``python -m attnreuse.embedded.train`` and ship as package data.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, UNet2DConditionModel
from safetensors.torch import load_file

HERE = Path(__file__).parent
WEIGHTS = HERE / "digits.safetensors"
NULL_CLASS = 10
NUM_TRAIN_TIMESTEPS = 1000
BETA_SCHEDULE = "squaredcos_cap_v2"

UNET_CONFIG = dict(
    sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
    norm_num_groups=16, cross_attention_dim=32, attention_head_dim=4,  # 4 heads at both levels
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
CLASS_TOKENS = 4  # tokens per class

# (class, seed) pairs: schedules are searched on CALIBRATION and judged on HELD_OUT, never the same seeds.
CALIBRATION = [(c, 0) for c in range(10)]
HELD_OUT = [(c, 1000 + s) for c in range(10) for s in range(5)]


class ClassTokens(torch.nn.Module):
    """A learned ``[CLASS_TOKENS, cross_attention_dim]`` sequence per class; class 10 is the null class."""

    def __init__(self, num_classes: int = NULL_CLASS + 1, tokens: int = CLASS_TOKENS,
                 dim: int = UNET_CONFIG["cross_attention_dim"]):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(num_classes, tokens, dim) * 0.5)

    def forward(self, classes: torch.Tensor) -> torch.Tensor:
        return self.table[classes]

    @property
    def dtype(self) -> torch.dtype:  # DiffusionPipeline.to() reads these
        return self.table.dtype

    @property
    def device(self) -> torch.device:
        return self.table.device


SCHEDULERS = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}


def make_scheduler(name: str = "ddim"):
    """A sampling scheduler matching the training noise schedule: ``"ddim"`` or ``"dpm"`` (DPM-Solver++)."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler {name!r}: pass one of {sorted(SCHEDULERS)}")
    # "leading" spacing starts below t = 999, where the cosine schedule's alpha is ~0 and DPM-Solver's
    # data prediction divides by it
    return SCHEDULERS[name](num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule=BETA_SCHEDULE,
                            timestep_spacing="leading")


class DigitsPipeline(DiffusionPipeline):
    """Class-conditional sampling with classifier-free guidance (one batched UNet call per step)."""

    def __init__(self, unet: UNet2DConditionModel, scheduler, class_tokens: ClassTokens):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, class_tokens=class_tokens)
        self.set_progress_bar_config(disable=True)  # a sampling of 8x8 digits takes well under a second

    @torch.no_grad()
    def __call__(self, classes, seeds, num_inference_steps: int = 20, guidance_scale: float = 2.0) -> torch.Tensor:
        """Images in [0, 1], ``[len(classes), 1, 8, 8]``; sample ``i`` depends only on (classes[i], seeds[i])."""
        classes = torch.as_tensor(classes, device=self.device)
        if len(seeds) != len(classes):
            raise ValueError(f"got {len(classes)} classes but {len(seeds)} seeds: pass one seed per sample")
        size, dtype = self.unet.config.sample_size, self.unet.dtype
        noise = [torch.randn(1, 1, size, size, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        latents = torch.cat(noise).to(self.device, dtype)
        context = self.class_tokens(torch.cat([torch.full_like(classes, NULL_CLASS), classes])).to(dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        latents = latents * self.scheduler.init_noise_sigma
        # the progress bar is how a patched pipeline counts its steps (attnreuse.progress_clock)
        with self.progress_bar(total=len(self.scheduler.timesteps)) as progress:
            for t in self.scheduler.timesteps:
                x = self.scheduler.scale_model_input(torch.cat([latents, latents]), t)
                eps_uncond, eps_cond = self.unet(x, t, encoder_hidden_states=context).sample.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
                latents = self.scheduler.step(eps, t, latents).prev_sample
                progress.update()
        return ((latents.float() + 1) / 2).clamp(0, 1)


def build(seed: int = 0) -> tuple[UNet2DConditionModel, ClassTokens]:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIG), ClassTokens()


def load_default(scheduler: str = "ddim", device="cpu", dtype=torch.float32, weights=WEIGHTS) -> DigitsPipeline:
    """The embedded trained model as a :class:`DigitsPipeline`, loaded offline from package data (or from
    ``weights``, a file written by ``python -m attnreuse.embedded.train``)."""
    weights = Path(weights)
    if not weights.exists():
        raise FileNotFoundError(f"{weights} is missing: train it with `python -m attnreuse.embedded.train`")
    unet, tokens = build()
    # the weights are loaded already in the target dtype and device: casting the built model with .to(dtype)
    # makes diffusers warn about modules to keep in float32 (this model has none)
    state = {k: v.to(device, dtype) for k, v in load_file(str(weights)).items()}
    tokens.table = torch.nn.Parameter(state.pop("class_tokens.table"))
    unet.load_state_dict({k.removeprefix("unet."): v for k, v in state.items()}, assign=True)
    return DigitsPipeline(unet.eval(), make_scheduler(scheduler), tokens.eval())


def generate(pipe: DigitsPipeline, pairs, steps: int = 20, **kwargs) -> torch.Tensor:
    """Sample every (class, seed) pair in one batch; ``kwargs`` go to the pipeline (e.g. ``guidance_scale``)."""
    return pipe([c for c, _ in pairs], [s for _, s in pairs], num_inference_steps=steps, **kwargs)


def searched_schedules() -> dict:
    """PHAST schedules searched for this model (``python -m attnreuse.embedded.search``), by
    ``"<scheduler>-<steps>-<reuse>"``."""
    path = HERE / "phast.json"
    return json.loads(path.read_text()) if path.exists() else {}
