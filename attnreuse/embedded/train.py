"""Train the embedded default model on scikit-learn's digits: ``python -m attnreuse.embedded.train``.

Seeded and CPU-only; writes ``digits.safetensors`` (EMA weights, fp16), ``digits.json`` (metadata) and
``digits_samples.png`` (rows = classes 0-9) into ``--out`` (``out/embedded`` by default), and says whether the
weights are bit-identical to the package's. About 20 minutes on 2 CPU cores. To ship new weights, copy them
into the package: ``cp out/embedded/digits.safetensors out/embedded/digits.json attnreuse/embedded/`` and
``cp out/embedded/digits_samples.png docs/``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from safetensors.torch import save_file

from .grid import save_grid
from .model import BETA_SCHEDULE, NULL_CLASS, NUM_TRAIN_TIMESTEPS, WEIGHTS, build, load_default


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 8×8 digits of scikit-learn, scaled to [-1, 1], and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16 * 2 - 1
    return images, torch.tensor(data.target)


def train(steps: int, batch: int, lr: float, ema_decay: float, cond_drop: float, seed: int, weights: Path) -> dict:
    images, labels = digits()
    unet, tokens = build(seed)
    params = list(unet.parameters()) + list(tokens.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    noise_sched = DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule=BETA_SCHEDULE)
    g = torch.Generator().manual_seed(seed)
    start, losses = time.time(), []
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=g)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(batch, generator=g) < cond_drop] = NULL_CLASS  # classifier-free guidance
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=g)
        pred = unet(noise_sched.add_noise(x0, noise, t), t, encoder_hidden_states=tokens(y)).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p, 1 - ema_decay)
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {sum(losses[-100:]) / len(losses[-100:]):.4f}  "
                  f"{time.time() - start:6.0f} s", flush=True)
    names = [f"unet.{n}" for n, _ in unet.named_parameters()] + ["class_tokens.table"]
    save_file({n: e.half().contiguous() for n, e in zip(names, ema)}, str(weights))
    return {"data": "sklearn.datasets.load_digits (1797 images, 8x8, scaled to [-1, 1])", "steps": steps,
            "batch": batch, "lr": lr, "ema_decay": ema_decay, "cond_drop": cond_drop, "seed": seed,
            "final_loss": sum(losses[-100:]) / len(losses[-100:]), "train_seconds": round(time.time() - start),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m attnreuse.embedded.train", description=__doc__)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema-decay", type=float, default=0.998)
    p.add_argument("--cond-drop", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/embedded", help="folder for the weights, metadata and sample grid "
                                                        "(default: %(default)s)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS.name
    meta = train(args.steps, args.batch, args.lr, args.ema_decay, args.cond_drop, args.seed, weights)
    (out / "digits.json").write_text(json.dumps(meta, indent=1) + "\n")
    pipe = load_default(weights=weights)
    save_grid([pipe([c] * 8, seeds=range(8), num_inference_steps=20) for c in range(10)], out / "digits_samples.png")
    print(json.dumps(meta, indent=1))
    same = sha256(weights) == sha256(WEIGHTS)
    print(f"{weights}: {'bit-identical to' if same else 'differs from'} the package's {WEIGHTS.name} (SHA-256)")


if __name__ == "__main__":
    main()
