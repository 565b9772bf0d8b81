"""Attention figures in the style of Show, Attend and Tell, drawn with Pillow.

The figure is a grid: the input image first, then one panel per generated word. In a word's panel the image is
dimmed and the regions the decoder attended to most while emitting that word are lit up again, each with an opacity
proportional to its weight, outlined and labelled ``"word: object (0.42)"``; the word is written under its panel.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from butd.captioner import ImageCaption
from butd.core.files import write_atomic

# Outline colours by rank of the region (most attended first): distinct on photographs and for colour-blind readers.
RANK_COLOURS = [(255, 200, 0), (0, 190, 255), (255, 90, 170), (120, 230, 90), (255, 140, 40)]
BACKGROUND = (255, 255, 255)
TEXT = (25, 25, 35)
DIM = 0.6  # how much of the image is replaced by black outside the attended regions


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _fit(image: Image.Image, width: int) -> Image.Image:
    height = max(1, round(image.height * width / image.width))
    return image.resize((width, height), Image.Resampling.LANCZOS)


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap so that every line fits in ``width`` pixels."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if current and font.getlength(trial) > width:
            lines.append(current)
            current = word
        else:
            current = trial
    return lines + [current] if current else lines or [""]


def word_panel(
    image: Image.Image, result: ImageCaption, word_index: int, *, top_k: int = 3, label_font_size: int = 13
) -> Image.Image:
    """The image (already scaled) with the ``top_k`` most-attended regions of word ``word_index`` lit and labelled."""
    scale = image.width / max(1, result.width)
    dimmed = Image.blend(image, Image.new("RGB", image.size, (0, 0, 0)), DIM)
    top = result.top_regions(word_index, top_k)
    peak = max((w for _, w in top), default=0.0)
    # Light the regions weakest first, so the strongest one is drawn on top where they overlap.
    for region_index, weight in reversed(top):
        x1, y1, x2, y2 = _scaled_box(result.regions[region_index].box, scale, image.size)
        if x2 <= x1 or y2 <= y1 or peak <= 0:
            continue
        alpha = Image.new("L", (x2 - x1, y2 - y1), round(255 * weight / peak))
        dimmed.paste(image.crop((x1, y1, x2, y2)), (x1, y1), alpha)
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    font = _font(label_font_size)
    word = result.words[word_index]
    placed: list[tuple[int, int, int, int]] = []
    # Strongest first, so its label gets the best place; outlines are drawn before any label covers them.
    for rank, (region_index, weight) in enumerate(top):
        colour = RANK_COLOURS[rank % len(RANK_COLOURS)]
        opacity = round(110 + 145 * (weight / peak if peak > 0 else 0.0))
        box = _scaled_box(result.regions[region_index].box, scale, image.size)
        draw.rectangle(box, outline=colour + (opacity,), width=3 if rank == 0 else 2)
    for rank, (region_index, weight) in enumerate(top):
        region = result.regions[region_index]
        colour = RANK_COLOURS[rank % len(RANK_COLOURS)]
        x1, y1, _, _ = _scaled_box(region.box, scale, image.size)
        label = f"{word}: {region.object or 'region'} ({weight:.2f})"
        left, top_px, right, bottom = draw.textbbox((0, 0), label, font=font)
        w, h = right - left + 6, bottom - top_px + 6
        lx = min(max(0, x1), max(0, image.width - w))
        ly = y1 - h if y1 >= h else y1  # above the box, or just inside it at the top edge
        while any(_overlaps((lx, ly, lx + w, ly + h), other) for other in placed) and ly + h < image.height:
            ly += h  # stack labels that would cover each other
        placed.append((lx, ly, lx + w, ly + h))
        draw.rectangle(placed[-1], fill=colour + (235,))
        draw.text((lx + 3 - left, ly + 3 - top_px), label, font=font, fill=(0, 0, 0, 255))
    return Image.alpha_composite(dimmed.convert("RGBA"), overlay).convert("RGB")


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _scaled_box(box: tuple[float, float, float, float], scale: float, size: tuple[int, int]) -> tuple[int, ...]:
    w, h = size
    x1, y1, x2, y2 = (v * scale for v in box)
    return (
        int(np.clip(math.floor(x1), 0, w)),
        int(np.clip(math.floor(y1), 0, h)),
        int(np.clip(math.ceil(x2), 0, w)),
        int(np.clip(math.ceil(y2), 0, h)),
    )


def attention_figure(
    image: Image.Image | np.ndarray,
    result: ImageCaption,
    *,
    columns: int = 4,
    panel_width: int = 320,
    top_k: int = 3,
) -> Image.Image:
    """The whole figure: a title with the caption, then the image and one panel per word, ``columns`` per row.

    ``image`` is the picture the caption was computed on (the boxes are in its pixels). The figure grows by one
    panel per word.
    """
    picture = Image.fromarray(image) if isinstance(image, np.ndarray) else image.convert("RGB")
    if picture.size != (result.width, result.height):
        raise ValueError(
            f"{result.name}: the image is {picture.width}x{picture.height} but the caption's boxes are for "
            f"{result.width}x{result.height}"
        )
    scaled = _fit(picture, panel_width)
    panels = [(scaled, "(input)")] + [
        (word_panel(scaled, result, i, top_k=top_k), word) for i, word in enumerate(result.words)
    ]
    cols = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / cols)
    gap, word_height = 12, 34
    title_font, word_font = _font(22), _font(20)
    title_lines = _wrap(result.caption or "(empty caption)", title_font, cols * (panel_width + gap) - gap)
    title_height = 16 + 28 * len(title_lines)
    cell_h = scaled.height + word_height
    figure = Image.new(
        "RGB", (gap + cols * (panel_width + gap), title_height + rows * (cell_h + gap) + gap), BACKGROUND
    )
    draw = ImageDraw.Draw(figure)
    for i, line in enumerate(title_lines):
        draw.text((gap, 10 + 28 * i), line, font=title_font, fill=TEXT)
    for index, (panel, word) in enumerate(panels):
        row, col = divmod(index, cols)
        x = gap + col * (panel_width + gap)
        y = title_height + row * (cell_h + gap)
        figure.paste(panel, (x, y))
        length = word_font.getlength(word)
        colour = (120, 120, 130) if index == 0 else TEXT
        draw.text((x + (panel_width - length) / 2, y + scaled.height + 6), word, font=word_font, fill=colour)
    return figure


def save_attention_figure(image: Image.Image | np.ndarray, result: ImageCaption, path: str | Path, **kwargs) -> Path:
    """Draw ``attention_figure`` and write it as a PNG atomically (temporary file, then rename). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = attention_figure(image, result, **kwargs)
    write_atomic(path, lambda tmp: figure.save(tmp, format="PNG"))
    return path
