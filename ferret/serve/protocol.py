"""The wire protocol between Ferret's serving pieces: the generation request and the streamed reply.

This module owns
* ``parse_chat_messages``: the one parser of OpenAI-style ``messages`` (text, one image as an ``image_url``,
  per-message ``regions`` in pixels, ``<regionK>`` placeholders), shared by the OpenAI-compatible API, the model
  worker and (through ``chat_messages``) the clients that build them, so all reject the same inputs with the same
  messages;
* ``parse_generate_request``: validation of a ``/worker_generate_stream`` payload into a ``GenerateRequest``;
* ``build_chat_payload`` / ``build_generate_payload`` and ``region_to_dict``: the inverse, for clients;
* the stream framing: every message is one JSON object followed by a ``\\0`` byte (``encode_chunk``), read back
  incrementally by ``StreamDecoder``;
* the error codes carried in streamed messages (``ErrorCode``), and the region-feature and auth settings the
  servers share.

A request payload (all coordinates in PIXELS of the image, x right, y down, 0-based)::

    {
      "model": "ferret-7b",                       # optional; the controller routes on it
      "messages": [
        {"role": "user",
         "content": [{"type": "text", "text": "What is <region0> next to <region1>?"},
                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}],
         "regions": [                              # <regionK> is the K-th region of the same message
           {"type": "point", "x": 10, "y": 20},
           {"type": "box", "x1": 5, "y1": 5, "x2": 60, "y2": 40}]},
        {"role": "assistant", "content": "a cat [100, 120, 400, 500]"},   # earlier answers as generated
        {"role": "user", "content": "And <region0>?",
         "regions": [{"type": "polygon", "points": [[0, 0], [30, 0], [15, 25]]}]}
      ],
      "temperature": 0.2, "top_p": 0.7, "max_new_tokens": 512, "stop": "</s>",
      "region_feature": true                       # optional: override the worker's default (its checkpoint's)
    }

A region may also be ``{"type": "mask", "rle": {"size": [H, W], "counts": "<COCO RLE string or list of ints>"}}``;
its declared size must be the image's, checked before anything is decoded.

The original's request stays accepted: instead of ``messages``, a templated ``"prompt"`` containing ``<image>`` and
one ``<region_fea>`` per region, ``"images"`` (base64, as many as ``<image>``) and either compact ``"regions"`` (in
prompt order) or ``"region_masks"``: one dense nested list per region laid out ``[W][H]`` (``mask[x][y]``),
converted here to ``[H, W]`` bool. Regions refer to the first image.

A point must lie on a pixel (``0 <= x < W``, ``0 <= y < H``); box corners and polygon vertices may lie anywhere in
the closed range ``[0, W] x [0, H]`` (the image's continuous extent, so a box drawn to the very edge is accepted;
``ferret.regions`` clamps it to pixel indices later).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from ferret.constants import IMAGE_TOKEN, REGION_TOKEN

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

# numpy, PIL and ferret.regions are imported where they are used: the controller reads this module for the stream
# framing and must start (and answer --help) without them.

__all__ = [
    "ErrorCode",
    "RequestError",
    "RequestLimits",
    "RegionSpec",
    "GenerateRequest",
    "parse_generate_request",
    "decode_image",
    "decode_image_bytes",
    "encode_image",
    "region_to_dict",
    "grounded_to_dict",
    "build_generate_payload",
    "build_chat_payload",
    "ChatInput",
    "parse_chat_messages",
    "chat_messages",
    "check_json_depth",
    "check_text",
    "check_rle_bounds",
    "model_reads_region_features",
    "resolve_region_feature",
    "API_KEY_ENV",
    "WORKER_SECRET_ENV",
    "encode_chunk",
    "error_chunk",
    "StreamDecoder",
    "iter_messages",
]


class ErrorCode(IntEnum):
    """``error_code`` of a streamed message. 0-3 keep the original's meaning; 4 is new."""

    OK = 0
    WORKER_ERROR = 1  # generation failed inside the worker
    NO_WORKER = 2  # the controller knows no worker serving the requested model
    WORKER_UNREACHABLE = 3  # the controller could not reach the worker, or it timed out
    BAD_REQUEST = 4  # the request failed validation (see RequestError)
    SERVER_BUSY = 5  # the worker already runs its limit of requests; retry later (HTTP 429)


class RequestError(ValueError):
    """A request the server refuses. ``status`` is the HTTP status to answer with:

    * 400: malformed (wrong type, missing field, corrupt image or mask data);
    * 413: too large (image bytes or pixels, prompt length);
    * 422: well-formed but not acceptable (value out of range, region outside the image, count mismatches).
    """

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status

    def to_message(self) -> dict[str, Any]:
        """The error as a streamed message, the form a client of the stream reads."""
        return {"text": self.message, "error_code": int(ErrorCode.BAD_REQUEST)}


