"""The hybrid region representation: points, boxes and free-form shapes, in text and as masks.

This module owns everything that knows Ferret's coordinate grid and the way coordinates are written:

* ``Point``, ``Box`` and ``FreeForm`` describe a region in pixels of the user's image (x right, y down,
  0-based; box corners inclusive).
* ``to_grid`` / ``from_grid`` convert between pixels and the ``GRID_SIZE`` x ``GRID_SIZE`` grid (values
  0..999) that the model reads and writes, truncating exactly as the original does.
* ``region_to_text`` writes ``"[x, y]"`` or ``"[x1, y1, x2, y2]"``; ``parse_regions`` reads them back out of
  generated text, robustly; ``strip_regions`` removes them.
* ``PLACEHOLDER`` / ``find_placeholders`` / ``placeholder_text``: the placeholders ``<region{k}>`` (and the
  original data's ``<bbox_location{k}>``) that name the k-th region of a turn in a conversation, and the text
  that replaces one in the prompt (``"[x1, y1, x2, y2] <region_fea>"`` in a user turn, the coordinates alone
  in an answer).
* ``region_mask`` builds the boolean feature mask of a region, shaped ``[H, W]`` (row = y), following the
  original's rules (an 11 x 11 window for a point, the box, the shape; each limited by a segmentation when one
  is given); for images larger than ``max_side`` it builds it on a coarser grid (``mask_stride``).

Nothing else in the package should format or parse a coordinate, or name the grid size.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np

from ferret.constants import GRID_SIZE, POINT_SPAN, REGION_TOKEN

logger = logging.getLogger(__name__)

# The most pixels a decoded mask (or a region's image) may have unless a caller says otherwise: twice PIL's own
# decompression-bomb threshold, ~179 MB as a bool mask.
MAX_MASK_PIXELS = 2 * 89_478_485

__all__ = [
    "Point",
    "Box",
    "FreeForm",
    "MAX_MASK_PIXELS",
    "check_rle",
    "Region",
    "GroundedRegion",
    "to_grid",
    "from_grid",
    "clamp_box",
    "region_to_text",
    "region_mask",
    "validate_region",
    "parse_regions",
    "strip_regions",
    "shift_region",
    "PLACEHOLDER",
    "TYPED_PLACEHOLDER",
    "placeholder",
    "grit_placeholder",
    "drawn_placeholder",
    "typed_to_placeholders",
    "find_placeholders",
    "dense_wh_mask",
    "placeholder_text",
    "mask_stride",
]


# ----------------------------------------------------------------------------------------------------------
# Region types


@dataclass(frozen=True)
class Point:
    """A point in image pixels."""

    x: float
    y: float


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in image pixels; (x1, y1) and (x2, y2) are inclusive corners."""

    x1: float
    y1: float
    x2: float
    y2: float


