"""An OpenAI-compatible HTTP server for one Ferret model: ``/v1/chat/completions`` (plain and streamed) and
``/v1/models``. Any OpenAI client works with it (``base_url="http://127.0.0.1:8000/v1"``, ``api_key`` = the key
the server was started with, ``--api-key`` or ``$FERRET_API_KEY``; any string when none is set).

Ferret's additions to the chat format, all optional:

* An image is a content part ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``. A file
  path (or ``file://`` URL) is read only from under ``--allowed-image-dir`` (403 otherwise; ``..`` and symlinks
  cannot escape it); remote URLs are never fetched (400). One image per conversation.
* Referring regions are a structured field of a user message, in pixels of the image::

      {"role": "user", "content": "What is <region0> doing next to <region1>?",
       "regions": [{"type": "box", "x1": 10, "y1": 20, "x2": 200, "y2": 240},
                   {"type": "point", "x": 320, "y": 100}]}

  ``<regionK>`` refers to the K-th region of the same message; ``polygon`` and ``mask`` (COCO RLE) work as in the
  worker protocol (ferret.serve.protocol).
* The answer's ``message`` carries, besides ``content`` (the text as generated, coordinates on the model's 0..999
  grid, which is what a follow-up turn must send back), ``regions``: the grounded boxes and points in pixels of the
  image, each with its ``phrase``, and ``clean_text``: the answer without coordinates. In a stream they come with
  the last chunk (the one with ``finish_reason``), inside ``delta``.

Defaults differ from OpenAI's: temperature 0.2 and top_p 0.7 (the Ferret demo's), max_tokens 512 (lowered to fit
the context). A server already running ``--limit-model-concurrency`` requests answers 429 at once. System messages
are accepted and ignored: Ferret's own system prompt is part of its template. Region features are read when the
checkpoint has a region sampler (``--no-region-feature`` / ``--region-feature`` override it).

Refusals, each with the OpenAI error shape ``{"error": {"message", "type", "param", "code"}}``: 400 malformed
(including a body nested too deeply, a lone surrogate in the text, a wrongly typed ``stream_options``), 401 missing
or wrong API key, 403 an image path outside ``--allowed-image-dir``, 404 unknown model, 413 a body over
``--max-body-bytes`` (refused while it is read) or an image over the limits, 415 a body that is not
``application/json``, 429 busy (with ``Retry-After``).

Run::

    python -m ferret.serve.api --model-path ./checkpoints/ferret-7b --allowed-image-dir ./images --port 8000
"""

import argparse
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlparse

from PIL import Image

# Only light modules at the top: `--help` must not pay for torch, transformers or fastapi (they load in main()).
from ferret.flags import add_region_feature_argument
from ferret.serve.protocol import (
    API_KEY_ENV,
    RequestError,
    RequestLimits,
    check_json_depth,
    check_text,
    decode_image,
    decode_image_bytes,
    grounded_to_dict,
    parse_chat_messages,
    resolve_region_feature,
)

logger = logging.getLogger(__name__)

DEFAULT_TEMPERATURE = 0.2
DEFAULT_TOP_P = 0.7
DEFAULT_MAX_TOKENS = 512
MAX_STOP_STRINGS = 4


