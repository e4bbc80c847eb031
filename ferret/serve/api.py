"""An OpenAI-compatible HTTP server for one Ferret model: ``/v1/chat/completions`` (plain and streamed) and
``/v1/models``. Any OpenAI client works with it (``base_url="http://127.0.0.1:8000/v1"``, any api key).

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
are accepted and ignored: Ferret's own system prompt is part of its template.

Run::

    python -m ferret.serve.api --model-path ./checkpoints/ferret-7b --allowed-image-dir ./images --port 8000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlparse

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

from ferret.processing import PLACEHOLDER
from ferret.serve.http_utils import GuardedStreamingResponse
from ferret.serve.inference import (
    ConcurrencyLimiter,
    PromptTooLong,
    SamplingParams,
    Step,
    stable_prefix,
    start_streaming,
)
from ferret.serve.protocol import (
    RequestError,
    RequestLimits,
    decode_image,
    decode_image_bytes,
    grounded_to_dict,
    parse_region,
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

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def api_error_from(err: BaseException) -> ApiError:
    """The ApiError for an exception raised while preparing a request."""
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


def parse_sampling(body: Mapping[str, Any], limits: RequestLimits) -> SamplingParams:
    """temperature, top_p, max_tokens (or max_completion_tokens) and stop of a chat request."""
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
    n = body.get("n", 1)
    if n not in (1, None):
        raise ApiError(400, f"only n=1 is supported, got {n!r}", "n")
    if body.get("logprobs"):
        raise ApiError(400, "logprobs are not supported", "logprobs")
    if body.get("tools"):
        raise ApiError(400, "tools are not supported", "tools")
    return SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_tokens, stop=stops)


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
    """OpenAI messages -> (turns for FerretProcessor.encode, the image or None, regions per turn)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    turns: list[dict[str, str]] = []
    raw_regions: list[tuple[str, Any]] = []
    image: Image.Image | None = None
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise ApiError(400, f"{where} must be an object", "messages")
        role = message.get("role")
        if role in ("system", "developer"):
            logger.debug("ignoring %s message %d: Ferret's template has its own system prompt", role, i)
            continue
        if role not in ("user", "assistant"):
            raise ApiError(400, f"{where} has role {role!r}; expected user, assistant or system", "messages")
        content = message.get("content")
        texts: list[str] = []
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for k, part in enumerate(content):
                kind = part.get("type") if isinstance(part, Mapping) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind == "image_url" and role == "user":
                    if image is not None:
                        raise ApiError(400, f"{where}.content[{k}]: only one image per conversation is supported",
                                       "messages")
                    ref = part.get("image_url")
                    url = ref.get("url") if isinstance(ref, Mapping) else ref
                    image = load_image_reference(url, allowed_dir, limits, f"{where}.content[{k}]")
                else:
                    raise ApiError(400, f"{where}.content[{k}] has type {kind!r}; expected 'text' or (in a user "
                                   "message) 'image_url'", "messages")
        elif content is None and role == "assistant":
            pass
        else:
            raise ApiError(400, f"{where}.content must be a string or a list of parts", "messages")
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise ApiError(400, f"{where} is from {role!r} but {expected!r} was expected: after system messages, "
                           "messages must alternate user/assistant starting with user", "messages")
        turns.append({"from": "human" if role == "user" else "gpt", "value": "\n".join(texts)})
        raw_regions.append((where, message.get("regions")))
    if not turns:
        raise ApiError(400, "'messages' holds no user message", "messages")
    if len(turns) % 2 == 0:
        raise ApiError(400, "the last message must be from the user", "messages")

    regions: list[list[Any]] = []
    for (where, specs), turn in zip(raw_regions, turns, strict=True):
        if specs is None or (turn["from"] == "gpt" and "<region" not in turn["value"]):
            regions.append([])  # an assistant message echoed back with its grounded regions: nothing to refer to
            continue
        if not isinstance(specs, list):
            raise ApiError(400, f"{where}.regions must be a list", "messages")
        if specs and image is None:
            raise ApiError(400, f"{where}.regions given but the conversation has no image", "messages")
        if len(specs) > limits.max_regions:
            raise ApiError(400, f"{where} has {len(specs)} regions; at most {limits.max_regions}", "messages")
        for match in PLACEHOLDER.finditer(turn["value"]):
            if int(match.group(1)) >= len(specs):
                raise ApiError(400, f"{where}: {match.group(0)} refers to region {match.group(1)} but the message "
                               f"has {len(specs)} region(s)", "messages")
        width, height = image.size if image is not None else (0, 0)
        turn_regions = []
        for k, spec in enumerate(specs):
            try:
                turn_regions.append(parse_region(spec, k, (width, height)).to_region(width, height))
            except RequestError as err:
                raise ApiError(400, f"{where}: {err.message}", "messages") from err
            if f"<region{k}>" not in turn["value"] and f"<bbox_location{k}>" not in turn["value"]:
                raise ApiError(400, f"{where}: region {k} is not referred to; write <region{k}> in the text",
                               "messages")
        regions.append(turn_regions)
    return turns, image, regions


