"""Drawing regions on images, for the CLI's ``--save-image`` and the web UI's previews.

Boxes become rectangles, points small circles, free-form regions the outline of their mask (found with a
vectorised erosion, not a per-pixel loop: docs/compatibility.md §12.34); each gets a label on a filled tag. Fonts are
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
    return R.drawn_placeholder(index)


def upscale_factor(size: tuple[int, int], min_side: int = 448, max_factor: int = 16) -> int:
    """The integer factor that brings the shorter side of an image of ``size`` (W, H) to at least ``min_side``
    (1 for images that are large enough)."""
    side = max(1, min(size))
    return max(1, min(max_factor, -(-min_side // side)))


def scale_region(region: R.Region, factor: int) -> R.Region:
    """``region`` (pixels of an image) in pixels of the same image upscaled ``factor`` times with NEAREST: a pixel
    becomes a ``factor`` x ``factor`` block, so a box's last pixel ends at ``(x2 + 1) * factor - 1``."""
    if factor == 1:
        return region
    if isinstance(region, R.Box):
        return R.Box(region.x1 * factor, region.y1 * factor, (region.x2 + 1) * factor - 1,
                     (region.y2 + 1) * factor - 1)
    if isinstance(region, R.Point):
        return R.Point(region.x * factor + factor // 2, region.y * factor + factor // 2)
    if isinstance(region, R.FreeForm):
        return R.FreeForm(np.kron(region.mask, np.ones((factor, factor), dtype=bool)))
    raise TypeError(f"cannot scale {type(region).__name__}; expected Point, Box or FreeForm")


def draw_annotated(image: Image.Image, items: Sequence[tuple[str, R.Region]], min_side: int = 448) -> Image.Image:
    """A picture for people: ``image`` upscaled (NEAREST, so small images stay sharp) to at least ``min_side`` px,
    each region outlined in its colour with a small number tag just outside its top-left corner, and the labels
    written in a legend under the image, so that no label covers the objects.

    Regions are in pixels of ``image``.
    """
    factor = upscale_factor(image.size, min_side)
    big = image.convert("RGB").resize((image.width * factor, image.height * factor), Image.NEAREST)
    side = min(big.size)
    width = max(2, round(side / 200))
    tag_font = load_font(max(11, round(side / 32)))
    legend_font = load_font(max(12, round(side / 28)))
    probe = ImageDraw.Draw(big)
    tag_height = probe.textbbox((0, 0), "0", font=tag_font)[3] + 6
    line_height = probe.textbbox((0, 0), "Ag", font=legend_font)[3] + 8
    margin = tag_height + width
    legend_height = line_height * len(items) + (8 if items else 0)
    canvas = Image.new("RGB", (big.width + 2 * margin, big.height + 2 * margin + legend_height), (255, 255, 255))
    canvas.paste(big, (margin, margin))
    scaled = [(label, _shift(scale_region(region, factor), margin, canvas.size)) for label, region in items]
    colors = [color_for(k) for k in range(len(items))]
    outlined = draw_regions(canvas, [("", r) for _, r in scaled], width=width, colors=colors or None)
    draw = ImageDraw.Draw(outlined)
    for k, (_, region) in enumerate(scaled):
        x, y = _corner(region)
        tag = str(k + 1)
        left, top, right, bottom = draw.textbbox((0, 0), tag, font=tag_font)
        w, h = right - left + 6, bottom - top + 6
        if isinstance(region, R.Point):  # a point lies on an object: its tag goes in the top margin, with a leader
            tx, ty = min(max(0, x - w / 2), outlined.width - w), 0
            draw.line([(x, h), (x, y)], fill=colors[k], width=1)
        else:  # left of the corner and above it: outside the region
            tx, ty = min(max(0, x - w), outlined.width - w), max(0, y - h)
        draw.rectangle([tx, ty, tx + w, ty + h], fill=colors[k])
        draw.text((tx + 3 - left, ty + 3 - top), tag, fill=(255, 255, 255), font=tag_font)
    y = big.height + 2 * margin + 4
    for k, (label, _) in enumerate(items):
        swatch = line_height - 10
        draw.rectangle([margin, y + 2, margin + swatch, y + 2 + swatch], fill=colors[k])
        draw.text((margin + swatch + 8, y), f"{k + 1}  {label}", fill=(20, 20, 20), font=legend_font)
        y += line_height
    return outlined


def _shift(region: R.Region, offset: int, canvas_size: tuple[int, int]) -> R.Region:
    """``region`` moved ``offset`` px right and down, onto a canvas of ``canvas_size`` (W, H)."""
    if isinstance(region, R.Box):
        return R.Box(region.x1 + offset, region.y1 + offset, region.x2 + offset, region.y2 + offset)
    if isinstance(region, R.Point):
        return R.Point(region.x + offset, region.y + offset)
    height, width = region.mask.shape
    pad = ((offset, canvas_size[1] - offset - height), (offset, canvas_size[0] - offset - width))
    return R.FreeForm(np.pad(region.mask, pad, constant_values=False))


def _corner(region: R.Region) -> tuple[float, float]:
    if isinstance(region, R.Box):
        return region.x1, region.y1
    if isinstance(region, R.Point):
        return region.x, region.y
    box = region.bbox
    return box.x1, box.y1