@dataclass(frozen=True)
class RequestLimits:
    """Bounds a server puts on one request. Defaults suit a single-GPU Ferret worker."""

    max_images: int = 1
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_regions: int = 32
    max_prompt_chars: int = 64_000
    max_new_tokens: int = 1024  # the original worker's cap

    default_temperature: float = 1.0
    default_top_p: float = 1.0
    default_max_new_tokens: int = 256


ALLOWED_IMAGE_FORMATS = ("PNG", "JPEG")


# ----------------------------------------------------------------------------------------------- regions


@dataclass(frozen=True, eq=False)
class RegionSpec:
    """One validated region of a request, still in wire form (pixels of the request's image).

    ``kind`` is "point" (``coords`` = (x, y)), "box" (``coords`` = (x1, y1, x2, y2)), "polygon" (``vertices``)
    or "mask" (``mask``: bool [H, W]). ``index`` is its position in the request.
    """

    index: int
    kind: str
    coords: tuple[float, ...] = ()
    vertices: tuple[tuple[float, float], ...] = ()
    mask: np.ndarray | None = field(default=None, repr=False)

    def to_region(self, width: int, height: int):
        """The ``ferret.regions`` object (Point, Box or FreeForm) for an image of ``width`` x ``height``.

        Raises RequestError (422) naming the region when ``ferret.regions`` rejects it (e.g. an empty polygon).
        """
        from ferret import regions as R

        try:
            if self.kind == "point":
                region = R.Point(*self.coords)
            elif self.kind == "box":
                region = R.Box(*self.coords)
            elif self.kind == "polygon":
                region = R.FreeForm.from_polygon(list(self.vertices), width, height)
            elif self.kind == "mask":
                region = R.FreeForm(self.mask)
            else:  # pragma: no cover - parse_region never builds another kind
                raise ValueError(f"unknown kind {self.kind!r}")
            R.validate_region(region, width, height)
        except ValueError as err:
            raise RequestError(f"region {self.index} ({self.kind}): {err}", 422) from err
        return region


def _finite_number(value: Any, where: str) -> float:
    """``value`` as a finite float; numeric strings are accepted as the original worker did (``float(...)``)."""
    if isinstance(value, bool) or value is None:
        raise RequestError(f"{where} must be a number, got {value!r}", 400)
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise RequestError(f"{where} must be a number, got {value!r}", 400) from None
    else:
        raise RequestError(f"{where} must be a number, got {type(value).__name__}", 400)
    if not math.isfinite(number):
        raise RequestError(f"{where} must be finite, got {value!r}", 422)
    return number


def _check_inside(where: str, x: float, y: float, width: int, height: int, on_pixel: bool = False) -> None:
    """``on_pixel``: half-open [0, W) x [0, H) (a point names a pixel); else the closed extent [0, W] x [0, H]."""
    inside_x = 0 <= x < width if on_pixel else 0 <= x <= width
    inside_y = 0 <= y < height if on_pixel else 0 <= y <= height
    if not (inside_x and inside_y):
        close = ")" if on_pixel else "]"
        raise RequestError(
            f"{where} ({x:g}, {y:g}) lies outside the image of {width}x{height} pixels "
            f"(x must be in [0, {width}{close}, y in [0, {height}{close})",
            422,
        )


