"""The PNGs of search and bench, drawn with Pillow alone: the utility per round and labelled image grids."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

FONT_SIZE = 14


def _font():
    return ImageFont.load_default(size=FONT_SIZE)


def utility_plot(candidates: list[tuple[int, float]], best: list[tuple[int, float]], title: str,
                 width: int = 720, height: int = 420) -> Image.Image:
    """Every candidate's utility (grey dots) and the accepted schedule's (black line) per round; round 0 is
    the start schedule."""
    font = _font()
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 70, 20, 56, 50
    values = [u for _, u in candidates + best]
    low, high = min(values), max(values)
    pad = max(0.5, 0.05 * (high - low))
    low, high = low - pad, high + pad
    last = max(1, max(r for r, _ in candidates + best))

    def xy(r, u):
        return (left + (r + 0.25) / (last + 0.5) * (width - left - right), top + (high - u) / (high - low) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for k in range(6):
        u = low + k * (high - low) / 5
        y = xy(0, u)[1]
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((left - 8, y), f"{u:.1f}", fill="black", font=font, anchor="rm")
    for r in range(last + 1):
        x, y = xy(r, low)
        draw.line([x, y, x, y + 4], fill="black")
        draw.text((x, y + 8), "start" if r == 0 else str(r), fill="black", font=font, anchor="mt")
    for r, u in candidates:
        x, y = xy(r, u)
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(150, 150, 150))
    points = [xy(r, u) for r, u in best]
    if len(points) > 1:
        draw.line(points, fill="black", width=2)
    for x, y in points:
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill="black")
    draw.text((8, 6), title, fill="black", font=font)
    draw.text(((left + width - right) / 2, height - 8), "round (grey: every candidate, black: schedule kept)",
              fill="black", font=font, anchor="md")
    draw.text((8, top - 24), "mean PSNR vs full sampler (dB)", fill="black", font=font)
    return image


def image_grid(rows: list[torch.Tensor], labels: list[str], title: str, tile: int = 128) -> Image.Image:
    """Rows of ``[N, C, H, W]`` images in [0, 1] (C = 1 or 3), each resized to ``tile`` pixels high, with a
    label left of each row."""
    font = _font()
    tiles = [[_tile(img, tile) for img in row] for row in rows]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(probe.multiline_textbbox((0, 0), t, font=font)[2] for t in labels) + 16
    pad, head = 4, FONT_SIZE + 12
    cols = max(len(r) for r in tiles)
    tile_w = max(t.width for r in tiles for t in r)
    image = Image.new("RGB", (label_w + cols * (tile_w + pad) + pad, head + len(rows) * (tile + pad) + pad), "white")
    draw = ImageDraw.Draw(image)
    draw.text((pad, 4), title, fill="black", font=font)
    for i, (row, label) in enumerate(zip(tiles, labels)):
        y = head + pad + i * (tile + pad)
        draw.multiline_text((pad, y + 4), label, fill="black", font=font)
        for j, t in enumerate(row):
            image.paste(t, (label_w + pad + j * (tile_w + pad), y))
    return image


def _tile(img: torch.Tensor, size: int) -> Image.Image:
    array = (img.float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    array = np.repeat(array, 3, axis=0) if array.shape[0] == 1 else array[:3]
    picture = Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)), "RGB")
    h, w = array.shape[1:]
    resample = Image.NEAREST if h < size else Image.LANCZOS  # small images as crisp pixels
    return picture.resize((max(1, round(w * size / h)), size), resample)
