"""Writing image grids as PNG (Pillow)."""
from __future__ import annotations

import numpy as np
import torch


def save_grid(rows: list[torch.Tensor], path, scale: int = 8, pad: int = 2) -> None:
    """Save rows of ``[N, 1, H, W]`` images in [0, 1] as one grey PNG, each pixel ``scale``×``scale``."""
    from PIL import Image

    cols = max(len(r) for r in rows)
    h, w = rows[0].shape[-2:]
    ch, cw = h * scale + pad, w * scale + pad
    canvas = np.ones((len(rows) * ch + pad, cols * cw + pad), dtype=np.uint8) * 255
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            tile = (img[0].float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
            tile = np.kron(tile, np.ones((scale, scale), dtype=np.uint8))
            canvas[pad + i * ch: pad + i * ch + h * scale, pad + j * cw: pad + j * cw + w * scale] = tile
    Image.fromarray(canvas).save(path)