def parse_region(spec: Any, index: int, image_size: tuple[int, int]) -> RegionSpec:
    """Validate one compact region dict against an image of ``image_size`` = (W, H)."""
    width, height = image_size
    where = f"region {index}"
    if not isinstance(spec, Mapping):
        raise RequestError(f"{where} must be an object with a 'type', got {type(spec).__name__}", 400)
    kind = spec.get("type")
    if kind == "point":
        x, y = (_finite_number(spec.get(k), f"{where} (point) field '{k}'") for k in ("x", "y"))
        _check_inside(f"{where} (point)", x, y, width, height, on_pixel=True)
        return RegionSpec(index, "point", coords=(x, y))
    if kind == "box":
        x1, y1, x2, y2 = (_finite_number(spec.get(k), f"{where} (box) field '{k}'") for k in ("x1", "y1", "x2", "y2"))
        _check_inside(f"{where} (box) corner 1", x1, y1, width, height)
        _check_inside(f"{where} (box) corner 2", x2, y2, width, height)
        return RegionSpec(index, "box", coords=(x1, y1, x2, y2))
    if kind == "polygon":
        points = spec.get("points")
        if not isinstance(points, Sequence) or isinstance(points, (str, bytes)) or len(points) < 3:
            raise RequestError(f"{where} (polygon) needs 'points' with at least 3 [x, y] pairs", 400)
        vertices = []
        for k, point in enumerate(points):
            if not isinstance(point, Sequence) or isinstance(point, (str, bytes)) or len(point) != 2:
                raise RequestError(f"{where} (polygon) point {k} must be [x, y], got {point!r}", 400)
            x, y = (_finite_number(v, f"{where} (polygon) point {k}") for v in point)
            _check_inside(f"{where} (polygon) point {k}", x, y, width, height)
            vertices.append((x, y))
        return RegionSpec(index, "polygon", vertices=tuple(vertices))
    if kind == "mask":
        rle = spec.get("rle")
        if not isinstance(rle, Mapping):
            raise RequestError(f"{where} (mask) needs 'rle': {{'size': [H, W], 'counts': ...}}", 400)
        check_rle_bounds(rle, (width, height), f"{where} (mask)")
        from ferret import regions as R

        try:
            mask = R.FreeForm.from_rle(dict(rle)).mask
        except ValueError as err:
            raise RequestError(f"{where} (mask): {err}", 400) from err
        if mask.shape != (height, width):
            raise RequestError(
                f"{where} (mask) has size [H, W] = {list(mask.shape)} but the image is [{height}, {width}]", 422
            )
        if not mask.any():
            raise RequestError(f"{where} (mask) is empty", 422)
        return RegionSpec(index, "mask", mask=mask)
    raise RequestError(f"{where} has type {kind!r}; expected 'point', 'box', 'polygon' or 'mask'", 400)


def check_rle_bounds(rle: Mapping, image_size: tuple[int, int], where: str) -> None:
    """Refuse an RLE whose declared ``size`` is not the image's, or whose ``counts`` cannot describe it, BEFORE
    anything is decoded: decoding allocates ``size`` pixels, so a 148-byte RLE declaring 10^6 x 10^6 would ask for
    a terabyte. Cost: O(len(counts)), and ``counts`` is bounded by the request's size."""
    width, height = image_size
    size = rle.get("size")
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)):
        raise RequestError(f"{where}: RLE 'size' must be [H, W] with two integers, got {_preview(size)}", 400)
    if (size[0], size[1]) != (height, width):
        raise RequestError(
            f"{where}: RLE 'size' is [H, W] = [{size[0]}, {size[1]}] but the image is [{height}, {width}]; "
            "a mask must have the image's size", 422,
        )
    counts = rle.get("counts")
    if isinstance(counts, str):
        # a compressed run takes at least one character, and there are at most H*W + 1 runs
        if len(counts) > height * width + 1:
            raise RequestError(f"{where}: RLE 'counts' has {len(counts)} characters, more than a "
                               f"{height}x{width} mask can need", 400)
    elif isinstance(counts, list):
        if len(counts) > height * width + 1:
            raise RequestError(f"{where}: RLE 'counts' has {len(counts)} runs, more than a {height}x{width} mask "
                               "can hold", 400)
        for k, run in enumerate(counts):
            if isinstance(run, bool) or not isinstance(run, int) or run < 0:
                raise RequestError(f"{where}: RLE 'counts'[{k}] must be a non-negative integer, got {_preview(run)}",
                                   400)
    else:
        raise RequestError(f"{where}: RLE 'counts' must be a string or a list of integers, got "
                           f"{type(counts).__name__}", 400)


