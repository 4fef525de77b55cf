"""The public Stable Diffusion UNet configs (architecture only, no weights) and their attention shapes."""
from __future__ import annotations

import functools

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

_SD_BLOCKS = dict(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
CONFIGS = {
    "sd15": dict(_SD_BLOCKS, cross_attention_dim=768, attention_head_dim=8),
    "sd21": dict(_SD_BLOCKS, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                 use_linear_projection=True),
    "sdxl": dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
                 cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}
TEXT_TOKENS = 77  # CLIP's context length


def build(arch: str, px: int, device: torch.device | str = "cpu") -> UNet2DConditionModel:
    """The ``arch`` UNet for ``px``² images with random weights (``device="meta"``: shapes only, no memory)."""
    with torch.device(device):
        return UNet2DConditionModel(sample_size=px // 8, **CONFIGS[arch])


def attention_shapes(arch: str, px: int, batch: int = 2) -> dict[tuple[int, int, int, int, int], int]:
    """``{(batch, heads, q tokens, kv tokens, head dim): number of layers}`` of one UNet call at ``px``²
    (batch 2: classifier-free guidance), largest maps first."""
    return dict(_attention_shapes(arch, px, batch))


@functools.lru_cache(maxsize=None)
def _attention_shapes(arch: str, px: int, batch: int) -> tuple:
    from .planner import layer_shapes  # the planner measures with kernels; architectures stays light

    unet = build(arch, px, "meta")
    names = [n for n, m in unet.named_modules() if isinstance(m, Attention)]
    shapes: dict[tuple, int] = {}
    for s in layer_shapes(unet, names, (batch, 4, px // 8, px // 8), TEXT_TOKENS).values():
        key = (s.batch, s.heads, s.q_tokens, s.kv_tokens, s.head_dim)
        shapes[key] = shapes.get(key, 0) + 1
    return tuple(sorted(shapes.items(), key=lambda kv: (-kv[0][2], -kv[0][3])))
