"""A tiny Stable Diffusion text-to-image pipeline saved with ``save_pretrained`` (random weights, built offline,
with a character-level CLIP tokenizer), for the commands that load a checkpoint by path."""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from tests.helpers import CROSS_DIM, make_unet, tiny_vae

PROMPTS = ["a red circle", "two blue squares"]


def save_tiny_pipeline(folder: Path) -> Path:
    """Write the pipeline to ``folder`` (8x8 images: the VAE does not downsample) and return it."""
    folder = Path(folder)
    vocab_dir = folder.parent / f"{folder.name}-vocab"
    vocab_dir.mkdir(parents=True, exist_ok=True)
    letters = list(string.ascii_lowercase)
    tokens = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters]
    (vocab_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (vocab_dir / "merges.txt").write_text("#version: 0.2\n")  # no merges: one token per letter
    tokenizer = CLIPTokenizer(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokens), hidden_size=CROSS_DIM, intermediate_size=37, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    vae = tiny_vae()
    unet = make_unet("sd15")
    with torch.no_grad():  # sharper attention than random init gives, so that reusing a map changes the image
        for name, param in unet.named_parameters():
            if name.endswith(("to_q.weight", "to_k.weight")):
                param.mul_(4)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(num_train_timesteps=1000, clip_sample=False, steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def write_prompts(path: Path, prompts=PROMPTS) -> Path:
    Path(path).write_text("\n".join(prompts) + "\n")
    return Path(path)
