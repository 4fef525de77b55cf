"""attnreuse: faster diffusion sampling by reusing attention maps across steps, without retraining.

    handle = attnreuse.patch(pipe, attnreuse.hurry_fraction(0.5))   # reuse the last half of the steps
    image = pipe(prompt, num_inference_steps=20).images[0]
    attnreuse.unpatch(pipe)
"""
from .clock import Generation
from .config import ReuseConfig
from .patching import ReuseHandle, patch, unpatch
from .phast import PhastResult, phast, psnr
from .schedule import Schedule, as_schedule, hurry, hurry_fraction, rescaled

__all__ = ["Generation", "PhastResult", "ReuseConfig", "ReuseHandle", "Schedule", "as_schedule", "hurry",
           "hurry_fraction", "patch", "phast", "psnr", "rescaled", "unpatch"]
__version__ = "0.1.0"
