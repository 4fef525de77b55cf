"""Writing image grids as PNG (Pillow), optionally with a title, column headers and a label per row."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def save_grid(rows: list[torch.Tensor], path, scale: int = 8, pad: int = 2, labels: list[str] | None = None,
              columns: list[str] | None = None, title: str | None = None, font_size: int = 15) -> None:
    """Save rows of ``[N, 1, H, W]`` images in [0, 1] as one grey PNG, each pixel ``scale``×``scale``.

    ``labels`` (one per row, may span lines), ``columns`` (one header per image column) and ``title`` are
    drawn in Pillow's default font; without them the PNG holds the images alone.
    """
    cols = max(len(r) for r in rows)
    h, w = rows[0].shape[-2:]
    ch, cw = h * scale + pad, w * scale + pad
    font = ImageFont.load_default(size=font_size)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))

    def size(text):
        left, top, right, bottom = probe.multiline_textbbox((0, 0), text, font=font)
        return right, bottom

    line = size("Ag")[1] + 4
    left = max((size(t)[0] for t in labels), default=0) + 12 if labels else 0
    top = (line + 4 if title else 0) + (line if columns else 0)
    ch = max(ch, *(size(t)[1] + 8 for t in labels)) if labels else ch
    canvas = np.full((top + len(rows) * ch + pad, left + cols * cw + pad), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            tile = (img[0].float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
            tile = np.kron(tile, np.ones((scale, scale), dtype=np.uint8))
            y, x = top + pad + i * ch, left + pad + j * cw
            canvas[y: y + h * scale, x: x + w * scale] = tile
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((pad + 4, 4), title, fill=0, font=font)
    for j, text in enumerate(columns or []):
        draw.text((left + pad + j * cw + 4, top - line), text, fill=0, font=font)
    for i, text in enumerate(labels or []):
        draw.multiline_text((6, top + pad + i * ch + 2), text, fill=0, font=font)
    image.save(path)
