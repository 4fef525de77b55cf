"""``python -m attnreuse demo``: sample with and without attention-map reuse and compare."""
from __future__ import annotations

import argparse
import time

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

import attnreuse


@torch.no_grad()
def _sample(unet, steps, seed, context):
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t, encoder_hidden_states=context).sample, t, x).prev_sample
    return x


def demo(args) -> None:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=32, attention_head_dim=4).eval()
    context = torch.randn(1, 7, 32)
    t0 = time.perf_counter()
    full = _sample(unet, args.steps, 0, context)
    t_full = time.perf_counter() - t0
    with attnreuse.patch(unet, attnreuse.hurry(args.steps, args.reuse)):
        t0 = time.perf_counter()
        reused = _sample(unet, args.steps, 0, context)
        t_reuse = time.perf_counter() - t0
    rel = ((reused - full).norm() / full.norm()).item()
    print(f"full {args.steps} steps: {t_full * 1e3:.0f} ms; HURRY-{args.reuse}: {t_reuse * 1e3:.0f} ms; "
          f"relative difference {rel:.4f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m attnreuse")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="sample with and without reuse and compare")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--reuse", type=int, default=10)
    args = parser.parse_args(argv)
    demo(args)


if __name__ == "__main__":
    main()