@dataclass(frozen=True, eq=False)
class FreeForm:
    """A free-form region given by a boolean mask shaped ``[H, W]`` (row = y) over the whole image."""

    mask: np.ndarray

    def __post_init__(self) -> None:
        mask = np.asarray(self.mask)
        if mask.ndim != 2:
            raise ValueError(f"FreeForm mask must be 2-D [H, W], got shape {mask.shape}")
        if mask.shape[0] == 0 or mask.shape[1] == 0:
            raise ValueError(f"FreeForm mask must have a non-zero size, got shape {mask.shape}")
        if mask.dtype != np.bool_:
            if not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)):
                raise ValueError(f"FreeForm mask must be bool or numeric (non-zero = inside), got dtype {mask.dtype}")
            mask = mask != 0
        # The dataclass is frozen; store a private read-only copy so the region cannot change under its users.
        mask = np.array(mask, dtype=bool, copy=True)
        mask.flags.writeable = False
        object.__setattr__(self, "mask", mask)

    def __repr__(self) -> str:
        return f"FreeForm(mask=[{self.height}, {self.width}], pixels={int(self.mask.sum())})"

    @property
    def height(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    @property
    def bbox(self) -> Box:
        """Tight bounding box of the True pixels. Raises ValueError for an empty mask."""
        rows = np.flatnonzero(self.mask.any(axis=1))
        cols = np.flatnonzero(self.mask.any(axis=0))
        if rows.size == 0:
            raise ValueError(f"{self!r} is empty: it has no pixel set, so it has no bounding box")
        return Box(float(cols[0]), float(rows[0]), float(cols[-1]), float(rows[-1]))

    @classmethod
    def from_polygon(
        cls, polygon: Sequence[tuple[float, float]], width: int, height: int, max_pixels: int | None = MAX_MASK_PIXELS
    ) -> FreeForm:
        """Fill a polygon given as (x, y) vertices in pixels (at least 3) on a ``width`` x ``height`` image.

        The image may have at most ``max_pixels`` pixels (None: no limit), checked before the canvas is allocated.
        """
        _check_image_size(width, height)
        if max_pixels is not None and width * height > max_pixels:
            raise ValueError(f"polygon canvas {width}x{height} is {width * height} pixels, more than the limit of "
                             f"{max_pixels}")
        vertices = _check_vertices(polygon, "polygon", minimum=3)
        from PIL import Image, ImageDraw

        canvas = Image.new("L", (width, height), 0)
        ImageDraw.Draw(canvas).polygon(vertices, fill=1, outline=1)
        mask = np.asarray(canvas, dtype=np.uint8) != 0
        if not mask.any():
            raise ValueError(f"polygon {vertices} covers no pixel of the {width}x{height} image")
        return cls(mask)

    @classmethod
    def from_scribble(
        cls, points: Sequence[tuple[float, float]], width: int, height: int, radius: int = 2
    ) -> FreeForm:
        """A stroke of half-width ``radius`` pixels through (x, y) points (at least 1), with round joints and ends.

        As in the original demo, a scribble is the stroke pixels only; it is not filled.
        """
        _check_image_size(width, height)
        vertices = _check_vertices(points, "scribble", minimum=1)
        if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
            raise ValueError(f"scribble radius must be a non-negative integer, got {radius!r}")
        from PIL import Image, ImageDraw

        canvas = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        if len(vertices) > 1:
            draw.line(vertices, fill=1, width=2 * int(radius) + 1)
        if radius == 0:
            draw.point(vertices, fill=1)  # PIL draws nothing for a zero-size ellipse
        else:
            for x, y in vertices:
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=1, outline=1)
        mask = np.asarray(canvas, dtype=np.uint8) != 0
        if not mask.any():
            raise ValueError(f"scribble {vertices} covers no pixel of the {width}x{height} image")
        return cls(mask)

    @classmethod
    def from_rle(
        cls, rle: dict, image_size: tuple[int, int] | None = None, max_pixels: int | None = MAX_MASK_PIXELS
    ) -> FreeForm:
        """Decode a COCO RLE dict ``{"size": [h, w], "counts": str | bytes | list[int]}``.

        Everything is checked by ``check_rle`` before anything of the mask's size is allocated: the declared size
        against ``image_size`` (W, H) when given and against ``max_pixels``, then the runs. Raises ValueError
        naming what is wrong.
        """
        from pycocotools import mask as mask_utils

        h, w, counts = check_rle(rle, image_size=image_size, max_pixels=max_pixels)
        if isinstance(counts, bytes):
            encoded = {"size": [h, w], "counts": counts}
        else:
            encoded = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
        try:
            with warnings.catch_warnings():
                # pycocotools' own numpy-2 `__array__(copy=...)` deprecation, not something callers can act on
                warnings.simplefilter("ignore", DeprecationWarning)
                decoded = mask_utils.decode(encoded)
        except Exception as exc:  # pycocotools raises assorted errors for corrupt strings
            raise ValueError(f"could not decode RLE of size [{h}, {w}]: {exc}") from exc
        if decoded.shape != (h, w):
            raise ValueError(f"RLE decoded to shape {decoded.shape}, expected [h, w] = [{h}, {w}]")
        return cls(decoded != 0)

    @classmethod
    def from_coco_segmentation(cls, segmentation: object, width: int, height: int) -> FreeForm:
        """A COCO segmentation of a ``width`` x ``height`` image: an RLE dict (its declared size checked against
        the image before anything is decoded) or a list of flat polygons ``[x1, y1, x2, y2, ...]`` (their union)."""
        if isinstance(segmentation, dict):
            return cls.from_rle(segmentation, image_size=(width, height))
        if not isinstance(segmentation, (list, tuple)) or not segmentation:
            raise ValueError(f"a segmentation is an RLE dict or a non-empty list of polygons, got {_short(segmentation)}")
        mask = None
        for polygon in segmentation:
            if not isinstance(polygon, (list, tuple)) or len(polygon) < 6 or len(polygon) % 2:
                raise ValueError(f"a segmentation polygon needs at least 3 (x, y) pairs, got {_short(polygon)}")
            part = cls.from_polygon(list(zip(polygon[0::2], polygon[1::2])), width, height).mask
            mask = part if mask is None else mask | part
        return cls(mask)

    def to_rle(self) -> dict:
        """Encode as a COCO RLE dict ``{"size": [h, w], "counts": str}``."""
        from pycocotools import mask as mask_utils

        encoded = mask_utils.encode(np.asfortranarray(self.mask.astype(np.uint8)))
        return {"size": [self.height, self.width], "counts": encoded["counts"].decode("ascii")}


