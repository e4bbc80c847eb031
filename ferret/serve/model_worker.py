"""The model worker: serves one Ferret model over the original worker protocol (docs/compatibility.md §11.2).

Endpoints (POST, JSON):

    /worker_generate_stream   a generation request (ferret.serve.protocol): structured ``messages`` (the OpenAI
                              API's shape: text with ``<regionK>`` placeholders, per-message ``regions`` in pixels,
                              the image as an image_url data URL) plus temperature, top_p, max_new_tokens, stop; the
                              prompt and region masks are built by FerretProcessor.encode. The original's templated
                              ``prompt`` with base64 ``images`` and ``regions`` / dense ``region_masks`` is still
                              accepted. The answer is a stream of ``{"text": ..., "error_code": 0}`` messages, each
                              followed by ``\\0``, every ``stream_interval`` tokens; ``text`` is the output so far
                              (for a legacy ``prompt`` request, prompt + output, as the original). The last message
                              also carries ``finish_reason``, ``usage``, and, for a request with an image,
                              ``regions`` (the grounded boxes/points of the output in pixels of the image, via
                              FerretProcessor.post_process) and ``clean_text``.
                              A rejected request gets one JSON message ``{"text": why, "error_code": 4}`` with HTTP
                              400/413/422; a worker already running ``limit_model_concurrency`` requests answers
                              at once with HTTP 429 and ``error_code`` 5 (never queues, never hangs); with an API
                              key set, a request without ``Authorization: Bearer <key>`` gets 401.
    /worker_get_status        {"model_names": [name], "speed": 1, "queue_length": requests in flight, ...}

Region features are read when the checkpoint has a region sampler (``region_geo_sampler`` in its config);
``--no-region-feature`` / ``--region-feature`` override that, and a request may too (``"region_feature"``).
With a controller secret (``--register-secret`` or ``$FERRET_WORKER_SECRET``) the worker presents it when it
registers and sends heartbeats.

Differences from the original, on purpose (docs/compatibility.md §12): multimodality never depends on the model's
name (§12.11); top_p is honoured; a missing ``stop`` is fine; a prompt that does not fit is refused instead of
left-truncated through the ``<image>`` (§12.36); the concurrency slot is released when the generation thread ends,
also when the client disconnects or generation fails; heartbeats run in a daemon thread; any device (CUDA, MPS, CPU).

Run::

    python -m ferret.serve.model_worker --model-path ./checkpoints/ferret-7b --controller-address \\
        http://127.0.0.1:21001 --port 21002 --worker-address http://127.0.0.1:21002
"""

import argparse
import json
import logging
import os
import threading
import uuid
from contextlib import asynccontextmanager
from typing import Any

import httpx

from ferret.constants import WORKER_HEART_BEAT_INTERVAL
from ferret.flags import add_refused_flags, add_region_feature_argument

# Only light modules at the top: `--help` must not pay for torch, transformers or fastapi (they load on use).
from ferret.serve.protocol import (
    API_KEY_ENV,
    WORKER_SECRET_ENV,
    ErrorCode,
    RequestError,
    RequestLimits,
    encode_chunk,
    grounded_to_dict,
    parse_generate_request,
    resolve_region_feature,
)

logger = logging.getLogger(__name__)

DEFAULT_HTTP_TIMEOUT = 5.0  # seconds for register / heartbeat calls to the controller


def error_status(err: BaseException) -> tuple[int, str]:
    """(HTTP status, message) for a request that failed before generation started."""
    from ferret.serve.inference import PromptTooLong

    if isinstance(err, RequestError):
        return err.status, err.message
    if isinstance(err, PromptTooLong):
        return 400, str(err)
    if isinstance(err, ValueError):  # processor / regions rejected the input; they name what is wrong
        return 422, str(err)
    return 500, f"internal error: {err!r}"