# ---------------------------------------------------------------------------------------------- server


class ChatServer:
    """The model, its processor and the serving limits behind the OpenAI-style endpoints."""

    def __init__(self, model: Any, processor: Any, model_name: str, *, limit_model_concurrency: int = 5,
                 allowed_image_dir: str | None = None, limits: RequestLimits = RequestLimits()):
        self.model = model
        self.processor = processor
        self.model_name = model_name
        self.limiter = ConcurrencyLimiter(limit_model_concurrency)
        self.allowed_image_dir = os.path.realpath(allowed_image_dir) if allowed_image_dir else None
        self.limits = limits
        self.created = int(time.time())

    def prepare(self, body: Mapping[str, Any], info: dict[str, Any]) -> dict[str, Any]:
        """Messages -> encoded sample (runs in the generation thread: images are decoded here)."""
        turns, image, regions = parse_messages(body.get("messages"), self.allowed_image_dir, self.limits)
        info["image_size"] = image.size if image is not None else None
        try:
            # A text-only chat has no regions (parse_messages refuses them), so its frame size is never used.
            size = None if image is not None else (1000, 1000)
            return self.processor.encode(turns, image, regions=regions, image_size=size, add_generation_prompt=True,
                                         truncate=False)
        except ValueError as err:
            raise ApiError(400, str(err), "messages") from err

    def grounding(self, text: str, image_size: tuple[int, int] | None) -> tuple[str, list[dict[str, Any]]]:
        if image_size is None:
            return text.strip(), []
        clean, grounded = self.processor.post_process(text, image_size)
        return clean, [grounded_to_dict(g) for g in grounded]

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "ferret"}


def _sse(data: Any) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