def _preview(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_dense_mask(mask: Any, index: int, image_size: tuple[int, int]) -> RegionSpec:
    """The original's ``region_masks[index]``: nested lists laid out [W][H]; returned as a [H, W] bool mask."""
    from ferret import regions as R

    width, height = image_size
    where = f"region_masks[{index}]"
    if isinstance(mask, list) and mask and isinstance(mask[0], list) and (len(mask), len(mask[0])) != image_size:
        raise RequestError(
            f"{where} has shape [W][H] = {[len(mask), len(mask[0])]} but the image is W={width}, H={height}", 422
        )
    try:
        hw = R.dense_wh_mask(mask, width, height)
    except ValueError as err:
        raise RequestError(f"{where}: {err}", 422) from err
    if not hw.any():
        raise RequestError(f"{where} is empty", 422)
    return RegionSpec(index, "mask", mask=hw)


def region_to_dict(region: Any) -> dict[str, Any]:
    """The compact wire form of a ``ferret.regions`` Point, Box or FreeForm (pixels)."""
    if hasattr(region, "mask"):
        return {"type": "mask", "rle": region.to_rle()}
    if all(hasattr(region, k) for k in ("x1", "y1", "x2", "y2")):
        return {"type": "box", "x1": region.x1, "y1": region.y1, "x2": region.x2, "y2": region.y2}
    if hasattr(region, "x") and hasattr(region, "y"):
        return {"type": "point", "x": region.x, "y": region.y}
    raise TypeError(f"cannot encode {type(region).__name__} as a region; expected Point, Box or FreeForm")


def grounded_to_dict(grounded: Any) -> dict[str, Any]:
    """A ``ferret.regions.GroundedRegion`` (pixels) as ``{"phrase": ..., "type": "box", "x1": ..., ...}``."""
    return {"phrase": grounded.phrase, **region_to_dict(grounded.region)}


# ----------------------------------------------------------------------------------------------- images


def decode_image(data: Any, index: int = 0, limits: RequestLimits = RequestLimits()) -> Image.Image:
    """A base64 PNG or JPEG (optionally a ``data:image/...;base64,`` URL) as an RGB PIL image.

    Raises RequestError: 400 for bad base64 or corrupt image data, 413 when over the byte or pixel limit,
    422 for another format.
    """
    where = f"image {index}"
    if not isinstance(data, str):
        raise RequestError(f"{where} must be a base64 string, got {type(data).__name__}", 400)
    if data.startswith("data:"):
        head, _, data = data.partition(",")
        if not head.endswith(";base64"):
            raise RequestError(f"{where} is a data URL without ';base64'", 400)
    if len(data) * 3 // 4 > limits.max_image_bytes + 3:
        raise RequestError(f"{where} is larger than {limits.max_image_bytes} bytes", 413)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(f"{where} is not valid base64 ({err})", 400) from err
    return decode_image_bytes(raw, where, limits)


def decode_image_bytes(raw: bytes, where: str = "image 0", limits: RequestLimits = RequestLimits()) -> Image.Image:
    """Encoded PNG or JPEG bytes as an RGB PIL image, with the same checks and statuses as ``decode_image``."""
    from PIL import Image, UnidentifiedImageError

    if len(raw) > limits.max_image_bytes:
        raise RequestError(f"{where} has {len(raw)} bytes; the limit is {limits.max_image_bytes}", 413)
    try:
        with Image.open(io.BytesIO(raw)) as probe:
            fmt = probe.format
            width, height = probe.size
            if fmt not in ALLOWED_IMAGE_FORMATS:
                raise RequestError(f"{where} is {fmt}; expected one of {', '.join(ALLOWED_IMAGE_FORMATS)}", 422)
            if width * height > limits.max_image_pixels:
                raise RequestError(
                    f"{where} has {width}x{height} = {width * height} pixels; the limit is {limits.max_image_pixels}",
                    413,
                )
            probe.verify()
        image = Image.open(io.BytesIO(raw))
        image.load()  # verify() misses truncated pixel data; decoding it does not
    except RequestError:
        raise
    except Image.DecompressionBombError as err:
        raise RequestError(f"{where} is too large to decode ({err})", 413) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise RequestError(f"{where} is corrupt or not an image ({err})", 400) from err
    return image.convert("RGB")


def encode_image(image: Image.Image, fmt: str = "PNG") -> str:
    """A PIL image as base64 (PNG by default), the form ``images`` carries."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------------------------- text, depth


MAX_JSON_DEPTH = 32  # a chat request needs 6 levels; anything far deeper is refused before it is walked


def check_json_depth(value: Any, limit: int = MAX_JSON_DEPTH, where: str = "the request body") -> None:
    """Raise RequestError (400) when ``value`` nests lists/objects more than ``limit`` deep. Iterative, so a
    100,000-level body costs one pass and no recursion (``repr``/``json.dumps`` of it would overflow the stack)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            raise RequestError(f"{where} is nested more than {limit} levels deep", 400)
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def check_text(text: str, where: str) -> str:
    """``text`` if it is valid Unicode; a lone surrogate (JSON allows ``"\\ud800"``) cannot be tokenized."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RequestError(
            f"{where} contains a lone surrogate {text[err.start]!r} at character {err.start}; send valid Unicode",
            400,
        ) from None
    return text


# ----------------------------------------------------------------------------------------------- chat messages


@dataclass(eq=False)
class ChatInput:
    """A parsed conversation: ``turns`` for ``FerretProcessor.encode`` (``{"from": "human"|"gpt", "value"}``,
    alternating, ending with the user), the image (or None) and, per turn, its regions as ``ferret.regions``
    objects in pixels of the image (``<regionK>`` in a turn is its K-th region)."""

    turns: list[dict[str, str]]
    image: Image.Image | None
    regions: list[list[Any]]


ImageLoader = Callable[[Any, str], "Image.Image"]


def load_data_url(url: Any, where: str, limits: RequestLimits = RequestLimits()) -> Image.Image:
    """The default ``image_url`` loader: base64 ``data:`` URLs only (a server never fetches remote URLs)."""
    if not isinstance(url, str) or not url:
        raise RequestError(f"{where}: image_url.url must be a non-empty string", 400)
    if not url.startswith("data:"):
        raise RequestError(f"{where}: only data: URLs (base64 PNG or JPEG) are accepted here, got "
                           f"{_preview(url[:40])}", 400)
    return decode_image(url, 0, limits)


def _placeholders(text: str) -> list[tuple[str, int]]:
    """(placeholder, region index) of each ``<regionK>`` / ``<bbox_locationK>`` in ``text``."""
    from ferret.regions import PLACEHOLDER  # the one definition of the placeholder syntax

    found = []
    for match in PLACEHOLDER.finditer(text):
        digits = match.group(1)
        found.append((match.group(0), int(digits) if len(digits) <= 6 else 10**7))
    return found


def parse_chat_messages(messages: Any, limits: RequestLimits = RequestLimits(),
                        load_image: ImageLoader | None = None) -> ChatInput:
    """OpenAI-style ``messages`` -> ChatInput; the one parser behind the API and the worker. Raises RequestError
    (400 malformed, 413 too large, 422 a region that does not fit the image) naming the message and part.

    A message is ``{"role": "user"|"assistant"|"system", "content": str | [parts], "regions": [...]}``; parts are
    ``{"type": "text", "text"}`` and, in user messages, ``{"type": "image_url", "image_url": {"url": ...}}`` (one
    image per conversation). ``regions`` use the compact region format of this module, in pixels of the image;
    ``<regionK>`` in the text refers to the K-th. System messages are ignored: Ferret's template has its own.
    ``load_image(url, where)`` reads an image_url (default: data URLs only).
    """
    loader = load_image or (lambda url, where: load_data_url(url, where, limits))
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", 400)
    turns: list[dict[str, str]] = []
    raw_regions: list[tuple[str, Any]] = []
    image: Image.Image | None = None
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise RequestError(f"{where} must be an object, got {type(message).__name__}", 400)
        role = message.get("role")
        if role in ("system", "developer"):
            continue
        if role not in ("user", "assistant"):
            raise RequestError(f"{where} has role {_preview(role)}; expected user, assistant or system", 400)
        content = message.get("content")
        texts: list[str] = []
        if isinstance(content, str):
            texts.append(check_text(content, f"{where}.content"))
        elif isinstance(content, list):
            for k, part in enumerate(content):
                kind = part.get("type") if isinstance(part, Mapping) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(check_text(part["text"], f"{where}.content[{k}].text"))
                elif kind == "image_url" and role == "user":
                    if image is not None:
                        raise RequestError(f"{where}.content[{k}]: only one image per conversation is supported",
                                           400)
                    ref = part.get("image_url")
                    url = ref.get("url") if isinstance(ref, Mapping) else ref
                    image = loader(url, f"{where}.content[{k}]")
                else:
                    raise RequestError(f"{where}.content[{k}] has type {_preview(kind)}; expected 'text' or (in a "
                                       "user message) 'image_url'", 400)
        elif content is None and role == "assistant":
            pass
        else:
            raise RequestError(f"{where}.content must be a string or a list of parts", 400)
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise RequestError(f"{where} is from {role!r} but {expected!r} was expected: after system messages, "
                               "messages must alternate user/assistant starting with user", 400)
        text = "\n".join(texts)
        if len(text) > limits.max_prompt_chars:
            raise RequestError(f"{where} has {len(text)} characters; the limit is {limits.max_prompt_chars}", 413)
        turns.append({"from": "human" if role == "user" else "gpt", "value": text})
        raw_regions.append((where, message.get("regions")))
    if not turns:
        raise RequestError("'messages' holds no user message", 400)
    if len(turns) % 2 == 0:
        raise RequestError("the last message must be from the user", 400)
    total = sum(len(turn["value"]) for turn in turns)
    if total > limits.max_prompt_chars:
        raise RequestError(f"the messages have {total} characters; the limit is {limits.max_prompt_chars}", 413)

    # Every placeholder in a user turn becomes one region feature: count them all before any region is decoded.
    referred = sum(len(_placeholders(t["value"])) for t in turns if t["from"] == "human")
    if referred > limits.max_regions:
        raise RequestError(f"the user messages refer to regions {referred} times; at most {limits.max_regions} "
                           "per request", 422)
    regions: list[list[Any]] = []
    for (where, specs), turn in zip(raw_regions, turns, strict=True):
        if specs is None or (turn["from"] == "gpt" and "<region" not in turn["value"]):
            regions.append([])  # an assistant message echoed back with its grounded regions: nothing to refer to
            continue
        if not isinstance(specs, list):
            raise RequestError(f"{where}.regions must be a list", 400)
        if specs and image is None:
            raise RequestError(f"{where}.regions given but the conversation has no image", 400)
        if len(specs) > limits.max_regions:
            raise RequestError(f"{where} has {len(specs)} regions; at most {limits.max_regions}", 422)
        from ferret import regions as R

        referred = _placeholders(turn["value"])
        for placeholder, k in referred:
            if k >= len(specs):
                number = placeholder.strip("<>").lstrip("abcdefghijklmnopqrstuvwxyz_")
                raise RequestError(f"{where}: {placeholder} refers to region {number} but the message has "
                                   f"{len(specs)} region(s)", 422)
        width, height = image.size if image is not None else (0, 0)
        turn_regions = []
        for k, spec in enumerate(specs):
            try:
                turn_regions.append(parse_region(spec, k, (width, height)).to_region(width, height))
            except RequestError as err:
                raise RequestError(f"{where}: {err.message}", err.status) from err
            if all(number != k for _, number in referred):
                raise RequestError(f"{where}: region {k} is not referred to; write {R.placeholder(k)} in the text",
                                   422)
        regions.append(turn_regions)
    return ChatInput(turns, image, regions)


def chat_messages(turns: Sequence[Mapping[str, str]], image: Image.Image | None = None,
                  regions: Sequence[Sequence[Any]] = ()) -> list[dict[str, Any]]:
    """The inverse of ``parse_chat_messages`` (client side): turns (``from``/``value``), the image (sent with the
    first user message as a PNG data URL) and per turn its ``ferret.regions`` objects or compact dicts."""
    messages: list[dict[str, Any]] = []
    for t, turn in enumerate(turns):
        role = "user" if turn["from"] in ("human", "user") else "assistant"
        message: dict[str, Any] = {"role": role, "content": turn["value"]}
        if t == 0 and image is not None:
            message["content"] = [{"type": "text", "text": turn["value"]},
                                  {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                      + encode_image(image)}}]
        turn_regions = regions[t] if t < len(regions) else ()
        if turn_regions:
            message["regions"] = [r if isinstance(r, Mapping) else region_to_dict(r) for r in turn_regions]
        messages.append(message)
    return messages


# ----------------------------------------------------------------------------------------------- region features


def model_reads_region_features(config: Any) -> bool:
    """Whether a checkpoint reads region features: it does when it has the spatial-aware sampler
    (``region_geo_sampler`` in its config.json)."""
    return bool(getattr(config, "region_geo_sampler", False))


def resolve_region_feature(override: bool | None, config: Any) -> bool:
    """The flag when given, else what the checkpoint's config says."""
    return model_reads_region_features(config) if override is None else bool(override)


# ----------------------------------------------------------------------------------------------- auth

API_KEY_ENV = "FERRET_API_KEY"  # the key clients of the API and the worker send as "Authorization: Bearer <key>"
WORKER_SECRET_ENV = "FERRET_WORKER_SECRET"  # the secret workers present to the controller's /register_worker


# ----------------------------------------------------------------------------------------------- request


@dataclass(eq=False)
class GenerateRequest:
    """A validated generation request: either a conversation (``chat``, from ``messages``) or the original's
    templated ``prompt`` with ``images`` and ``regions`` (which refer to ``images[0]``). ``images`` are RGB."""

    prompt: str | None
    images: list[Image.Image]
    regions: list[RegionSpec]
    temperature: float
    top_p: float
    max_new_tokens: int
    stop: str | None = None
    model: str | None = None
    chat: ChatInput | None = None
    region_feature: bool | None = None  # the request's override of the server's region-feature setting

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(W, H) of the first image, or None for a text-only request."""
        return self.images[0].size if self.images else None

    def region_objects(self) -> list:
        """The regions as ``ferret.regions`` objects (Point / Box / FreeForm), in request order."""
        if not self.regions:
            return []
        width, height = self.image_size
        return [spec.to_region(width, height) for spec in self.regions]


def parse_generate_request(payload: Any, limits: RequestLimits = RequestLimits()) -> GenerateRequest:
    """Validate a ``/worker_generate_stream`` payload (see the module docstring); raises RequestError."""
    if not isinstance(payload, Mapping):
        raise RequestError(f"the request must be a JSON object, got {type(payload).__name__}", 400)
    check_json_depth(payload)

    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(f"'model' must be a string, got {type(model).__name__}", 400)
    region_feature = payload.get("region_feature")
    if region_feature is not None and not isinstance(region_feature, bool):
        raise RequestError(f"'region_feature' must be true, false or absent, got {_preview(region_feature)}", 400)

    prompt: str | None = None
    chat: ChatInput | None = None
    if payload.get("messages") is not None:
        if payload.get("prompt") is not None:
            raise RequestError("give either 'messages' or the legacy 'prompt', not both", 400)
        if payload.get("images") or payload.get("regions") or payload.get("region_masks"):
            raise RequestError("with 'messages', the image and regions go inside the messages "
                               "(image_url content part, per-message 'regions')", 400)
        chat = parse_chat_messages(payload["messages"], limits)
        images = [chat.image] if chat.image is not None else []
        regions: list[RegionSpec] = []
    else:
        prompt, images, regions = _parse_prompt_request(payload, limits)

    temperature = _finite_number(payload.get("temperature", limits.default_temperature), "'temperature'")
    if temperature < 0:
        raise RequestError(f"'temperature' must be >= 0, got {temperature:g}", 422)
    top_p = _finite_number(payload.get("top_p", limits.default_top_p), "'top_p'")
    if not 0 < top_p <= 1:
        raise RequestError(f"'top_p' must be in (0, 1], got {top_p:g}", 422)
    max_new_tokens = _finite_number(payload.get("max_new_tokens", limits.default_max_new_tokens), "'max_new_tokens'")
    if max_new_tokens != int(max_new_tokens):
        raise RequestError(f"'max_new_tokens' must be an integer, got {max_new_tokens:g}", 422)
    if not 1 <= max_new_tokens <= limits.max_new_tokens:
        raise RequestError(
            f"'max_new_tokens' must be between 1 and {limits.max_new_tokens}, got {int(max_new_tokens)}", 422
        )
    stop = payload.get("stop")
    if stop is not None and (not isinstance(stop, str) or not stop):
        raise RequestError(f"'stop' must be a non-empty string or absent, got {_preview(stop)}", 400)
    if stop is not None:
        check_text(stop, "'stop'")

    return GenerateRequest(
        prompt=prompt,
        images=images,
        regions=regions,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=int(max_new_tokens),
        stop=stop,
        model=model,
        chat=chat,
        region_feature=region_feature,
    )


def _parse_prompt_request(payload: Mapping, limits: RequestLimits
                          ) -> tuple[str, list[Image.Image], list[RegionSpec]]:
    """The original's request: a templated ``prompt`` with ``<image>`` / ``<region_fea>``, ``images`` and
    ``regions`` (or the dense ``region_masks``), counts matching."""
    prompt = payload.get("prompt")
    if not isinstance(prompt, str):
        raise RequestError(f"give 'messages' (a list) or the legacy 'prompt' (a string); 'prompt' is "
                           f"{type(prompt).__name__}", 400)
    if len(prompt) > limits.max_prompt_chars:
        raise RequestError(f"'prompt' has {len(prompt)} characters; the limit is {limits.max_prompt_chars}", 413)
    check_text(prompt, "'prompt'")

    raw_images = payload.get("images") or []
    if not isinstance(raw_images, list):
        raise RequestError(f"'images' must be a list of base64 strings, got {type(raw_images).__name__}", 400)
    if len(raw_images) > limits.max_images:
        raise RequestError(f"{len(raw_images)} images given; at most {limits.max_images} per request", 422)
    num_image_tokens = prompt.count(IMAGE_TOKEN)
    if num_image_tokens != len(raw_images):
        raise RequestError(
            f"the prompt contains {IMAGE_TOKEN} {num_image_tokens} time(s) but {len(raw_images)} image(s) were given",
            422,
        )
    num_region_tokens = prompt.count(REGION_TOKEN)
    if num_region_tokens > limits.max_regions:
        raise RequestError(f"the prompt contains {REGION_TOKEN} {num_region_tokens} times; at most "
                           f"{limits.max_regions} per request", 422)
    images = [decode_image(data, i, limits) for i, data in enumerate(raw_images)]

    regions = _parse_regions(payload, images, limits)
    if num_region_tokens != len(regions):
        raise RequestError(
            f"the prompt contains {REGION_TOKEN} {num_region_tokens} time(s) but {len(regions)} region(s) were given",
            422,
        )
    return prompt, images, regions


def _parse_regions(payload: Mapping, images: list[Image.Image], limits: RequestLimits) -> list[RegionSpec]:
    compact = payload.get("regions")
    dense = payload.get("region_masks")
    if compact and dense:
        raise RequestError("give either 'regions' or the legacy 'region_masks', not both", 400)
    key, items = ("regions", compact) if compact else ("region_masks", dense)
    if not items:
        return []
    if not isinstance(items, list):
        raise RequestError(f"'{key}' must be a list, got {type(items).__name__}", 400)
    if not images:
        raise RequestError(f"'{key}' given but no image: regions refer to pixels of the first image", 422)
    if len(items) > limits.max_regions:
        raise RequestError(f"{len(items)} regions given; at most {limits.max_regions} per request", 422)
    size = images[0].size
    parse = parse_region if key == "regions" else parse_dense_mask
    return [parse(item, i, size) for i, item in enumerate(items)]


def build_generate_payload(
    prompt: str,
    images: Sequence[Image.Image] = (),
    regions: Sequence[Any] = (),
    *,
    model: str | None = None,
    temperature: float = 0.2,
    top_p: float = 0.7,
    max_new_tokens: int = 512,
    stop: str | None = None,
) -> dict[str, Any]:
    """The JSON payload for ``/worker_generate_stream`` (client side). ``regions`` are ``ferret.regions`` objects
    or already-compact dicts, in pixels of ``images[0]``; defaults are the original UI's (0.2, 0.7, 512)."""
    payload: dict[str, Any] = {
        "prompt": prompt,
        "images": [encode_image(image) for image in images],
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
    }
    if regions:
        payload["regions"] = [r if isinstance(r, Mapping) else region_to_dict(r) for r in regions]
    if model is not None:
        payload["model"] = model
    if stop is not None:
        payload["stop"] = stop
    return payload


def build_chat_payload(
    messages: Sequence[Mapping[str, Any]],
    *,
    model: str | None = None,
    temperature: float = 0.2,
    top_p: float = 0.7,
    max_new_tokens: int = 512,
    stop: str | None = None,
    region_feature: bool | None = None,
) -> dict[str, Any]:
    """The JSON payload for ``/worker_generate_stream`` with structured ``messages`` (see ``chat_messages``);
    ``region_feature`` None leaves the choice to the worker (its checkpoint's config)."""
    payload: dict[str, Any] = {"messages": [dict(m) for m in messages], "temperature": temperature, "top_p": top_p,
                               "max_new_tokens": max_new_tokens}
    if model is not None:
        payload["model"] = model
    if stop is not None:
        payload["stop"] = stop
    if region_feature is not None:
        payload["region_feature"] = bool(region_feature)
    return payload


# ----------------------------------------------------------------------------------------------- framing


def encode_chunk(message: Mapping[str, Any]) -> bytes:
    """One streamed message: its JSON (UTF-8) followed by ``\\0``. JSON escapes NUL, so the frame holds none."""
    return json.dumps(message, ensure_ascii=False).encode("utf-8") + b"\0"


def error_chunk(text: str, code: ErrorCode | int) -> bytes:
    """A framed error message ``{"text": text, "error_code": code}``."""
    return encode_chunk({"text": text, "error_code": int(code)})


def _decode_frame(frame: bytes) -> dict[str, Any]:
    try:
        message = json.loads(frame.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        preview = frame[:80].decode("utf-8", errors="replace")
        raise ValueError(f"malformed stream message {preview!r}: {err}") from err
    if not isinstance(message, dict):
        raise ValueError(f"stream message must be a JSON object, got {type(message).__name__}")
    return message


class StreamDecoder:
    """Incremental reader of a ``\\0``-framed JSON stream: feed it bytes as they arrive, in any split."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """The messages completed by ``data`` (possibly none). Raises ValueError for a malformed message."""
        self._buffer += data
        messages = []
        start = 0
        while (end := self._buffer.find(b"\0", start)) >= 0:
            frame = bytes(self._buffer[start:end])
            start = end + 1
            if frame.strip():
                messages.append(_decode_frame(frame))
        del self._buffer[:start]
        return messages

    def close(self) -> list[dict[str, Any]]:
        """Messages left at the end of the stream: a last frame may lack its ``\\0``."""
        frame, self._buffer = bytes(self._buffer), bytearray()
        return [_decode_frame(frame)] if frame.strip() else []


def iter_messages(chunks: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """Messages from an iterable of raw byte chunks (e.g. ``response.iter_bytes()``)."""
    decoder = StreamDecoder()
    for chunk in chunks:
        yield from decoder.feed(chunk)
    yield from decoder.close()