class ApiError(ValueError):
    """A refused request, OpenAI-style: HTTP ``status`` and ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None):
        from starlette.responses import Response

        # ASCII JSON: an error may quote the client's text, and a lone surrogate in it cannot be UTF-8 encoded
        return Response(json.dumps(self.body()), status_code=self.status, headers=headers,
                        media_type="application/json")


def api_error_from(err: BaseException) -> ApiError:
    """The ApiError for an exception raised while preparing a request."""
    from ferret.serve.inference import PromptTooLong

    if isinstance(err, ApiError):
        return err
    if isinstance(err, PromptTooLong):
        return ApiError(400, str(err), "messages", code="context_length_exceeded")
    if isinstance(err, RequestError):
        return ApiError(413 if err.status == 413 else 400, err.message, "messages")
    if isinstance(err, ValueError):
        return ApiError(400, str(err), "messages")
    return ApiError(500, f"internal error: {err!r}", type="server_error")


# ---------------------------------------------------------------------------------------------- parsing


def _number(body: Mapping[str, Any], key: str, default: float, low: float, high: float,
            low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"'{key}' must be a number, got {value!r}", key)
    if not (low < value <= high if low_open else low <= value <= high):
        bracket = "(" if low_open else "["
        raise ApiError(400, f"'{key}' must be in {bracket}{low:g}, {high:g}], got {value!r}", key)
    return float(value)


def parse_sampling(body: Mapping[str, Any], limits: RequestLimits):
    """temperature, top_p, max_tokens (or max_completion_tokens) and stop of a chat request -> DecodingSettings."""
    from ferret.decoding import DecodingSettings

    temperature = _number(body, "temperature", DEFAULT_TEMPERATURE, 0, 2)
    top_p = _number(body, "top_p", DEFAULT_TOP_P, 0, 1, low_open=True)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, limits.max_new_tokens)
    elif (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
          or not 1 <= max_tokens <= limits.max_new_tokens):
        raise ApiError(400, f"'{key}' must be an integer in [1, {limits.max_new_tokens}], got {max_tokens!r}", key)
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list) and all(isinstance(s, str) and s for s in stop) and len(stop) <= MAX_STOP_STRINGS:
        stops = tuple(stop)
    else:
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings",
                       "stop")
    try:
        for text in stops:
            check_text(text, "'stop'")
    except RequestError as err:
        raise ApiError(400, err.message, "stop") from None
    n = body.get("n", 1)
    if n not in (1, None):
        raise ApiError(400, f"only n=1 is supported, got {n!r}", "n")
    if body.get("logprobs"):
        raise ApiError(400, "logprobs are not supported", "logprobs")
    if body.get("tools"):
        raise ApiError(400, "tools are not supported", "tools")
    return DecodingSettings(temperature=temperature, top_p=top_p, max_new_tokens=max_tokens, stop=stops)


def load_image_reference(url: Any, allowed_dir: str | None, limits: RequestLimits, where: str) -> Image.Image:
    """An ``image_url`` as an RGB image: a base64 data URL, or a file under ``allowed_dir``."""
    if not isinstance(url, str) or not url:
        raise ApiError(400, f"{where}: image_url.url must be a non-empty string", "messages")
    if url.startswith("data:"):
        return decode_image(url, 0, limits)
    parsed = urlparse(url)
    if parsed.scheme == "file":
        path = unquote(parsed.path)
    elif parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive, i.e. a path
        raise ApiError(400, f"{where}: {parsed.scheme}:// images are not fetched; send a data: URL (base64)",
                       "messages")
    else:
        path = url
    if allowed_dir is None:
        raise ApiError(403, f"{where}: image file paths are disabled; start the server with --allowed-image-dir",
                       "messages", type="permission_error")
    base = os.path.realpath(allowed_dir)
    real = os.path.realpath(path if os.path.isabs(path) else os.path.join(base, path))
    if os.path.commonpath([real, base]) != base:
        raise ApiError(403, f"{where}: image path {url!r} is outside the allowed image folder", "messages",
                       type="permission_error")
    if not os.path.isfile(real):
        raise ApiError(400, f"{where}: image file {url!r} does not exist", "messages")
    if os.path.getsize(real) > limits.max_image_bytes:
        raise ApiError(413, f"{where}: image file {url!r} is larger than {limits.max_image_bytes} bytes", "messages")
    with open(real, "rb") as handle:
        return decode_image_bytes(handle.read(), f"{where} image", limits)


def parse_messages(
    messages: Any, allowed_dir: str | None, limits: RequestLimits
) -> tuple[list[dict[str, str]], Image.Image | None, list[list[Any]]]:
    """OpenAI messages -> (turns for FerretProcessor.encode, the image or None, regions per turn), through the
    parser the worker uses too (ferret.serve.protocol.parse_chat_messages); image_url may also name a file under
    ``allowed_dir``."""
    try:
        chat = parse_chat_messages(messages, limits,
                                   lambda url, where: load_image_reference(url, allowed_dir, limits, where))
    except RequestError as err:
        raise ApiError(413 if err.status == 413 else 400, err.message, "messages") from err
    return chat.turns, chat.image, chat.regions


# ---------------------------------------------------------------------------------------------- server


DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # a 20 MB image in base64 (27 MB) plus the text
JSON_TYPES = ("application/json",)


class ChatServer:
    """The model, its processor and the serving limits behind the OpenAI-style endpoints.

    ``region_feature``: None (default) reads region features when the checkpoint has a region sampler; True/False
    force it. ``api_key``: when set, every ``/v1`` request must carry ``Authorization: Bearer <api_key>``.
    ``max_body_bytes``: larger request bodies are refused (413) while they are read, never buffered whole.
    """

    def __init__(self, model: Any, processor: Any, model_name: str, *, limit_model_concurrency: int = 5,
                 allowed_image_dir: str | None = None, limits: RequestLimits = RequestLimits(),
                 region_feature: bool | None = None, api_key: str | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        from ferret.serve.inference import ConcurrencyLimiter

        self.model = model
        self.processor = processor
        self.model_name = model_name
        self.limiter = ConcurrencyLimiter(limit_model_concurrency)
        self.allowed_image_dir = os.path.realpath(allowed_image_dir) if allowed_image_dir else None
        self.limits = limits
        self.region_feature = resolve_region_feature(region_feature, getattr(model, "config", None))
        self.api_key = api_key or None
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())

    def prepare(self, body: Mapping[str, Any], info: dict[str, Any]) -> dict[str, Any]:
        """Messages -> encoded sample (runs in the generation thread: images are decoded here)."""
        turns, image, regions = parse_messages(body.get("messages"), self.allowed_image_dir, self.limits)
        info["image_size"] = image.size if image is not None else None
        try:
            # A text-only chat has no regions (parse_messages refuses them), so its frame size is never used.
            size = None if image is not None else (1000, 1000)
            return self.processor.encode(turns, image, regions=regions, image_size=size, add_generation_prompt=True,
                                         truncate=False, region_feature=self.region_feature)
        except ValueError as err:
            raise ApiError(400, str(err), "messages") from err

    def grounding(self, text: str, image_size: tuple[int, int] | None) -> tuple[str, list[dict[str, Any]]]:
        if image_size is None:
            return text.strip(), []
        clean, grounded = self.processor.post_process(text, image_size)
        return clean, [grounded_to_dict(g) for g in grounded]

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "ferret"}

    def check_auth(self, authorization: str | None) -> ApiError | None:
        """None when the request may proceed; the 401 otherwise (OpenAI clients send ``Bearer <key>``)."""
        if self.api_key is None:
            return None
        if not bearer_matches(authorization, self.api_key):
            return ApiError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                            type="invalid_request_error", code="invalid_api_key")
        return None


def bearer_matches(authorization: str | None, key: str) -> bool:
    """Whether an ``Authorization`` header is ``Bearer <key>`` (constant-time comparison)."""
    scheme, _, token = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("utf-8", "replace"),
                                                              key.encode("utf-8"))


async def read_json_body(request: Any, max_bytes: int) -> Any:
    """The request's JSON body. Raises ApiError: 415 unless the content type is JSON (a web page can post
    ``text/plain`` to a loopback server without asking), 413 as soon as more than ``max_bytes`` arrive (the body
    is never buffered beyond the limit), 400 for bytes that are not JSON or nest too deeply."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in JSON_TYPES and not media_type.endswith("+json"):
        raise ApiError(415, f"the request body must be application/json, got {media_type or 'no content type'!r}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"the request body is {int(declared)} bytes; the limit is {max_bytes}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, f"the request body is larger than the limit of {max_bytes} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise ApiError(400, f"the request body is not JSON: {err}") from None
    try:
        check_json_depth(body)
    except RequestError as err:
        raise ApiError(400, err.message) from None
    return body


def parse_stream_flags(body: Mapping[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage), both checked to have the types the OpenAI API gives them."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be a boolean, got {type(stream).__name__}", "stream")
    options = body.get("stream_options")
    if options is None:
        return bool(stream), False
    if not isinstance(options, Mapping):
        raise ApiError(400, f"'stream_options' must be an object, got {type(options).__name__}", "stream_options")
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise ApiError(400, f"'stream_options.include_usage' must be a boolean, got {type(include_usage).__name__}",
                       "stream_options")
    return bool(stream), bool(stream) and bool(include_usage)


def _sse(data: Any) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


class ChatRequest:
    """A chat request that passed the checks made before a slot is taken: its body, decoding settings and
    streaming flags."""

    def __init__(self, body: dict[str, Any], params: Any, stream: bool, include_usage: bool):
        self.body = body
        self.params = params
        self.stream = stream
        self.include_usage = include_usage
        self.info: dict[str, Any] = {}  # filled while preparing: the image size


async def read_chat_request(server: ChatServer, request: Any) -> ChatRequest:
    """Step 1: read and check the body (size, type, JSON, model, decoding settings, stream flags); ApiError if not."""
    body = await read_json_body(request, server.max_body_bytes)
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != server.model_name:
        raise ApiError(404, f"model {model!r} not found; this server serves {server.model_name!r}", "model",
                       code="model_not_found")
    params = parse_sampling(body, server.limits)
    stream, include_usage = parse_stream_flags(body)
    return ChatRequest(body, params, stream, include_usage)


def busy_response(server: ChatServer):
    """Step 2 refused: every slot is taken (429 at once, never queued)."""
    return ApiError(429, f"the server is busy: {server.limiter.limit} requests are running; retry shortly",
                    type="server_busy", code="server_busy").response(headers={"Retry-After": "1"})


class ChatReply:
    """Step 4: the OpenAI-shaped answer of one started generation, whole or as server-sent events."""

    def __init__(self, server: ChatServer, chat: ChatRequest, generation: Any, steps: Any, prompt_tokens: int):
        self.server = server
        self.chat = chat
        self.generation = generation
        self.steps = steps
        self.prompt_tokens = prompt_tokens
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def usage(self, step: Any) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": step.num_tokens,
                "total_tokens": self.prompt_tokens + step.num_tokens}

    @staticmethod
    def finish_reason(step: Any) -> str:
        return "length" if step.finish_reason == "length" else "stop"

    def grounding(self, step: Any) -> tuple[str, list[dict[str, Any]]]:
        return self.server.grounding(step.text, self.chat.info.get("image_size"))

    async def last_step(self) -> Any:
        """The final step (intermediate ones are skipped); cancels the generation if the caller is cancelled."""
        try:
            while not (step := await self.steps.get()).finished:
                pass
        except BaseException:
            self.generation.cancel()
            raise
        return step

    async def completion(self) -> Any:
        """The whole answer (``stream`` false)."""
        step = await self.last_step()
        if step.error is not None:
            return ApiError(500, f"generation failed: {step.error}", type="server_error").response()
        clean, regions = self.grounding(step)
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.server.model_name,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": step.text, "regions": regions, "clean_text": clean},
                "finish_reason": self.finish_reason(step),
                "logprobs": None,
            }],
            "usage": self.usage(step),
        }

    def chunk(self, delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.server.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]}

    async def events(self):
        """The answer as server-sent events: the role, content deltas (held back while they could still grow into a
        stop string), then the regions and the finish reason, usage if asked, and ``[DONE]``."""
        from ferret.serve.inference import stable_prefix

        yield _sse(self.chunk({"role": "assistant", "content": ""}))
        sent = ""
        while True:
            step = await self.steps.get()
            if step.finished and step.error is not None:
                yield _sse({"error": {"message": f"generation failed: {step.error}", "type": "server_error",
                                      "param": None, "code": None}})
                break
            text = step.text if step.finished else stable_prefix(step.text, self.chat.params.stop)
            if text.startswith(sent) and len(text) > len(sent):
                yield _sse(self.chunk({"content": text[len(sent):]}))
                sent = text
            if step.finished:
                clean, regions = self.grounding(step)
                yield _sse(self.chunk({"regions": regions, "clean_text": clean}, self.finish_reason(step)))
                if self.chat.include_usage:
                    yield _sse({**self.chunk({}), "choices": [], "usage": self.usage(step)})
                break
        yield _sse("[DONE]")

    def streaming_response(self):
        from ferret.serve.http_utils import GuardedStreamingResponse

        return GuardedStreamingResponse(self.events(), self.generation.cancel, media_type="text/event-stream",
                                        headers={"Cache-Control": "no-cache"})