def create_app(server: ChatServer) -> FastAPI:
    app = FastAPI(title="Ferret OpenAI-compatible API")
    app.state.server = server

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
        try:
            body = await request.json()
        except ValueError as err:
            return ApiError(400, f"the request body is not JSON: {err}").response()
        if not isinstance(body, dict):
            return ApiError(400, "the request body must be a JSON object").response()
        model = body.get("model")
        if model is not None and model != server.model_name:
            return ApiError(404, f"model {model!r} not found; this server serves {server.model_name!r}", "model",
                            code="model_not_found").response()
        try:
            params = parse_sampling(body, server.limits)
        except ApiError as err:
            return err.response()
        stream = bool(body.get("stream"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False

        slot = server.limiter.try_acquire()
        if slot is None:
            return ApiError(429, f"the server is busy: {server.limiter.limit} requests are running; retry shortly",
                            type="server_busy", code="server_busy").response(headers={"Retry-After": "1"})
        info: dict[str, Any] = {}
        generation, steps, first = await start_streaming(server.model, server.processor,
                                                         lambda: server.prepare(body, info), params, slot)
        if not first.ready:
            return api_error_from(first.error or RuntimeError("generation ended early")).response()

        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        prompt_tokens = first.prompt_tokens or 0

        def usage(step: Step) -> dict[str, int]:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": step.num_tokens,
                    "total_tokens": prompt_tokens + step.num_tokens}

        def finish_reason(step: Step) -> str:
            return "length" if step.finish_reason == "length" else "stop"

        if not stream:
            try:
                while not (step := await steps.get()).finished:
                    pass
            except BaseException:
                generation.cancel()
                raise
            if step.error is not None:
                return ApiError(500, f"generation failed: {step.error}", type="server_error").response()
            clean, regions = server.grounding(step.text, info.get("image_size"))
            return {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": server.model_name,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": step.text, "regions": regions, "clean_text": clean},
                    "finish_reason": finish_reason(step),
                    "logprobs": None,
                }],
                "usage": usage(step),
            }

        def chunk(delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
            return {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                    "model": server.model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]}

        async def events():
            yield _sse(chunk({"role": "assistant", "content": ""}))
            sent = ""
            while True:
                step = await steps.get()
                if step.finished and step.error is not None:
                    yield _sse({"error": {"message": f"generation failed: {step.error}", "type": "server_error",
                                          "param": None, "code": None}})
                    break
                text = step.text if step.finished else stable_prefix(step.text, params.stop)
                if text.startswith(sent) and len(text) > len(sent):
                    yield _sse(chunk({"content": text[len(sent):]}))
                    sent = text
                if step.finished:
                    clean, regions = server.grounding(step.text, info.get("image_size"))
                    yield _sse(chunk({"regions": regions, "clean_text": clean}, finish_reason(step)))
                    if include_usage:
                        yield _sse({**chunk({}), "choices": [], "usage": usage(step)})
                    break
            yield _sse("[DONE]")

        return GuardedStreamingResponse(events(), generation.cancel, media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache"})

    return app


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="OpenAI-compatible API server for a Ferret model.")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-base", default=None, help="base model of a LoRA or projector-only --model-path")
    parser.add_argument("--model-name", default=None, help="the model id clients use (default: the folder name)")
    parser.add_argument("--allowed-image-dir", default=None,
                        help="folder from which image file paths may be read (default: only data: URLs)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (loopback unless asked otherwise)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps, cpu")
    parser.add_argument("--load-8bit", action="store_true")
    parser.add_argument("--load-4bit", action="store_true")
    parser.add_argument("--keep-aspect-ratio", action="store_true", help="pad images to a square instead of stretching")
    parser.add_argument("--limit-model-concurrency", type=int, default=5)
    parser.add_argument("--max-new-tokens-limit", type=int, default=RequestLimits().max_new_tokens)
    parser.add_argument("--log-level", default="info")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from ferret.model.builder import load_pretrained_model

    model, processor = load_pretrained_model(args.model_path, args.model_base, load_8bit=args.load_8bit,
                                             load_4bit=args.load_4bit, device=args.device)
    if args.keep_aspect_ratio:
        processor.image_aspect_ratio = "pad"
    if args.allowed_image_dir and not os.path.isdir(args.allowed_image_dir):
        raise SystemExit(f"--allowed-image-dir {args.allowed_image_dir} is not a folder")
    server = ChatServer(
        model, processor, args.model_name or os.path.basename(os.path.normpath(args.model_path)),
        limit_model_concurrency=args.limit_model_concurrency, allowed_image_dir=args.allowed_image_dir,
        limits=RequestLimits(max_new_tokens=args.max_new_tokens_limit),
    )
    logger.info("Serving %s at http://%s:%d/v1", server.model_name, args.host, args.port)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level=args.log_level.lower())


if __name__ == "__main__":
    main()