def check_rle(
    rle: object, image_size: tuple[int, int] | None = None, max_pixels: int | None = MAX_MASK_PIXELS
) -> tuple[int, int, bytes | list[int]]:
    """Check a COCO RLE dict without decoding it; returns (h, w, counts) ready for pycocotools.

    In this order, each step bounded by what the previous one proved: the dict and its ``size`` [h, w] (positive
    integers); ``size`` equals the image's ``image_size`` (W, H) when given; h * w <= ``max_pixels`` (None: no
    limit); the counts string is no longer than the most runs an h x w mask can have; then the runs themselves
    (non-negative integers covering exactly h * w pixels). Nothing here allocates more than the counts' own size,
    so a 148-byte RLE declaring a 10^6 x 10^6 mask is refused in microseconds. Raises ValueError naming the
    problem; counts that are not integers (e.g. ``[3136.5]``) are malformed, never truncated.
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"RLE must be a dict with 'size' [h, w] and 'counts', got {_short(rle)}")
    size = rle["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_count(v) and v > 0 for v in size)):
        raise ValueError(f"RLE 'size' must be [h, w] with positive integers, got {_short(size)}")
    h, w = int(size[0]), int(size[1])
    if image_size is not None:
        image_w, image_h = image_size
        if (h, w) != (image_h, image_w):
            raise ValueError(f"RLE size [h, w] = [{h}, {w}] differs from the image's [{image_h}, {image_w}]")
    if max_pixels is not None and h * w > max_pixels:
        raise ValueError(f"RLE size [h, w] = [{h}, {w}] is {h * w} pixels, more than the limit of {max_pixels}")
    counts = rle["counts"]
    # An h x w mask has at most h * w + 1 runs; a compressed run takes at most 7 characters.
    most_runs = h * w + 1
    if isinstance(counts, (str, bytes)):
        if isinstance(counts, str):
            if not counts.isascii():
                raise ValueError("the RLE counts string has non-ASCII characters")
            counts = counts.encode("ascii")
        if len(counts) > 7 * most_runs:
            raise ValueError(f"the RLE counts string has {len(counts)} characters, more than an [{h}, {w}] mask "
                             "can need")
        # pycocotools decodes runs that do not cover the image into uninitialised memory: check them first.
        runs = _rle_runs(counts)
        if runs.min() < 0 or int(runs.sum()) != h * w:
            raise ValueError(
                f"RLE runs cover {int(runs.sum())} pixels (smallest run {int(runs.min())}), expected h*w = {h * w}"
            )
        return h, w, counts
    if isinstance(counts, (list, tuple)):
        if len(counts) > most_runs:
            raise ValueError(f"uncompressed RLE counts have {len(counts)} runs, more than an [{h}, {w}] mask can have")
        for i, c in enumerate(counts):
            if not _is_count(c):
                raise ValueError(f"uncompressed RLE counts must be integers, run {i} is {_short(c)}")
            if c < 0:
                raise ValueError(f"uncompressed RLE counts have a negative run length ({c} at run {i})")
        total = sum(int(c) for c in counts)
        if total != h * w:
            raise ValueError(f"uncompressed RLE counts sum to {total}, expected h*w = {h * w}")
        return h, w, [int(c) for c in counts]
    raise ValueError(f"RLE 'counts' must be str, bytes or a list of ints, got {type(counts).__name__}")


def _is_count(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def dense_wh_mask(value: object, width: int, height: int) -> np.ndarray:
    """The original's dense mask layout, nested lists ``[W][H]`` (first index = x, non-zero = inside), as a bool
    mask [H, W]. The nesting is checked against the image's size before any array is built."""
    _check_image_size(width, height)
    if not isinstance(value, (list, tuple)) or len(value) != width:
        got = f"{len(value)} rows" if isinstance(value, (list, tuple)) else type(value).__name__
        raise ValueError(f"a dense mask must be nested lists [W][H] = [{width}][{height}] (first index = x), got {got}")
    for x, column in enumerate(value):
        if not isinstance(column, (list, tuple)) or len(column) != height:
            got = f"{len(column)} values" if isinstance(column, (list, tuple)) else type(column).__name__
            raise ValueError(f"dense mask row {x} must hold H = {height} values, got {got}")
    try:
        array = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError) as err:
        raise ValueError(f"a dense mask must hold numbers only ({err})") from None
    if not np.isfinite(array).all():
        raise ValueError("a dense mask holds NaN or infinity")
    return np.ascontiguousarray(array.T != 0)


