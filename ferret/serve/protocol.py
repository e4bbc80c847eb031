"""The wire protocol between Ferret's serving pieces: the generation request and the streamed reply.

This module owns
* ``parse_generate_request``: validation of a ``/worker_generate_stream`` payload into a ``GenerateRequest``,
  shared by the model worker, the OpenAI-style API and the Gradio UI, so all three reject the same inputs with
  the same messages;
* ``build_generate_payload`` and ``region_to_dict``: the inverse, for clients;
* the stream framing: every message is one JSON object followed by a ``\\0`` byte (``encode_chunk``), read back
  incrementally by ``StreamDecoder``;
* the error codes carried in streamed messages (``ErrorCode``).

A request payload (all coordinates in PIXELS of the image, x right, y down, 0-based)::

    {
      "model": "ferret-7b",                       # optional; the controller routes on it
      "prompt": "... <image>\\n What is [120, 45, 300, 400] <region_fea>? ...",
      "images": ["<base64 PNG or JPEG>"],           # as many as "<image>" in the prompt (at most limits.max_images)
      "regions": [                                   # one per "<region_fea>" in the prompt, in prompt order
        {"type": "point", "x": 10, "y": 20},
        {"type": "box", "x1": 5, "y1": 5, "x2": 60, "y2": 40},
        {"type": "polygon", "points": [[0, 0], [30, 0], [15, 25]]},
        {"type": "mask", "rle": {"size": [H, W], "counts": "<COCO RLE string or list of ints>"}}
      ],
      "temperature": 0.2, "top_p": 0.7, "max_new_tokens": 512, "stop": "</s>"
    }

Instead of ``regions`` the original's ``region_masks`` is accepted: one dense nested list per region laid out
``[W][H]`` (``mask[x][y]``), converted here to ``[H, W]`` bool. Regions refer to the first image.

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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ferret import regions as R
from ferret.constants import IMAGE_TOKEN, REGION_TOKEN

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


def parse_dense_mask(mask: Any, index: int, image_size: tuple[int, int]) -> RegionSpec:
    """The original's ``region_masks[index]``: nested lists laid out [W][H]; returned as a [H, W] bool mask."""
    width, height = image_size
    where = f"region_masks[{index}]"
    try:
        array = np.asarray(mask, dtype=np.float32)
    except (ValueError, TypeError) as err:
        raise RequestError(f"{where} must be a rectangular [W][H] list of numbers ({err})", 400) from err
    if array.ndim != 2:
        raise RequestError(f"{where} must be 2-D [W][H], got {array.ndim}-D", 400)
    if array.shape != (width, height):
        raise RequestError(
            f"{where} has shape [W][H] = {list(array.shape)} but the image is W={width}, H={height}", 422
        )
    if not np.isfinite(array).all():
        raise RequestError(f"{where} contains NaN or infinity", 422)
    hw = np.ascontiguousarray(array.T > 0)
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


# ----------------------------------------------------------------------------------------------- request


@dataclass(eq=False)
class GenerateRequest:
    """A validated generation request. ``images`` are RGB; ``regions`` refer to ``images[0]``."""

    prompt: str
    images: list[Image.Image]
    regions: list[RegionSpec]
    temperature: float
    top_p: float
    max_new_tokens: int
    stop: str | None = None
    model: str | None = None

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

    prompt = payload.get("prompt")
    if not isinstance(prompt, str):
        raise RequestError(f"'prompt' must be a string, got {type(prompt).__name__}", 400)
    if len(prompt) > limits.max_prompt_chars:
        raise RequestError(f"'prompt' has {len(prompt)} characters; the limit is {limits.max_prompt_chars}", 413)

    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(f"'model' must be a string, got {type(model).__name__}", 400)

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
    images = [decode_image(data, i, limits) for i, data in enumerate(raw_images)]

    regions = _parse_regions(payload, images, limits)
    num_region_tokens = prompt.count(REGION_TOKEN)
    if num_region_tokens != len(regions):
        raise RequestError(
            f"the prompt contains {REGION_TOKEN} {num_region_tokens} time(s) but {len(regions)} region(s) were given",
            422,
        )

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
        raise RequestError(f"'stop' must be a non-empty string or absent, got {stop!r}", 400)

    return GenerateRequest(
        prompt=prompt,
        images=images,
        regions=regions,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=int(max_new_tokens),
        stop=stop,
        model=model,
    )


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
