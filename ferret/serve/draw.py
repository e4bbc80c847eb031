"""Drawing regions on images, for the CLI's ``--save-image`` and the web UI's previews.

Boxes become rectangles, points small circles, free-form regions the outline of their mask (found with a
vectorised erosion, not a per-pixel loop, REFERENCE §8 item 34); each gets a label on a filled tag. Fonts are
looked up by name on the system, then in matplotlib's bundled DejaVu, then Pillow's built-in font, so nothing
depends on the working directory.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ferret import regions as R

logger = logging.getLogger(__name__)

PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (128, 128, 0),
)


@functools.lru_cache(maxsize=16)
def load_font(size: int = 16) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """A TrueType font of ``size`` px: DejaVuSans from the system or matplotlib, else Pillow's default."""
    candidates = ["DejaVuSans.ttf"]
    try:
        import matplotlib

        candidates.append(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf"))
    except ImportError:
        pass
    for candidate in candidates:
        try:
            return ImageFont.truetype(candidate, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def color_for(index: int) -> tuple[int, int, int]:
    return PALETTE[index % len(PALETTE)]


def mask_outline(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """The boundary pixels of a bool mask [H, W]: the mask minus its erosion (4-neighbourhood, ``thickness`` times)."""
    mask = np.asarray(mask, dtype=bool)
    inner = mask.copy()
    for _ in range(max(1, thickness)):
        padded = np.pad(inner, 1, constant_values=False)
        inner = (
            padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        )
    return mask & ~inner


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, color, font, image_size) -> None:
    if not text:
        return
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    width, height = right - left + 4, bottom - top + 4
    x = min(max(0.0, xy[0]), max(0.0, image_size[0] - width))
    y = xy[1] - height if xy[1] - height >= 0 else xy[1]
    y = min(max(0.0, y), max(0.0, image_size[1] - height))
    draw.rectangle([x, y, x + width, y + height], fill=color)
    draw.text((x + 2 - left, y + 2 - top), text, fill=(255, 255, 255), font=font)


def draw_regions(
    image: Image.Image,
    items: Iterable[tuple[str, R.Region]],
    width: int | None = None,
    font_size: int | None = None,
    colors: Sequence[tuple[int, int, int]] | None = None,
) -> Image.Image:
    """A copy of ``image`` (RGB) with each ``(label, region)`` drawn; regions are in pixels of ``image``.

    Line width and font size scale with the image unless given.
    """
    canvas = image.convert("RGB").copy()
    side = min(canvas.size)
    width = width or max(1, round(side / 160))
    font = load_font(font_size or max(10, round(side / 28)))
    draw = ImageDraw.Draw(canvas)
    outlines = []
    labels = []
    for k, (label, region) in enumerate(items):
        color = tuple(colors[k % len(colors)]) if colors else color_for(k)
        if isinstance(region, R.Box):
            box = R.clamp_box(region, *canvas.size)
            draw.rectangle([box.x1, box.y1, box.x2, box.y2], outline=color, width=width)
            labels.append(((box.x1, box.y1), label, color))
        elif isinstance(region, R.Point):
            radius = max(3, 2 * width)
            draw.ellipse([region.x - radius, region.y - radius, region.x + radius, region.y + radius],
                         outline=color, width=width, fill=color)
            labels.append(((region.x + radius, region.y - radius), label, color))
        elif isinstance(region, R.FreeForm):
            if region.mask.shape != (canvas.size[1], canvas.size[0]):
                raise ValueError(f"free-form region {label!r} has mask {region.mask.shape} but the image is "
                                 f"[H, W] = [{canvas.size[1]}, {canvas.size[0]}]")
            outlines.append((mask_outline(region.mask, width), color))
            bbox = region.bbox
            labels.append(((bbox.x1, bbox.y1), label, color))
        else:
            raise TypeError(f"cannot draw {type(region).__name__}; expected Point, Box or FreeForm")
    if outlines:
        overlay = np.asarray(canvas).copy()
        for outline, color in outlines:
            overlay[outline] = color
        canvas = Image.fromarray(overlay)
        draw = ImageDraw.Draw(canvas)
    for xy, label, color in labels:
        _label(draw, xy, label, color, font, canvas.size)
    return canvas


def draw_grounding(image: Image.Image, grounded: Iterable[R.GroundedRegion]) -> Image.Image:
    """``image`` with the regions a model answer grounds (``FerretProcessor.post_process``), labelled by phrase."""
    return draw_regions(image, [(g.phrase or f"obj{k}", g.region) for k, g in enumerate(grounded)])


def region_label(index: int) -> str:
    """The name a referring region is shown under: ``[region0]``, ``[region1]``... (the original UI's)."""
    return f"[region{index}]"