async def chat_completion(server: ChatServer, request: Any):
    """``POST /v1/chat/completions``: read the request, take a slot, start generating (the prompt is checked in
    the generation thread), then answer whole or as a stream."""
    from ferret.serve.inference import start_streaming

    try:
        chat = await read_chat_request(server, request)
    except ApiError as err:
        return err.response()
    slot = server.limiter.try_acquire()
    if slot is None:
        return busy_response(server)
    generation, steps, first = await start_streaming(server.model, server.processor,
                                                     lambda: server.prepare(chat.body, chat.info), chat.params, slot)
    if not first.ready:  # refused while preparing: the slot is already released
        return api_error_from(first.error or RuntimeError("generation ended early")).response()
    reply = ChatReply(server, chat, generation, steps, first.prompt_tokens or 0)
    return reply.streaming_response() if chat.stream else await reply.completion()


def create_app(server: ChatServer):
    # No `from __future__ import annotations` in this module: FastAPI reads the handlers' annotations, and
    # `Request` is imported here, not at module level.
    from fastapi import FastAPI, Request

    app = FastAPI(title="Ferret OpenAI-compatible API")
    app.state.server = server

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if request.url.path.startswith("/v1"):
            refused = server.check_auth(request.headers.get("authorization"))
            if refused is not None:
                return refused.response(headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id != server.model_name:
            return ApiError(404, f"model {model_id!r} not found; this server serves {server.model_name!r}",
                            "model", code="model_not_found").response()
        return server.model_card()

    @app.get("/health")
    async def health():
        return {"status": "ok", "in_flight": server.limiter.in_flight, "limit": server.limiter.limit}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await chat_completion(server, request)

    return app


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="OpenAI-compatible API server for a Ferret model.")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-base", default=None, help="base model of a LoRA or projector-only --model-path")
    parser.add_argument("--model-name", default=None,
                        help="the model id clients use (default: the checkpoint's config.json 'model_name', else the "
                             "folder's name, or its parent's for checkpoint/checkpoint-N/final-checkpoint folders)")
    parser.add_argument("--allowed-image-dir", default=None,
                        help="folder from which image file paths may be read (default: only data: URLs)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (loopback unless asked otherwise)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                        help=f"require 'Authorization: Bearer <key>' on /v1 (env {API_KEY_ENV}; default: none)")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps, cpu")
    parser.add_argument("--load-8bit", action="store_true")
    parser.add_argument("--load-4bit", action="store_true")
    parser.add_argument("--keep-aspect-ratio", action="store_true", help="pad images to a square instead of stretching")
    add_region_feature_argument(parser, default=None)
    parser.add_argument("--limit-model-concurrency", type=int, default=5)
    parser.add_argument("--max-new-tokens-limit", type=int, default=RequestLimits().max_new_tokens)
    parser.add_argument("--max-regions", type=int, default=RequestLimits().max_regions,
                        help="most region references (placeholders) one request may make; checked before any mask "
                             "is built")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="refuse larger request bodies (413) while reading them")
    parser.add_argument("--log-level", default="info")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from ferret.model.builder import load_pretrained_model, model_name_from_checkpoint

    model, processor = load_pretrained_model(args.model_path, args.model_base, load_8bit=args.load_8bit,
                                             load_4bit=args.load_4bit, device=args.device,
                                             image_aspect_ratio="pad" if args.keep_aspect_ratio else None)
    if args.allowed_image_dir and not os.path.isdir(args.allowed_image_dir):
        raise SystemExit(f"--allowed-image-dir {args.allowed_image_dir} is not a folder")
    server = ChatServer(
        model, processor, args.model_name or model_name_from_checkpoint(args.model_path),
        limit_model_concurrency=args.limit_model_concurrency, allowed_image_dir=args.allowed_image_dir,
        limits=RequestLimits(max_new_tokens=args.max_new_tokens_limit, max_regions=args.max_regions),
        region_feature=args.region_feature,
        api_key=args.api_key, max_body_bytes=args.max_body_bytes,
    )
    logger.info("Serving %s at http://%s:%d/v1 (region features %s, API key %s)", server.model_name, args.host,
                args.port, "on" if server.region_feature else "off", "required" if server.api_key else "not set")
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level=args.log_level.lower())


if __name__ == "__main__":
    main()