def _rle_runs(counts: bytes) -> np.ndarray:
    """Run lengths of a compressed COCO RLE string (the format pycocotools writes), int64 [M].

    Each number is a little-endian sequence of 5-bit groups offset by 48 ('0'); bit 0x20 marks "more follows",
    bit 0x10 of the last group is the sign; from the third number on, each is a difference to the one two places
    earlier. Raises ValueError for characters outside the alphabet or a string that ends inside a number.
    """
    raw = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    if raw.size == 0:
        raise ValueError("the RLE counts string is empty")
    if raw.min() < 0 or raw.max() > 63:
        raise ValueError("the RLE counts string has characters outside '0'..'o'")
    ends = (raw & 0x20) == 0
    if not ends[-1]:
        raise ValueError("the RLE counts string ends inside a number")
    starts = np.flatnonzero(np.concatenate(([True], ends[:-1])))
    lengths = np.diff(np.append(starts, raw.size))
    if lengths.max() > 7:  # 7 x 5 bits cover any count of a 2^32-pixel mask
        raise ValueError("the RLE counts string has a number longer than 7 characters")
    position = np.arange(raw.size) - np.repeat(starts, lengths)
    values = np.add.reduceat((raw & 0x1F) << (5 * position), starts)
    negative = (raw[starts + lengths - 1] & 0x10) != 0
    values[negative] -= np.left_shift(np.int64(1), 5 * lengths[negative])
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    return runs


Region = Union[Point, Box, FreeForm]


# ----------------------------------------------------------------------------------------------------------
# Grid conversion


def to_grid(v: float, size: int) -> int:
    """Pixel coordinate -> grid value: ``int(v * 1000 / size)`` clamped to 0..999.

    The original clamps boxes to [0, size - 1] before converting; ``region_to_text`` does that too.
    """
    _check_size(size, "size")
    _check_finite(v, "coordinate")
    return min(max(int(v * GRID_SIZE / size), 0), GRID_SIZE - 1)


def from_grid(v: int, size: int) -> int:
    """Grid value -> pixel coordinate: ``int(v * size / 1000)`` (truncating, as the original).

    Values outside 0..999 are clamped first, so the result always lies in 0..size-1.
    """
    _check_size(size, "size")
    _check_finite(v, "grid value")
    v = min(max(v, 0), GRID_SIZE - 1)
    return int(v * size / GRID_SIZE)


def clamp_box(box: Box, width: int, height: int) -> Box:
    """Clamp a box to [0, width - 1] x [0, height - 1] and order its corners (x1 <= x2, y1 <= y2)."""
    _check_image_size(width, height)
    if not isinstance(box, Box):
        raise ValueError(f"clamp_box expects a Box, got {box!r}")
    for name in ("x1", "y1", "x2", "y2"):
        _check_finite(getattr(box, name), f"{box!r}.{name}")
    x1, x2 = sorted((_clip(box.x1, width - 1), _clip(box.x2, width - 1)))
    y1, y2 = sorted((_clip(box.y1, height - 1), _clip(box.y2, height - 1)))
    return Box(x1, y1, x2, y2)


