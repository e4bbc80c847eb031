"""The Ferret web demo on current Gradio (6.x): refer to regions by drawing, chat, see the grounded boxes.

How it works (docs/compatibility.md §11.3; rebuilt for gradio 6, which has no ``Image(tool="sketch")``, §12.33):

* Upload an image into the editor (a small one is shown upscaled, so the brush, sized to the picture, can draw
  precisely; the editor's toolbar has undo and the eraser) and draw on it with the brush; choose the *Referring Input Type* and press
  **Add region**. The strokes drawn since the last region become one region: *Point* = the median of the new
  stroke pixels, *Box* = their bounding box, *Sketch* = the stroke itself (a free-form mask). Each region is listed
  in the *Referring Input Cache* as ``[regionN]``, drawn in the *Parsed Referring Input* preview, and ``[regionN]``
  is appended to the question (it can be moved or retyped; ``<regionN>`` works too).
* **Send** sends the conversation to the controller as structured messages (the OpenAI API's shape: each
  ``[regionN]`` becomes that message's ``<regionK>`` with the region in pixels, points and boxes as numbers,
  sketches as COCO RLE; the image as a data URL). The worker's FerretProcessor builds the ferret_v1 prompt,
  coordinates and masks; region features are on when the checkpoint has a region sampler (``--region-feature``
  forces them on). The controller picks the worker and answers with real statuses (503 no worker, 429 busy).
* When the answer is complete, its grounded regions (in pixels, from the worker's ``regions`` field, i.e.
  FerretProcessor.post_process) are drawn with their phrases in *Output Vis*.
* Conversations and votes are logged as JSON lines to ``LOGDIR/YYYY-MM-DD-conv.json`` with the start *and* the
  real finish time (docs/compatibility.md §12.37), images to ``LOGDIR/serve_images/<date>/<md5>.jpg``.

Decoding is greedy by default (temperature 0): a grounding answer's coordinates come out as the model's best
guess, not a sample. Uploads are limited (``--max-upload-mb``, ``--max-image-side``) and must decode as images.

Run::

    ferret serve web --controller-url http://127.0.0.1:21001 --port 7860
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
from PIL import Image, ImageDraw

from ferret import regions as R
from ferret.constants import IMAGE_TOKEN, REGION_TOKEN
from ferret.flags import add_refused_flags, add_region_feature_argument
from ferret.serve.draw import draw_annotated, region_label, upscale_factor
from ferret.serve.protocol import (
    API_KEY_ENV,
    ErrorCode,
    StreamDecoder,
    build_chat_payload,
    chat_messages,
    region_to_dict,
)

# gradio and ferret.processing (torch) are imported where they are used, so that --help stays fast.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo
if TYPE_CHECKING:
    from ferret.processing import Frame

logger = logging.getLogger(__name__)

REFER_TYPES = ("Point", "Box", "Sketch")
STOP = "</s>"
MAX_OUTPUT_TOKENS = 1024
CONNECT_TIMEOUT = 5.0
STREAM_TIMEOUT = 120.0  # a backstop only: the controller bounds time-to-first-token and silence mid-stream
CURSOR = "▌"
DISPLAY_MIN_SIDE = 448  # smaller uploads are shown upscaled (NEAREST) in the editor and the previews
MAX_IMAGE_SIDE = 4096  # default of --max-image-side


def image_frame(aspect_ratio: str, width: int, height: int) -> "Frame":
    """`ferret.processing.image_frame`, imported on first use."""
    from ferret.processing import image_frame as frame

    return frame(aspect_ratio, width, height)


class UserError(ValueError):
    """Something the user can fix (shown as a warning in the page)."""


# ---------------------------------------------------------------------------------------------- session state


@dataclass
class WebSession:
    """One browser session: the image, the referring regions drawn so far, and the conversation.

    ``turns`` alternate human/gpt (the last may be a human turn still waiting for, or failed to get, an answer);
    their text keeps the ``[regionN]`` placeholders, which index ``regions``. ``chat`` is what the chatbot shows.
    """

    image: Image.Image | None = None
    image_key: str | None = None
    regions: list[tuple[str, R.Region]] = field(default_factory=list)  # (kind, region)
    stroke: np.ndarray | None = None  # union of the strokes already turned into regions, bool [H, W]
    turns: list[dict[str, str]] = field(default_factory=list)
    chat: list[dict[str, str]] = field(default_factory=list)
    grounded: list[R.GroundedRegion] = field(default_factory=list)
    conv_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    answer_failed: bool = False
    display_key: str | None = None  # the upscaled copy of ``image`` that the editor shows, if any

    def reset_conversation(self) -> None:
        self.regions, self.stroke, self.turns, self.chat, self.grounded = [], None, [], [], []
        self.conv_id = uuid.uuid4().hex
        self.answer_failed = False

    def set_image(self, image: Image.Image) -> bool:
        """Adopt ``image``; a different image than before starts a new conversation. True when it changed.

        The editor's upscaled display copy of the current image (see `display_image`) counts as the same image."""
        key = _image_key(image)
        if key in (self.image_key, self.display_key) or self._is_display_copy(image):
            return False
        self.image, self.image_key, self.display_key = image, key, None
        self.reset_conversation()
        return True

    def _is_display_copy(self, image: Image.Image) -> bool:
        """Whether ``image`` is the editor's upscaled copy of the current image after an encoding round trip:
        k times its size, and the same picture when sampled at the centres of the k x k blocks."""
        if self.image is None or self.display_key is None:
            return False
        factor = upscale_factor(self.image.size, DISPLAY_MIN_SIDE)
        if image.size != (self.image.width * factor, self.image.height * factor):
            return False
        centres = np.asarray(image.convert("RGB"), dtype=np.int16)[factor // 2::factor, factor // 2::factor]
        return float(np.abs(centres - np.asarray(self.image.convert("RGB"), dtype=np.int16)).mean()) < 8.0

    def display_image(self) -> Image.Image | None:
        """The image as the editor shows it: upscaled (NEAREST) to at least DISPLAY_MIN_SIDE px when smaller."""
        if self.image is None:
            return None
        factor = upscale_factor(self.image.size, DISPLAY_MIN_SIDE)
        if factor == 1:
            return self.image
        shown = self.image.resize((self.image.width * factor, self.image.height * factor), Image.NEAREST)
        self.display_key = _image_key(shown)
        return shown


def _image_key(image: Image.Image) -> str:
    return hashlib.md5(image.tobytes() + repr(image.size).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- editor input


def _to_array(image: Any) -> np.ndarray | None:
    if image is None:
        return None
    if isinstance(image, Image.Image):
        return np.asarray(image)
    if isinstance(image, str):
        with Image.open(image) as opened:
            return np.asarray(opened.convert("RGBA"))
    return np.asarray(image)


def editor_image(value: Mapping[str, Any] | None, max_side: int = MAX_IMAGE_SIDE) -> Image.Image | None:
    """The uploaded picture (the editor's background, without strokes) as RGB; transparency becomes white.

    Raises UserError for a picture that cannot be read or has a side over ``max_side`` px."""
    if not value:
        return None
    try:
        background = _to_array(value.get("background"))
    except (OSError, ValueError) as err:
        raise UserError(f"the upload is not an image that can be read ({err})") from err
    if background is None or background.size == 0:
        return None
    if max(background.shape[:2]) > max_side:
        raise UserError(f"the image is {background.shape[1]}x{background.shape[0]} px; at most {max_side} px a side "
                        "is accepted")
    if background.ndim == 2:
        return Image.fromarray(background.astype(np.uint8)).convert("RGB")
    image = Image.fromarray(background.astype(np.uint8))
    if image.mode in ("RGBA", "LA"):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def editor_strokes(value: Mapping[str, Any] | None, size: tuple[int, int]) -> np.ndarray:
    """Union of the brush strokes in the editor's layers as bool [H, W] at the image ``size`` (W, H)."""
    width, height = size
    strokes = np.zeros((height, width), dtype=bool)
    for layer in (value or {}).get("layers") or []:
        array = _to_array(layer)
        if array is None or array.ndim != 3:
            continue
        drawn = array[..., 3] > 0 if array.shape[2] == 4 else array.max(axis=2) > 0
        strokes |= _to_size(drawn, width, height)
    return strokes


def _to_size(drawn: np.ndarray, width: int, height: int) -> np.ndarray:
    """Strokes bool [h, w] drawn on the editor's copy of the image, at the image's size [height, width]: a copy
    upscaled k times maps back block by block (a pixel is drawn when any of its k x k block is), so a thin stroke
    on the upscaled display survives; other sizes are resized NEAREST."""
    h, w = drawn.shape
    if (h, w) == (height, width):
        return drawn
    if h % height == 0 and w % width == 0 and h // height == w // width:
        k = h // height
        return drawn.reshape(height, k, width, k).any(axis=(1, 3))
    return np.asarray(Image.fromarray(drawn.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)) > 0


def region_from_stroke(kind: str, new: np.ndarray) -> R.Region:
    """The region a stroke means: Point = the median stroke pixel, Box = the stroke's bbox, Sketch = the stroke."""
    ys, xs = np.nonzero(new)
    if len(xs) == 0:
        raise UserError("draw on the image with the brush first, then add the region")
    if kind == "Point":
        return R.Point(float(np.median(xs).round()), float(np.median(ys).round()))
    if kind == "Box":
        return R.Box(float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))
    if kind == "Sketch":
        return R.FreeForm(new.copy())
    raise UserError(f"unknown referring input type {kind!r}; choose one of {', '.join(REFER_TYPES)}")


def add_region(session: WebSession, editor_value: Mapping[str, Any] | None, kind: str, text: str
               ) -> tuple[WebSession, str]:
    """Turn the strokes drawn since the last region into a region; returns (session, text with ``[regionN]``)."""
    image = editor_image(editor_value)
    if image is None:
        raise UserError("upload an image first")
    session.set_image(image)  # the editor may show an upscaled copy: regions are in pixels of the original
    strokes = editor_strokes(editor_value, session.image.size)
    previous = session.stroke if session.stroke is not None and session.stroke.shape == strokes.shape else None
    new = strokes & ~previous if previous is not None else strokes
    region = region_from_stroke(kind, new)
    session.stroke = strokes
    session.regions.append((kind.lower(), region))
    label = region_label(len(session.regions) - 1)
    text = (text or "").rstrip()
    return session, f"{text} {label}".strip()


def cache_entries(session: WebSession) -> list[tuple[str, str]]:
    """The Referring Input Cache: ``("[regionN]", kind)`` pairs."""
    return [(region_label(k), kind) for k, (kind, _) in enumerate(session.regions)]


def referring_preview(session: WebSession) -> Image.Image | None:
    """The image (upscaled when small) with the referring regions outlined, their names in a legend."""
    if session.image is None:
        return None
    return draw_annotated(session.image, [(f"{region_label(k)} {kind}", r)
                                          for k, (kind, r) in enumerate(session.regions)], DISPLAY_MIN_SIDE)


# ---------------------------------------------------------------------------------------------- prompts


def add_text(session: WebSession, text: str, editor_value: Mapping[str, Any] | None) -> WebSession:
    """Append the user's question (the image must be uploaded)."""
    text = (text or "").replace(IMAGE_TOKEN, "").replace(REGION_TOKEN, "").strip()
    if not text:
        raise UserError("type a question first")
    image = editor_image(editor_value)
    if image is not None:
        session.set_image(image)
    if session.image is None:
        raise UserError("upload an image first")
    for match in R.TYPED_PLACEHOLDER.finditer(text):
        k = int(match.group(1) or match.group(2))
        if k >= len(session.regions):
            raise UserError(f"{match.group(0)} has not been drawn: the cache holds {len(session.regions)} region(s)")
    if session.turns and session.turns[-1]["from"] == "human":  # the previous question got no answer
        session.turns.pop()
        if session.answer_failed and session.chat:
            session.chat.pop()
        if session.chat and session.chat[-1]["role"] == "user":
            session.chat.pop()
    session.turns.append({"from": "human", "value": text})
    session.chat.append({"role": "user", "content": text})
    session.answer_failed = False
    return session


def build_messages(turns: Sequence[Mapping[str, str]], regions: Sequence[R.Region],
                   image: Image.Image | None) -> list[dict[str, Any]]:
    """The conversation as structured messages (the OpenAI API's shape, ferret.serve.protocol): ``[regionN]`` in a
    user turn indexes ``regions`` (the session's, in pixels); each message gets its own ``<regionK>`` placeholders
    and ``regions`` list, in order of first mention. The worker's processor builds the prompt, coordinates and
    masks; the UI never templates."""
    texts: list[dict[str, str]] = []
    per_turn: list[list[R.Region]] = []
    for turn in turns:
        is_user = turn["from"] == "human"
        used: dict[int, int] = {}

        def number(n: int) -> int:
            if n >= len(regions):
                raise UserError(f"{R.drawn_placeholder(n)} has not been drawn: the cache holds {len(regions)} "
                                "region(s)")
            return used.setdefault(n, len(used))

        text = R.typed_to_placeholders(turn["value"], number) if is_user else turn["value"]
        texts.append({"from": turn["from"], "value": text})
        per_turn.append([regions[n] for n in used])
    return chat_messages(texts, image, per_turn)


def grounded_from_message(message: Mapping[str, Any], output: str, image_size: tuple[int, int]
                          ) -> list[R.GroundedRegion]:
    """The answer's grounded regions: the worker's ``regions`` (pixels) when it sent them, else parsed here."""
    wire = message.get("regions")
    if not isinstance(wire, list):
        return R.parse_regions(output, *image_size)
    found = []
    for item in wire:
        kind = item.get("type") if isinstance(item, Mapping) else None
        try:
            if kind == "box":
                region: R.Point | R.Box = R.Box(*(float(item[k]) for k in ("x1", "y1", "x2", "y2")))
            elif kind == "point":
                region = R.Point(float(item["x"]), float(item["y"]))
            else:
                continue
        except (KeyError, TypeError, ValueError):
            continue
        found.append(R.GroundedRegion(phrase=str(item.get("phrase", "")), region=region, grid=(), span=(0, 0)))
    return found


# ---------------------------------------------------------------------------------------------- controller


class ControllerClient:
    """Talks to the controller: the model list, and answers streamed through its ``/worker_generate_stream``
    (which picks the worker, bounds time-to-first-token and silences, and answers with real statuses).
    ``api_key`` (default ``$FERRET_API_KEY``) is sent as ``Authorization: Bearer`` for workers that require it."""

    def __init__(self, controller_url: str, api_key: str | None = None):
        self.controller_url = controller_url.rstrip("/")
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        headers = {"Authorization": f"Bearer {key}"} if key else None
        self._client = httpx.Client(trust_env=False, headers=headers,
                                    timeout=httpx.Timeout(STREAM_TIMEOUT, connect=CONNECT_TIMEOUT))

    def close(self) -> None:
        self._client.close()

    def model_list(self) -> list[str]:
        try:
            self._client.post(f"{self.controller_url}/refresh_all_workers", timeout=CONNECT_TIMEOUT * 2)
            reply = self._client.post(f"{self.controller_url}/list_models", timeout=CONNECT_TIMEOUT)
            reply.raise_for_status()
            models = reply.json().get("models", [])
        except (httpx.HTTPError, ValueError) as err:
            logger.warning("Cannot list models at %s: %s", self.controller_url, err)
            return []
        return sorted(m for m in models if isinstance(m, str))

    def worker_address(self, model: str) -> str:
        reply = self._client.post(f"{self.controller_url}/get_worker_address", json={"model": model},
                                  timeout=CONNECT_TIMEOUT)
        reply.raise_for_status()
        return str(reply.json().get("address") or "")

    def stream(self, payload: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """The messages answering ``payload`` (routed on its ``model``); a refusal (503 no worker, 429 busy, a 4xx
        from the worker, 502/504 worker failure) becomes one message with its ``error_code`` and ``status``."""
        url = f"{self.controller_url}/worker_generate_stream"
        with self._client.stream("POST", url, json=dict(payload)) as response:
            if response.status_code != 200:
                body = response.read()
                try:
                    message = json.loads(body.rstrip(b"\0"))
                except ValueError:
                    message = None
                if not isinstance(message, dict):
                    message = {"text": body[:200].decode("utf-8", "replace")}
                code = message.get("error_code")
                yield {"text": str(message.get("text") or message.get("detail") or f"HTTP {response.status_code}"),
                       "error_code": code if isinstance(code, int) and code else int(ErrorCode.WORKER_ERROR),
                       "status": response.status_code}
                return
            decoder = StreamDecoder()
            for raw in response.iter_bytes():
                yield from decoder.feed(raw)
            yield from decoder.close()


# ---------------------------------------------------------------------------------------------- logging


class ConversationLog:
    """JSON lines under ``logdir``: one file per day; images saved once under ``serve_images/<date>/``."""

    def __init__(self, logdir: str):
        self.logdir = logdir
        self._lock = threading.Lock()

    def _day(self, stamp: float) -> str:
        return datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d")

    def save_image(self, image: Image.Image, stamp: float) -> str:
        digest = hashlib.md5(image.tobytes()).hexdigest()
        folder = os.path.join(self.logdir, "serve_images", self._day(stamp))
        path = os.path.join(folder, f"{digest}.jpg")
        if not os.path.exists(path):
            os.makedirs(folder, exist_ok=True)
            image.save(path, format="JPEG", quality=90)
        return path

    def write(self, record: dict[str, Any]) -> str:
        stamp = record.get("tstamp", time.time())
        os.makedirs(self.logdir, exist_ok=True)
        path = os.path.join(self.logdir, f"{self._day(stamp)}-conv.json")
        line = json.dumps(record, ensure_ascii=False)
        with self._lock, open(path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
        return path


def _session_record(session: WebSession) -> dict[str, Any]:
    return {
        "conv_id": session.conv_id,
        "turns": list(session.turns),
        "regions": [{"name": region_label(k), "kind": kind, **region_to_dict(r)}
                    for k, (kind, r) in enumerate(session.regions)],
    }


# ---------------------------------------------------------------------------------------------- the bot


@dataclass
class BotSettings:
    controller: ControllerClient
    log: ConversationLog
    region_feature: bool | None = None  # None: as the worker's checkpoint says


def _without_image_data(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The request's messages for the log: the image is logged as a file, not as a data URL in every line."""
    logged = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [p if p.get("type") != "image_url" else {"type": "image_url", "image_url": {"url": "<image>"}}
                       for p in content]
        logged.append({**message, "content": content})
    return logged


def answer(settings: BotSettings, session: WebSession, model: str | None, temperature: float, top_p: float,
           max_new_tokens: int, ip: str | None = None) -> Iterator[WebSession]:
    """Stream the answer to the last question into ``session.chat``; yields the session after each update."""
    if not session.turns or session.turns[-1]["from"] != "human":
        return
    start = time.time()
    session.chat.append({"role": "assistant", "content": CURSOR})
    yield session

    def fail(text: str) -> WebSession:
        session.chat[-1] = {"role": "assistant", "content": f"**{text}**"}
        session.answer_failed = True
        return session

    if not model:
        yield fail("No model is available: start a model worker, then reload the page.")
        return
    image = session.image
    try:
        messages = build_messages(session.turns, [r for _, r in session.regions], image)
    except UserError as err:
        yield fail(str(err))
        return
    # region_feature None: the worker follows its checkpoint (a model with a region sampler reads region features)
    payload = build_chat_payload(messages, model=model, temperature=float(temperature), top_p=float(top_p),
                                 max_new_tokens=int(min(max_new_tokens, MAX_OUTPUT_TOKENS)), stop=STOP,
                                 region_feature=settings.region_feature)
    output = ""
    last: dict[str, Any] = {}
    try:
        for message in settings.controller.stream(payload):
            if message.get("error_code", 0) != 0:
                status = f"HTTP {message['status']}, " if "status" in message else ""
                yield fail(f"{message.get('text', 'error')} ({status}error_code {message.get('error_code')})")
                return
            last = message
            output = str(message.get("text", "")).strip()
            session.chat[-1] = {"role": "assistant", "content": output + CURSOR}
            yield session
    except (httpx.HTTPError, ValueError) as err:
        yield fail(f"The controller {settings.controller.controller_url} failed: {err}")
        return
    session.grounded = grounded_from_message(last, output, image.size)
    session.chat[-1] = {"role": "assistant", "content": output or "*(empty answer)*"}
    session.turns.append({"from": "gpt", "value": output})
    finish = time.time()
    try:
        settings.log.write({
            "tstamp": round(finish, 4), "type": "chat", "model": model, "start": round(start, 4),
            "finish": round(finish, 4), "ip": ip, "image": settings.log.save_image(image, start),
            "messages": _without_image_data(messages), "output": output,
            "grounded": [{"phrase": g.phrase, **region_to_dict(g.region)} for g in session.grounded],
            **_session_record(session),
        })
    except OSError as err:
        logger.warning("Cannot write the conversation log: %s", err)
    yield session


def output_visual(session: WebSession) -> Image.Image | None:
    """The image (upscaled when small) with the answer's grounded regions, their phrases in a legend."""
    if session.image is None:
        return None
    return draw_annotated(session.image, [(g.phrase or f"obj{k}", g.region) for k, g in enumerate(session.grounded)],
                          DISPLAY_MIN_SIDE)


def vote(settings: BotSettings, session: WebSession, model: str | None, kind: str, ip: str | None = None) -> None:
    settings.log.write({"tstamp": round(time.time(), 4), "type": kind, "model": model, "ip": ip,
                        **_session_record(session)})


# ---------------------------------------------------------------------------------------------- examples


EXAMPLE_QUESTIONS = ("What is the location of the red circle in the image?", "Describe the image.")


def make_example_images(folder: str) -> list[str]:
    """Writes two small example pictures of coloured shapes (drawn here, nothing downloaded) and returns their
    paths. Their questions (`EXAMPLE_QUESTIONS`) fit any Ferret: the toy world's models know these shapes and
    wordings, and a released model can answer them about any picture."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    shapes = Image.new("RGB", (224, 224), (245, 245, 240))
    draw = ImageDraw.Draw(shapes)
    draw.ellipse([24, 30, 104, 110], fill=(220, 40, 40))
    draw.rectangle([128, 120, 200, 192], fill=(40, 90, 220))
    paths.append(os.path.join(folder, "red_circle_blue_square.png"))
    shapes.save(paths[-1])
    more = Image.new("RGB", (224, 224), (245, 245, 240))
    draw = ImageDraw.Draw(more)
    draw.polygon([(60, 20), (110, 100), (10, 100)], fill=(240, 200, 30))
    star = [(160 + (36 if k % 2 == 0 else 15) * np.sin(k * np.pi / 5), 160 - (36 if k % 2 == 0 else 15)
             * np.cos(k * np.pi / 5)) for k in range(10)]
    draw.polygon(star, fill=(40, 170, 60))
    paths.append(os.path.join(folder, "yellow_triangle_green_star.png"))
    more.save(paths[-1])
    return paths


# ---------------------------------------------------------------------------------------------- the page


TITLE = """# Ferret: refer and ground anything anywhere at any granularity
Upload an image, draw on it with the brush, pick the **Referring Input Type** and press **Add region**; the region
is added to your question as `[region0]`, `[region1]`, ... Then ask. Grounded answers are drawn in *Output Vis*.
Small images are shown enlarged; the editor's toolbar has the brush size, undo and the eraser."""


def build_demo(args: argparse.Namespace, settings: BotSettings, models: list[str]):
    """The Gradio Blocks app. Element ids (for tests and custom CSS): ferret_image, refer_type, add_region,
    region_cache, region_preview, chatbot, input_text, send, regenerate, clear, upvote, downvote, output_vis."""

    import gradio as gr

    def warn(err: Exception) -> None:
        gr.Warning(str(err))

    def ip_of(request) -> str | None:
        client = getattr(request, "client", None)
        return getattr(client, "host", None)

    def on_upload(session, editor_value):
        """A new picture: remember it and show it upscaled when small (the brush is then sized to the display)."""
        session = WebSession()
        try:
            image = editor_image(editor_value, args.max_image_side)
        except UserError as err:
            warn(err)
            return session, None, [], None, None
        if image is None:
            return session, gr.skip(), [], None, None
        session.set_image(image)
        shown = session.display_image()
        editor_update = gr.skip() if shown is image else {"background": shown, "layers": [], "composite": shown}
        return session, editor_update, [], referring_preview(session), None

    def on_add_region(session, editor_value, kind, text):
        session = session or WebSession()
        try:
            session, text = add_region(session, editor_value, kind, text)
        except UserError as err:
            warn(err)
        return session, cache_entries(session), referring_preview(session), text

    def on_add_text(session, text, editor_value):
        session = session or WebSession()
        try:
            session = add_text(session, text, editor_value)
            text = ""
        except UserError as err:
            warn(err)
        return session, list(session.chat), text, cache_entries(session), referring_preview(session)

    def on_answer(session, model, temperature, top_p, max_new_tokens, request):
        session = session or WebSession()
        for current in answer(settings, session, model, temperature, top_p, max_new_tokens, ip_of(request)):
            yield current, list(current.chat), gr.skip()
        yield session, list(session.chat), output_visual(session)

    # gradio hands the request to a parameter annotated gr.Request; annotations are strings in this module and
    # gradio is imported here, not at module level, so the annotation is given as the class itself.
    on_answer.__annotations__ = {"request": gr.Request}

    def on_regenerate(session):
        session = session or WebSession()
        if session.turns and session.turns[-1]["from"] == "gpt":
            session.turns.pop()
            if session.chat and session.chat[-1]["role"] == "assistant":
                session.chat.pop()
        elif session.answer_failed and session.chat and session.chat[-1]["role"] == "assistant":
            session.chat.pop()
        session.answer_failed = False
        session.grounded = []
        return session, list(session.chat)

    def on_clear(session, editor_value):
        # Everything back to the start. An editor holding a picture gets the value None: gradio 6 then clears its
        # canvas and is ready for the next upload. An empty editor is left alone: resetting it again (None, an
        # empty EditorValue or gr.ImageEditor(value=None)) could leave it stuck at "processing".
        # tests/serve/test_serve_browser.py clears both and uploads and draws again.
        has_picture = bool(editor_value) and editor_value.get("background") is not None
        return WebSession(), [], "", [], None, None, None if has_picture else gr.skip()

    def on_vote(kind):
        def handler(session, model, request):
            if session is not None and session.turns:
                vote(settings, session, model, kind, ip_of(request))
                gr.Info(f"Thanks for the {kind}!")
        handler.__annotations__ = {"request": gr.Request}
        return handler

    def refresh_models():
        names = settings.controller.model_list()
        return gr.Dropdown(choices=names, value=names[0] if names else None)

    with gr.Blocks(title="Ferret") as demo:
        state = gr.State(None)
        gr.Markdown(TITLE)
        with gr.Row():
            with gr.Column(scale=4):
                model_selector = gr.Dropdown(choices=models, value=models[0] if models else None, label="Model",
                                             interactive=True, elem_id="model_selector")
                # No crop/resize tools (they would move the picture under the regions); brush and eraser sizes
                # follow the picture ("auto": 1/50 of its shorter side), and small pictures arrive upscaled.
                editor = gr.ImageEditor(
                    type="numpy", sources=["upload", "clipboard"], layers=False, transforms=(),
                    eraser=gr.Eraser(default_size="auto"),
                    brush=gr.Brush(default_size="auto", colors=["#ff3030"], color_mode="fixed"),
                    label="Image: draw a referring region with the brush", elem_id="ferret_image",
                    canvas_size=(640, 480), image_mode="RGB", format="png",
                )
                with gr.Row():
                    refer_type = gr.Radio(list(REFER_TYPES), value="Box", label="Referring Input Type",
                                          elem_id="refer_type")
                    add_region_btn = gr.Button("Add region", elem_id="add_region")
                cache = gr.HighlightedText(label="Referring Input Cache", elem_id="region_cache",
                                           combine_adjacent=False, show_legend=False)
                preview = gr.Image(label="Parsed Referring Input", type="pil", interactive=False,
                                   elem_id="region_preview")
                with gr.Accordion("Parameters", open=False):
                    temperature = gr.Slider(0.0, 1.0, value=0.0, step=0.1, label="Temperature (0: greedy)")
                    top_p = gr.Slider(0.0, 1.0, value=0.7, step=0.1, label="Top P")
                    max_tokens = gr.Slider(1, MAX_OUTPUT_TOKENS, value=args.max_output_tokens, step=1,
                                           label="Max output tokens")
            with gr.Column(scale=6):
                chatbot = gr.Chatbot(label="Ferret", elem_id="chatbot", height=460)
                with gr.Row():
                    textbox = gr.Textbox(show_label=False, placeholder="Ask about the image, e.g. What is [region0]?",
                                         elem_id="input_text", scale=8)
                    send_btn = gr.Button("Send", variant="primary", elem_id="send", scale=1)
                with gr.Row():
                    upvote_btn = gr.Button("👍 Upvote", elem_id="upvote")
                    downvote_btn = gr.Button("👎 Downvote", elem_id="downvote")
                    regenerate_btn = gr.Button("🔄 Regenerate", elem_id="regenerate")
                    clear_btn = gr.Button("🗑️ Clear", elem_id="clear")
                output_vis = gr.Image(label="Output Vis", type="pil", interactive=False, elem_id="output_vis")
        examples = make_example_images(args.examples_dir)
        gr.Examples(examples=[[examples[0], EXAMPLE_QUESTIONS[0]], [examples[1], EXAMPLE_QUESTIONS[1]]],
                    inputs=[editor, textbox])

        gen_inputs = [state, model_selector, temperature, top_p, max_tokens]
        gen_outputs = [state, chatbot, output_vis]
        editor.upload(on_upload, [state, editor], [state, editor, cache, preview, output_vis])
        add_region_btn.click(on_add_region, [state, editor, refer_type, textbox], [state, cache, preview, textbox])
        for trigger in (textbox.submit, send_btn.click):
            trigger(on_add_text, [state, textbox, editor], [state, chatbot, textbox, cache, preview]).then(
                on_answer, gen_inputs, gen_outputs)
        regenerate_btn.click(on_regenerate, [state], [state, chatbot]).then(on_answer, gen_inputs, gen_outputs)
        clear_btn.click(on_clear, [state, editor], [state, chatbot, textbox, cache, preview, output_vis, editor])
        upvote_btn.click(on_vote("upvote"), [state, model_selector], None)
        downvote_btn.click(on_vote("downvote"), [state, model_selector], None)
        if args.model_list_mode == "reload":
            demo.load(refresh_models, None, model_selector)
    return demo


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Ferret web demo (gradio).")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (loopback unless asked otherwise)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--controller-url", default="http://127.0.0.1:21001")
    parser.add_argument("--concurrency-count", type=int, default=8, help="answers generated at once")
    parser.add_argument("--model-list-mode", choices=["once", "reload"], default="once")
    parser.add_argument("--share", action="store_true", help="ask gradio for a public share link")
    add_refused_flags(parser, "--moderate", "--embed")
    add_region_feature_argument(parser, default=None)
    parser.add_argument("--max-output-tokens", type=int, default=512,
                        help="the initial value of the 'Max output tokens' slider")
    parser.add_argument("--max-upload-mb", type=float, default=10.0, help="largest upload accepted (MB)")
    parser.add_argument("--max-image-side", type=int, default=MAX_IMAGE_SIDE,
                        help="largest image side accepted (pixels)")
    parser.add_argument("--logdir", default=os.environ.get("FERRET_LOGDIR", os.path.join("runs", "serve_logs")),
                        help="where conversations and images are logged (env FERRET_LOGDIR)")
    parser.add_argument("--examples-dir", default=os.path.join(tempfile.gettempdir(), "ferret_serve_examples"),
                        help="where the example images are written")
    parser.add_argument("--log-level", default="info")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    controller = ControllerClient(args.controller_url)
    settings = BotSettings(controller, ConversationLog(args.logdir), args.region_feature)
    models = controller.model_list()
    logger.info("Models: %s", models or "none yet")
    demo = build_demo(args, settings, models)
    demo.queue(default_concurrency_limit=args.concurrency_count)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share,
                    allowed_paths=[args.examples_dir], footer_links=[],
                    max_file_size=f"{max(1, int(args.max_upload_mb * 1024))}kb")
    finally:
        controller.close()


if __name__ == "__main__":
    main()