class ModelWorker:
    """A loaded model plus its serving state: concurrency slots, registration and heartbeats.

    Args:
        model / processor: from ``ferret.model.builder.load_pretrained_model``.
        model_name: the name the controller routes on.
        worker_address: this worker's URL as the controller should call it.
        controller_address: the controller's URL; None works stand-alone.
        limit_model_concurrency: requests run at once; one more is refused with 429.
        stream_interval: send a message every this many tokens (and always at the end).
        register: register with the controller on start (``--no-register`` turns it off; heartbeats then start
            only once the controller knows the worker through some other way).
        heart_beat_interval: seconds between heartbeats.
        limits: request limits (image size, regions, max_new_tokens cap).
        region_feature: None reads region features when the checkpoint has a region sampler; True/False force it.
        api_key: when set, ``/worker_generate_stream`` requires ``Authorization: Bearer <api_key>``.
        controller_secret: presented to the controller (``Authorization: Bearer``) on register and heartbeat.
        max_body_bytes: larger request bodies are refused (413) while they are read.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        model_name: str,
        worker_address: str,
        controller_address: str | None = None,
        *,
        limit_model_concurrency: int = 5,
        stream_interval: int = 1,
        register: bool = True,
        heart_beat_interval: float = WORKER_HEART_BEAT_INTERVAL,
        limits: RequestLimits = RequestLimits(),
        http_timeout: float = DEFAULT_HTTP_TIMEOUT,
        region_feature: bool | None = None,
        api_key: str | None = None,
        controller_secret: str | None = None,
        max_body_bytes: int = 32 * 1024 * 1024,
    ):
        from ferret.serve.inference import ConcurrencyLimiter

        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {stream_interval}")
        self.model = model
        self.processor = processor
        self.model_name = model_name
        self.worker_address = worker_address.rstrip("/")
        self.controller_address = controller_address.rstrip("/") if controller_address else None
        self.worker_id = uuid.uuid4().hex[:6]
        self.limiter = ConcurrencyLimiter(limit_model_concurrency)
        self.stream_interval = stream_interval
        self.register = register
        self.heart_beat_interval = heart_beat_interval
        self.limits = limits
        self.http_timeout = http_timeout
        self.region_feature = resolve_region_feature(region_feature, getattr(model, "config", None))
        self.api_key = api_key or None
        self.controller_secret = controller_secret or None
        self.max_body_bytes = max_body_bytes
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: httpx.Client | None = None

    # ------------------------------------------------------------------ status and controller
    def status(self) -> dict[str, Any]:
        return {
            "model_names": [self.model_name],
            "speed": 1,
            "queue_length": self.limiter.in_flight,
            "limit_model_concurrency": self.limiter.limit,
            "context_length": self.processor.model_max_length,
            "image_aspect_ratio": self.processor.image_aspect_ratio,
            "region_feature": self.region_feature,
        }

    def register_to_controller(self) -> bool:
        if not self.controller_address:
            return False
        body = {"worker_name": self.worker_address, "check_heart_beat": True, "worker_status": self.status()}
        try:
            reply = self._http().post(f"{self.controller_address}/register_worker", json=body)
            reply.raise_for_status()
            registered = bool(reply.json().get("registered", False))
        except (httpx.HTTPError, ValueError) as err:
            logger.warning("Registering with %s failed: %s", self.controller_address, err)
            return False
        logger.info("Registered %s (%s) with %s: %s", self.worker_address, self.model_name,
                    self.controller_address, registered)
        return registered

    def send_heart_beat(self) -> bool | None:
        """One heartbeat; re-registers when the controller does not know this worker. None when unreachable."""
        if not self.controller_address:
            return None
        body = {"worker_name": self.worker_address, "queue_length": self.limiter.in_flight}
        try:
            reply = self._http().post(f"{self.controller_address}/receive_heart_beat", json=body)
            reply.raise_for_status()
            exist = bool(reply.json().get("exist", False))
        except (httpx.HTTPError, ValueError) as err:
            logger.warning("Heartbeat to %s failed: %s", self.controller_address, err)
            return None
        if not exist:
            logger.info("The controller does not know %s; registering again", self.worker_address)
            self.register_to_controller()
        return exist

    def beat_soon(self) -> None:
        """Ask the heartbeat thread for an early heartbeat (the queue length changed)."""
        self._wake.set()

    def _http(self) -> httpx.Client:
        if self._client is None:
            headers = {"Authorization": f"Bearer {self.controller_secret}"} if self.controller_secret else None
            self._client = httpx.Client(timeout=self.http_timeout, trust_env=False, headers=headers)
        return self._client

    def start(self) -> None:
        """Register (unless disabled) and start the daemon heartbeat thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._heart_beat_loop, name="worker-heart-beat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.http_timeout + 5)
            self._thread = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def _heart_beat_loop(self) -> None:
        if self.controller_address and self.register:
            self.register_to_controller()
        while not self._stop.is_set():
            self._wake.wait(self.heart_beat_interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            if self.controller_address and self.register:
                try:
                    self.send_heart_beat()
                except Exception:  # keep beating; one failure must not end the thread
                    logger.exception("Heartbeat failed")

    # ------------------------------------------------------------------ generation
    def prepare(self, payload: Any) -> tuple[dict[str, Any], Any, dict[str, Any]]:
        """Validate a payload and encode it. Returns (features, DecodingSettings, request info). Raises
        RequestError / ValueError naming what is wrong. Runs in the generation thread."""
        from ferret.decoding import DecodingSettings

        request = parse_generate_request(payload, self.limits)
        if request.chat is not None:
            features = self._encode_chat(request)
        else:
            features = self._encode_prompt(request)
        params = DecodingSettings(
            temperature=request.temperature,
            top_p=request.top_p,
            max_new_tokens=request.max_new_tokens,
            stop=(request.stop,) if request.stop else (),
        )
        return features, params, {"prompt": request.prompt or "", "image_size": request.image_size}

    def _encode_chat(self, request: Any) -> dict[str, Any]:
        """Structured messages -> model inputs, through FerretProcessor.encode (template, coordinates, masks)."""
        chat = request.chat
        region_feature = self.region_feature if request.region_feature is None else request.region_feature
        try:
            return self.processor.encode(chat.turns, chat.image, regions=chat.regions,
                                         image_size=None if chat.image is not None else (1000, 1000),
                                         add_generation_prompt=True, truncate=False, region_feature=region_feature)
        except ValueError as err:
            raise RequestError(str(err), 422) from err

    def _encode_prompt(self, request: Any) -> dict[str, Any]:
        """The original's request: a templated prompt with one mask per ``<region_fea>`` (a thin adapter)."""
        from ferret.processing import PromptTooLongError

        region_masks = []
        if request.regions:
            from ferret import regions as R

            width, height = request.image_size
            for spec, region in zip(request.regions, request.region_objects(), strict=True):
                try:
                    region_masks.append(R.region_mask(region, width, height))
                except ValueError as err:
                    raise RequestError(f"region {spec.index} ({spec.kind}): {err}", 422) from err
        image = request.images[0] if request.images else None
        try:
            return self.processor.encode_prompt(request.prompt, image, region_masks)
        except PromptTooLongError:  # longer than the context: refused, never truncated
            raise
        except ValueError as err:
            raise RequestError(str(err), 422) from err

    def final_message(self, step: Any, prompt: str, image_size: tuple[int, int] | None) -> dict[str, Any]:
        message: dict[str, Any] = {
            "text": prompt + step.text,
            "error_code": int(ErrorCode.OK),
            "finish_reason": step.finish_reason,
            "usage": {
                "prompt_tokens": step.prompt_tokens,
                "completion_tokens": step.num_tokens,
                "total_tokens": (step.prompt_tokens or 0) + step.num_tokens,
            },
        }
        if image_size is not None:
            clean, grounded = self.processor.post_process(step.text, image_size)
            message["clean_text"] = clean
            message["regions"] = [grounded_to_dict(g) for g in grounded]
        return message


def _error_response(text: str, status: int, code: ErrorCode, headers: dict[str, str] | None = None):
    from starlette.responses import Response

    # ASCII JSON: the text may quote the client's input, and a lone surrogate cannot be UTF-8 encoded
    return Response(json.dumps({"text": text, "error_code": int(code)}), status_code=status, headers=headers,
                    media_type="application/json")


def create_app(worker: ModelWorker):
    """The FastAPI app of ``worker``; registration and heartbeats run for the app's lifetime."""
    # This module has no `from __future__ import annotations`: FastAPI reads the handlers' annotations, and
    # `Request` is imported here, not at module level.
    from fastapi import FastAPI
    from starlette.requests import Request

    from ferret.serve.api import ApiError, bearer_matches, read_json_body
    from ferret.serve.http_utils import GuardedStreamingResponse
    from ferret.decoding import DecodingSettings
    from ferret.serve.inference import start_streaming

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="Ferret model worker", lifespan=lifespan)
    app.state.worker = worker

    # Handlers are async and never block: validation, encoding and generation run in the generation thread.
    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request):
        if worker.api_key is not None and not bearer_matches(request.headers.get("authorization"), worker.api_key):
            return _error_response("missing or incorrect API key: send 'Authorization: Bearer <key>'", 401,
                                   ErrorCode.BAD_REQUEST, headers={"WWW-Authenticate": "Bearer"})
        slot = worker.limiter.try_acquire()
        if slot is None:
            return _error_response(
                f"the worker is busy: {worker.limiter.limit} requests are running; retry shortly",
                429,
                ErrorCode.SERVER_BUSY,
                headers={"Retry-After": "1"},
            )
        try:
            payload = await read_json_body(request, worker.max_body_bytes)
        except ApiError as err:
            slot.release()
            return _error_response(err.message, err.status, ErrorCode.BAD_REQUEST)
        except BaseException:
            slot.release()
            raise
        worker.beat_soon()

        prepared: dict[str, Any] = {}

        def prepare():
            features, params, info = worker.prepare(payload)
            prepared.update(info)
            return features, params

        generation, steps, first = await start_streaming(worker.model, worker.processor, prepare, DecodingSettings(),
                                                         slot)
        if not first.ready:  # failed before generating: a clean 4xx
            status, text = error_status(first.error) if first.error is not None else (500, "generation ended early")
            return _error_response(text, status, ErrorCode.BAD_REQUEST if status < 500 else ErrorCode.WORKER_ERROR)

        prompt = prepared["prompt"]
        image_size = prepared.get("image_size")

        async def stream():
            sent = 0
            while True:
                step = await steps.get()
                if step.finished:
                    if step.error is not None:
                        yield encode_chunk({"text": f"generation failed: {step.error}", "error_code":
                                            int(ErrorCode.WORKER_ERROR)})
                    else:
                        yield encode_chunk(worker.final_message(step, prompt, image_size))
                    return
                if step.num_tokens - sent >= worker.stream_interval:
                    sent = step.num_tokens
                    yield encode_chunk({"text": prompt + step.text, "error_code": int(ErrorCode.OK)})

        def on_close() -> None:
            generation.cancel()
            worker.beat_soon()

        return GuardedStreamingResponse(stream(), on_close, media_type="application/octet-stream")

    @app.post("/worker_get_status")
    async def worker_get_status():
        return worker.status()

    return app


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Ferret model worker (serves one model to a controller).")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (loopback unless asked otherwise)")
    parser.add_argument("--port", type=int, default=21002)
    parser.add_argument("--worker-address", default=None, help="URL the controller uses (default http://HOST:PORT)")
    parser.add_argument("--controller-address", default="http://127.0.0.1:21001")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-base", default=None, help="base model of a LoRA or projector-only --model-path")
    parser.add_argument("--model-name", default=None,
                        help="name to serve under (default: the checkpoint's config.json 'model_name', else the "
                             "folder's name, or its parent's for checkpoint/checkpoint-N/final-checkpoint folders)")
    parser.add_argument("--keep-aspect-ratio", action="store_true",
                        help="pad images to a square instead of stretching them (image_aspect_ratio 'pad')")
    parser.add_argument("--limit-model-concurrency", type=int, default=5)
    parser.add_argument("--stream-interval", type=int, default=1)
    parser.add_argument("--no-register", action="store_true", help="do not register with the controller")
    parser.add_argument("--load-8bit", action="store_true")
    parser.add_argument("--load-4bit", action="store_true")
    add_region_feature_argument(parser, default=None)
    add_refused_flags(parser, "--multi-modal", "--num-gpus", takes_value=("--num-gpus",))
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                        help=f"require 'Authorization: Bearer <key>' on /worker_generate_stream (env {API_KEY_ENV})")
    parser.add_argument("--register-secret", default=os.environ.get(WORKER_SECRET_ENV) or None,
                        help=f"secret presented to the controller when registering (env {WORKER_SECRET_ENV})")
    parser.add_argument("--image_w", type=int, default=None, help="ignored: the checkpoint sets the image size")
    parser.add_argument("--image_h", type=int, default=None, help="ignored: the checkpoint sets the image size")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cuda:1, mps, cpu")
    parser.add_argument("--heart-beat-interval", type=float, default=WORKER_HEART_BEAT_INTERVAL,
                        help="seconds between heartbeats to the controller")
    parser.add_argument("--max-new-tokens-limit", type=int, default=RequestLimits().max_new_tokens,
                        help="largest max_new_tokens a request may ask for")
    parser.add_argument("--max-regions", type=int, default=RequestLimits().max_regions,
                        help="most region references (placeholders) one request may make; checked before any mask "
                             "is built")
    parser.add_argument("--log-level", default="info")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.image_w is not None or args.image_h is not None:
        logger.warning("--image_w/--image_h are ignored: the image size comes from the checkpoint's config")
    import uvicorn

    from ferret.model.builder import load_pretrained_model, model_name_from_checkpoint

    model_name = args.model_name or model_name_from_checkpoint(args.model_path)
    model, processor = load_pretrained_model(
        args.model_path, args.model_base, load_8bit=args.load_8bit, load_4bit=args.load_4bit, device=args.device,
        image_aspect_ratio="pad" if args.keep_aspect_ratio else None,
    )
    worker = ModelWorker(
        model,
        processor,
        model_name,
        args.worker_address or f"http://{args.host}:{args.port}",
        args.controller_address,
        limit_model_concurrency=args.limit_model_concurrency,
        stream_interval=args.stream_interval,
        register=not args.no_register,
        heart_beat_interval=args.heart_beat_interval,
        limits=RequestLimits(max_new_tokens=args.max_new_tokens_limit, max_regions=args.max_regions),
        region_feature=args.region_feature,
        api_key=args.api_key,
        controller_secret=args.register_secret,
    )
    logger.info("Serving %s on %s (device %s, %s images, region features %s)", model_name, worker.worker_address,
                model.device, processor.image_aspect_ratio, "on" if worker.region_feature else "off")
    uvicorn.run(create_app(worker), host=args.host, port=args.port, log_level=args.log_level.lower())


if __name__ == "__main__":
    main()