def region_to_text(region: Region, width: int, height: int) -> str:
    """Write a region as the model reads it: ``"[x, y]"`` for a Point, ``"[x1, y1, x2, y2]"`` otherwise.

    Coordinates are clamped to the image, then mapped to the 0..999 grid. A FreeForm is written as its bbox.
    """
    validate_region(region, width, height)
    if isinstance(region, Point):
        x = to_grid(_clip(region.x, width - 1), width)
        y = to_grid(_clip(region.y, height - 1), height)
        return f"[{x}, {y}]"
    box = clamp_box(region.bbox if isinstance(region, FreeForm) else region, width, height)
    return "[{}, {}, {}, {}]".format(
        to_grid(box.x1, width), to_grid(box.y1, height), to_grid(box.x2, width), to_grid(box.y2, height)
    )


# ----------------------------------------------------------------------------------------------------------
# Masks


def validate_region(region: Region, width: int, height: int) -> None:
    """Raise ValueError naming the region and what is wrong if it cannot be used on a ``width`` x ``height`` image.

    A Point must lie inside the image; a Box must overlap it (it is clamped later); a FreeForm mask must be
    shaped [height, width] and have at least one pixel set.
    """
    _check_image_size(width, height)
    if isinstance(region, Point):
        _check_finite(region.x, f"{region!r}.x")
        _check_finite(region.y, f"{region!r}.y")
        if not (0 <= region.x < width and 0 <= region.y < height):
            raise ValueError(f"{region!r} lies outside the {width}x{height} image (expected 0 <= x < W, 0 <= y < H)")
    elif isinstance(region, Box):
        for name in ("x1", "y1", "x2", "y2"):
            _check_finite(getattr(region, name), f"{region!r}.{name}")
        xs, ys = (region.x1, region.x2), (region.y1, region.y2)
        if max(xs) < 0 or min(xs) >= width or max(ys) < 0 or min(ys) >= height:
            raise ValueError(f"{region!r} lies outside the {width}x{height} image")
    elif isinstance(region, FreeForm):
        if region.mask.shape != (height, width):
            raise ValueError(
                f"{region!r} has mask shape {region.mask.shape}, expected [H, W] = [{height}, {width}] of the image"
            )
        if not region.mask.any():
            raise ValueError(f"{region!r} is empty: it has no pixel set")
    else:
        raise ValueError(f"expected a Point, Box or FreeForm region, got {type(region).__name__}: {_short(region)}")


