"""attnreuse: faster diffusion sampling by reusing attention maps across steps, without retraining.

    handle = attnreuse.patch(pipe, attnreuse.hurry(20, 10))   # compute 10 steps, reuse 10
    image = pipe(prompt, num_inference_steps=20).images[0]
    attnreuse.unpatch(pipe)
"""
from .config import ReuseConfig
from .patching import ReuseHandle, patch, unpatch
from .phast import PhastResult, phast, psnr
from .schedule import as_schedule, hurry

__all__ = ["PhastResult", "ReuseConfig", "ReuseHandle", "as_schedule", "hurry", "patch", "phast", "psnr", "unpatch"]
__version__ = "0.1.0"