def mask_stride(width: int, height: int, max_side: int | None) -> int:
    """Pixels per mask cell along each axis: 1 when both sides are at most ``max_side`` (or ``max_side`` is None),
    else ``ceil(max(width, height) / max_side)``, so that the mask's longer side is at most ``max_side``."""
    _check_image_size(width, height)
    if max_side is None:
        return 1
    _check_size(max_side, "max_side")
    return max(1, -(-max(width, height) // max_side))


def region_mask(
    region: Region, width: int, height: int, within: np.ndarray | Box | None = None, max_side: int | None = None
) -> np.ndarray:
    """The boolean feature mask of a region, shaped ``[height, width]`` (row = y).

    * Point: the (2 * POINT_SPAN + 1)^2 window around the (integer) point, clipped to the image, intersected
      with ``within`` (a segmentation mask [H, W] or a Box) when given.
    * Box: the box (clamped, integer, inclusive corners) intersected with ``within``; if they do not overlap,
      the box alone is used and a warning is logged.
    * FreeForm: its bbox intersected with its shape, i.e. the shape's pixels. ``within`` is not used.

    Size: when ``max_side`` is given and the image is larger than it (either side), the mask is built on a grid
    of ``s x s``-pixel cells, ``s = mask_stride(width, height, max_side)``, shaped
    ``[ceil(height / s), ceil(width / s)]``: a cell is set when the region's pixel mask above would set any pixel
    in it (boxes and point windows are mapped cell-wise, shapes and ``within`` masks are max-pooled). Images no
    larger than ``max_side`` get exactly the pixel mask. The sampler reads a mask in its own normalised
    coordinates, so a coarser mask selects the same part of the image.

    Raises ValueError naming the region when it lies outside the image or the resulting mask is empty.
    """
    validate_region(region, width, height)
    stride = mask_stride(width, height, max_side)
    within_mask = None if within is None else _within_mask(within, width, height, region, stride)

    if isinstance(region, FreeForm):
        # bbox & shape is the shape itself; pooling it keeps every cell the shape touches.
        mask = _pool_any(region.mask, stride)
    elif isinstance(region, Point):
        x, y = int(region.x), int(region.y)
        window = Box(max(x - POINT_SPAN, 0), max(y - POINT_SPAN, 0), x + POINT_SPAN, y + POINT_SPAN)
        mask = _box_mask(window, width, height, stride)
        if within_mask is not None:
            mask &= within_mask
    else:
        mask = _box_mask(region, width, height, stride)
        if within_mask is not None:
            overlap = mask & within_mask
            if overlap.any():
                mask = overlap
            else:
                logger.warning("%r does not overlap its segmentation mask; using the box alone", region)

    if not mask.any():
        raise ValueError(
            f"the feature mask of {region!r} on the {width}x{height} image is empty"
            + (" (the region does not overlap `within`)" if within_mask is not None else "")
        )
    return mask


def _box_mask(box: Box, width: int, height: int, stride: int = 1) -> np.ndarray:
    box = clamp_box(box, width, height)
    x1, y1, x2, y2 = (int(v) // stride for v in (box.x1, box.y1, box.x2, box.y2))
    mask = np.zeros((-(-height // stride), -(-width // stride)), dtype=bool)
    mask[y1 : y2 + 1, x1 : x2 + 1] = True
    return mask


def _pool_any(mask: np.ndarray, stride: int) -> np.ndarray:
    """[H, W] bool -> [ceil(H / s), ceil(W / s)]: a cell is True when any of its pixels is."""
    if stride == 1:
        return np.array(mask, dtype=bool, copy=True)
    height, width = mask.shape
    rows, cols = -(-height // stride), -(-width // stride)
    padded = np.zeros((rows * stride, cols * stride), dtype=bool)
    padded[:height, :width] = mask
    return padded.reshape(rows, stride, cols, stride).any(axis=(1, 3))


def _within_mask(within: np.ndarray | Box, width: int, height: int, region: Region, stride: int = 1) -> np.ndarray:
    if isinstance(within, Box):
        try:
            validate_region(within, width, height)
        except ValueError as exc:
            raise ValueError(f"`within` box for {region!r} is unusable: {exc}") from exc
        return _box_mask(within, width, height, stride)
    within = np.asarray(within)
    if within.shape != (height, width):
        raise ValueError(
            f"`within` mask for {region!r} has shape {within.shape}, expected [H, W] = [{height}, {width}]"
        )
    if within.dtype != np.bool_:
        if not (np.issubdtype(within.dtype, np.integer) or np.issubdtype(within.dtype, np.floating)):
            raise ValueError(f"`within` mask for {region!r} must be bool or numeric, got dtype {within.dtype}")
        within = within != 0
    return _pool_any(within, stride) if stride > 1 else within


# ----------------------------------------------------------------------------------------------------------
# Text


# Placeholders in conversations: ``<region{k}>`` (the API's spelling) or ``<bbox_location{k}>`` (the original
# data's) name the k-th region of the turn they are in.
PLACEHOLDER = re.compile(r"<(?:region|bbox_location)(\d+)>")


# What people type in the web UI and the CLI: ``[region{n}]`` (the original demo's) or ``<region{n}>``, naming the
# n-th region they drew; ``typed_to_placeholders`` turns it into the placeholders above.
TYPED_PLACEHOLDER = re.compile(r"\[region(\d+)\]|<region(\d+)>")


def _index(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"a region index must be a non-negative integer, got {k!r}")
    return int(k)


def placeholder(k: int) -> str:
    """The placeholder that names region ``k`` of a turn: ``<region{k}>``."""
    return f"<region{_index(k)}>"


def grit_placeholder(k: int) -> str:
    """The GRIT data's spelling of ``placeholder(k)``: ``<bbox_location{k}>``."""
    return f"<bbox_location{_index(k)}>"


def drawn_placeholder(n: int) -> str:
    """How the web UI names the n-th drawn region in a question: ``[region{n}]``."""
    return f"[region{_index(n)}]"


def typed_to_placeholders(text: str, number: Callable[[int], int] = lambda n: n) -> str:
    """``text`` with every ``[region{n}]`` / ``<region{n}>`` written as ``placeholder(number(n))``; ``number``
    renumbers (the UI numbers regions per message) and may raise ValueError for a region that does not exist."""
    return TYPED_PLACEHOLDER.sub(lambda m: placeholder(number(int(m.group(1) or m.group(2)))), text)


def find_placeholders(text: str) -> list[tuple[int, int, int]]:
    """Every placeholder in ``text`` in order, as ``(start, end, k)`` (``end`` exclusive). Reads no region."""
    return [(m.start(), m.end(), int(m.group(1))) for m in PLACEHOLDER.finditer(text)]


def placeholder_text(region: Region, width: int, height: int, is_user: bool, region_feature: bool = True,
                     no_coor: bool = False) -> str:
    """The prompt text that replaces a placeholder, as the original writes it.

    In a user turn with region features: ``"[x1, y1, x2, y2] <region_fea>"`` (a point ``"[x, y] <region_fea>"``;
    ``"<region_fea>"`` alone with ``no_coor``). In an answer, or without region features: the coordinates alone
    (``""`` with ``no_coor``). Coordinates are on the grid of a ``width`` x ``height`` image (``region_to_text``).
    """
    if no_coor:
        return REGION_TOKEN if is_user and region_feature else ""
    coords = region_to_text(region, width, height)
    return f"{coords} {REGION_TOKEN}" if is_user and region_feature else coords


@dataclass
class GroundedRegion:
    """A region found in text.

    ``phrase`` is the text the region grounds (see ``parse_regions``), ``region`` is in pixels of the image,
    ``grid`` holds the 0..999 numbers as written (clamped, not reordered) and ``span`` the character span
    ``[start, end)`` of the bracket in the text.
    """

    phrase: str
    region: Point | Box
    grid: tuple[int, ...]
    span: tuple[int, int]


_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_SENTENCE_BREAK = re.compile(r"[.,;!?\n]")
# What may separate two brackets that ground the same phrase ("two dogs [..], [..] and [..]").
_SAME_PHRASE_GAP = re.compile(r"[\s,;]*(?:and)?[\s,;]*")
# "a dog [..] and a cat [..]": the second phrase is "a cat".
_LEADING_AND = re.compile(r"^and\s+", re.IGNORECASE)


def _bracket_groups(text: str) -> list[tuple[int, int, tuple[int, ...]]]:
    """Top-level, un-nested ``[...]`` groups holding 2 or 4 comma-separated numbers.

    Returns (start, end, grid numbers clamped to 0..999); end is exclusive. Unclosed ``[`` and stray ``]``
    are ignored, nested brackets skip the whole enclosing group, anything but 2 or 4 numbers is skipped.
    """
    pairs: list[tuple[int, int]] = []
    stack: list[int] = []
    for i, char in enumerate(text):
        if char == "[":
            stack.append(i)
        elif char == "]" and stack:
            pairs.append((stack.pop(), i + 1))
    pairs.sort()

    groups = []
    furthest_end = -1  # end of the latest closed pair opened so far: a pair ending before it is nested
    for start, end in pairs:
        enclosed = end < furthest_end
        furthest_end = max(furthest_end, end)
        content = text[start + 1 : end - 1]
        if enclosed or "[" in content:
            continue
        pieces = [piece.strip() for piece in content.split(",")]
        if len(pieces) not in (2, 4) or not all(_NUMBER.fullmatch(piece) for piece in pieces):
            continue
        grid = tuple(min(max(int(float(piece)), 0), GRID_SIZE - 1) for piece in pieces)
        groups.append((start, end, grid))
    return groups


def parse_regions(text: str, width: int, height: int) -> list[GroundedRegion]:
    """Find every ``[x, y]`` point and ``[x1, y1, x2, y2]`` box in ``text``, in order, in pixels of the image.

    * Values are read as numbers (floats are truncated) and clamped to 0..999, then mapped to pixels with
      ``from_grid`` (x with ``width``, y with ``height``); box corners are ordered.
    * Brackets with any other content (3 numbers, words, an unclosed ``[``, nested brackets) are skipped.
    * The phrase of a bracket is the text between the previous boundary and the ``[``, stripped (and without
      ``<region_fea>``). A boundary is the start of the text, the end of the previous bracket, or the last
      ``. , ; ! ?`` or newline. A bracket separated from the previous region only by spaces, commas,
      semicolons or "and" grounds the same phrase: ``"two dogs [..] [..]"`` gives "two dogs" twice.
      A leading "and " is dropped: ``"a dog [..] and a cat [..]"`` gives "a dog" and "a cat".
    """
    _check_image_size(width, height)
    found: list[GroundedRegion] = []
    boundary = 0
    previous_end = None
    for start, end, grid in _bracket_groups(text):
        segment_start = boundary
        for match in _SENTENCE_BREAK.finditer(text, boundary, start):
            segment_start = match.end()
        phrase = " ".join(text[segment_start:start].replace(REGION_TOKEN, " ").split())
        phrase = _LEADING_AND.sub("", phrase)
        if found and previous_end is not None and _SAME_PHRASE_GAP.fullmatch(text, previous_end, start):
            phrase = found[-1].phrase
        if len(grid) == 2:
            region: Point | Box = Point(float(from_grid(grid[0], width)), float(from_grid(grid[1], height)))
        else:
            x1, x2 = sorted((from_grid(grid[0], width), from_grid(grid[2], width)))
            y1, y2 = sorted((from_grid(grid[1], height), from_grid(grid[3], height)))
            region = Box(float(x1), float(y1), float(x2), float(y2))
        found.append(GroundedRegion(phrase=phrase, region=region, grid=grid, span=(start, end)))
        boundary = previous_end = end
    return found


def strip_regions(text: str) -> str:
    """``text`` without the coordinate brackets that ``parse_regions`` reads and without ``<region_fea>``.

    Runs of spaces are collapsed, spaces before punctuation removed, and each line is stripped.
    """
    pieces = []
    cursor = 0
    for start, end, _ in _bracket_groups(text):
        pieces.append(text[cursor:start])
        cursor = end
    pieces.append(text[cursor:])
    cleaned = "".join(pieces).replace(REGION_TOKEN, "")
    cleaned = re.sub(r"[ \t]{2,}", " ", cleaned)
    cleaned = re.sub(r"[ \t]+([.,;:!?])", r"\1", cleaned)
    return "\n".join(line.strip() for line in cleaned.split("\n")).strip()


# ----------------------------------------------------------------------------------------------------------
# Validation helpers


def _check_size(size: int, name: str) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"{name} must be a positive integer number of pixels, got {size!r}")


def _check_image_size(width: int, height: int) -> None:
    _check_size(width, "image width")
    _check_size(height, "image height")


def _check_finite(value: float, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


def _check_vertices(vertices: Sequence[tuple[float, float]], what: str, minimum: int) -> list[tuple[float, float]]:
    try:
        checked = [(float(x), float(y)) for x, y in vertices]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be a sequence of (x, y) pairs, got {_short(vertices)}") from exc
    if len(checked) < minimum:
        raise ValueError(f"{what} needs at least {minimum} (x, y) points, got {len(checked)}")
    if not all(math.isfinite(x) and math.isfinite(y) for x, y in checked):
        raise ValueError(f"{what} has a non-finite coordinate: {_short(checked)}")
    return checked


def _clip(v: float, upper: float) -> float:
    return min(max(v, 0), upper)


def _short(obj: object, limit: int = 80) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------------------
# Moving regions between the user's image and a padded canvas (the "pad" image mode)


def shift_region(region: Region, dx: int, dy: int, width: int, height: int) -> Region:
    """The region moved by (dx, dy) pixels onto a ``width`` x ``height`` canvas.

    Used to go from the user's image to a padded square (dx, dy >= 0) and back (dx, dy <= 0). A FreeForm's mask is
    re-placed on the new canvas; Points and Boxes are clamped into it.
    """
    _check_image_size(width, height)
    if isinstance(region, Point):
        return Point(_clip(region.x + dx, width - 1), _clip(region.y + dy, height - 1))
    if isinstance(region, Box):
        return clamp_box(Box(region.x1 + dx, region.y1 + dy, region.x2 + dx, region.y2 + dy), width, height)
    if isinstance(region, FreeForm):
        canvas = np.zeros((height, width), dtype=bool)
        src = region.mask
        ys, xs = slice(max(0, -dy), min(src.shape[0], height - dy)), slice(max(0, -dx), min(src.shape[1], width - dx))
        canvas[ys.start + dy: ys.stop + dy, xs.start + dx: xs.stop + dx] = src[ys, xs]
        return FreeForm(canvas)
    raise ValueError(f"expected a Point, Box or FreeForm region, got {type(region).__name__}: {_short(region)}")
