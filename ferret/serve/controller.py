"""The controller: a registry of model workers that routes each request to one of them.

Workers register with their URL and status (model names, speed, queue length) and send heartbeats; a daemon
thread drops workers whose last heartbeat is older than the expiry. ``get_worker_address`` dispatches by
*lottery* (a random worker, chance proportional to its speed) or *shortest_queue* (the smallest
queue_length / speed, whose queue is then counted one longer until its next heartbeat). The controller can also
proxy ``/worker_generate_stream`` to the chosen worker, and reports the sum of its workers' status so that it can
stand in for a worker.

The logic lives in ``Controller`` (usable and testable without HTTP); ``create_app`` wraps it in FastAPI with the
original's endpoints, all POST with JSON bodies:

    /register_worker       {worker_name, check_heart_beat, worker_status?}  -> {"registered": bool}
    /refresh_all_workers   {}                                  -> {"workers": [names kept]}
    /list_models           {}                                  -> {"models": [...]}
    /get_worker_address    {model}                             -> {"address": url or ""}
    /receive_heart_beat    {worker_name, queue_length}         -> {"exist": bool}
    /worker_generate_stream  worker params (with "model")      -> the worker's \\0-framed JSON stream
    /worker_get_status     {}                                  -> {model_names, speed, queue_length}

``/worker_generate_stream`` answers with real HTTP statuses, each with one ``{"text", "error_code"}`` JSON body:
503 (code 2) when no worker serves the model, the worker's own 4xx when it refuses the request (429 with
``Retry-After`` when it is busy, 401 for a missing API key, which the controller forwards), 502 (code 3) when the
worker cannot be reached and 504 (code 3) when it does not start answering within ``first_token_timeout``. A worker
that cannot be reached, misses the first-token deadline or stalls longer than ``stream_timeout`` between two
messages is taken out of rotation at once (it comes back by registering again, which a live worker does on its
next heartbeat). With a ``register_secret`` (``--register-secret`` or ``$FERRET_WORKER_SECRET``),
``/register_worker`` and ``/receive_heart_beat`` answer 401 unless the caller sends ``Authorization: Bearer
<secret>``: nobody else can put a worker into rotation.

Run::

    python -m ferret.serve.controller --host 127.0.0.1 --port 21001 --dispatch-method shortest_queue
"""

import argparse
import hmac
import json
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING, Any

# httpx, pydantic, starlette and fastapi are imported where they are used, so that the controller starts (and
# answers --help) fast. No `from __future__ import annotations` here: FastAPI reads the handlers' annotations.

from ferret.constants import CONTROLLER_HEART_BEAT_EXPIRATION
from ferret.serve.protocol import WORKER_SECRET_ENV, ErrorCode, StreamDecoder, encode_chunk, error_chunk

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)

DEFAULT_WORKER_TIMEOUT = 5.0  # seconds to connect to a worker or fetch its status (the original's 5 s)
DEFAULT_FIRST_TOKEN_TIMEOUT = 60.0  # seconds from a request to the worker's first message (a CPU prefill is slow)
DEFAULT_STREAM_TIMEOUT = 20.0  # seconds a worker may stay silent between two messages of a stream


class DispatchMethod(str, Enum):
    LOTTERY = "lottery"
    SHORTEST_QUEUE = "shortest_queue"


@dataclass
class WorkerInfo:
    model_names: list[str]
    speed: float
    queue_length: int
    check_heart_beat: bool
    last_heart_beat: float


StatusFetcher = Callable[[str], "dict[str, Any] | None"]


def _valid_status(status: Any) -> dict[str, Any] | None:
    """``status`` normalised to {model_names: [str], speed: float > 0, queue_length: int >= 0}, or None."""
    if not isinstance(status, Mapping):
        return None
    names = status.get("model_names")
    speed = status.get("speed", 1)
    queue_length = status.get("queue_length", 0)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not speed > 0:
        return None
    if isinstance(queue_length, bool) or not isinstance(queue_length, int) or queue_length < 0:
        return None
    return {"model_names": list(names), "speed": float(speed), "queue_length": queue_length}


class Controller:
    """Worker registry and dispatcher. Thread-safe: HTTP handlers and the heartbeat thread share it.

    Args:
        dispatch_method: "lottery" or "shortest_queue".
        heart_beat_expiration: seconds without a heartbeat after which a worker is dropped.
        heart_beat_check_interval: seconds between expiry checks (default: a third of the expiration).
        worker_timeout: seconds to connect to a worker / fetch its status.
        stream_timeout: seconds a proxied stream may stay silent between two messages.
        first_token_timeout: seconds from a proxied request to the worker's first message.
        register_secret: when set, registration and heartbeats must present it (see ``secret_matches``).
        rng: random source for the lottery (seed it for reproducible dispatch).
        clock: monotonic time source (tests can pass a fake one).
        status_fetcher: ``worker_name -> status dict or None``; by default POSTs ``<worker>/worker_get_status``.
    """

    def __init__(
        self,
        dispatch_method: DispatchMethod | str = DispatchMethod.SHORTEST_QUEUE,
        heart_beat_expiration: float = CONTROLLER_HEART_BEAT_EXPIRATION,
        heart_beat_check_interval: float | None = None,
        worker_timeout: float = DEFAULT_WORKER_TIMEOUT,
        stream_timeout: float = DEFAULT_STREAM_TIMEOUT,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        status_fetcher: StatusFetcher | None = None,
        first_token_timeout: float = DEFAULT_FIRST_TOKEN_TIMEOUT,
        register_secret: str | None = None,
    ):
        if first_token_timeout <= 0 or stream_timeout <= 0:
            raise ValueError(f"timeouts must be > 0, got first_token_timeout={first_token_timeout}, "
                             f"stream_timeout={stream_timeout}")
        self.dispatch_method = DispatchMethod(dispatch_method)
        if heart_beat_expiration <= 0:
            raise ValueError(f"heart_beat_expiration must be > 0, got {heart_beat_expiration}")
        self.heart_beat_expiration = heart_beat_expiration
        self.heart_beat_check_interval = heart_beat_check_interval or heart_beat_expiration / 3
        self.worker_timeout = worker_timeout
        self.stream_timeout = stream_timeout
        self.first_token_timeout = first_token_timeout
        self.register_secret = register_secret or None
        self.rng = rng or random.Random()
        self.clock = clock
        self._fetch_status = status_fetcher or self._http_worker_status
        self._workers: dict[str, WorkerInfo] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: "httpx.Client | None" = None

    # ------------------------------------------------------------------ registry

    def register_worker(
        self, worker_name: str, check_heart_beat: bool = True, worker_status: Mapping[str, Any] | None = None
    ) -> bool:
        """Add or update a worker. Without ``worker_status`` it is fetched from the worker; False if that fails."""
        if worker_status is None:
            worker_status = self._fetch_status(worker_name)
        status = _valid_status(worker_status)
        if status is None:
            logger.warning("Not registering %s: no valid status (got %r)", worker_name, worker_status)
            return False
        with self._lock:
            known = worker_name in self._workers
            self._workers[worker_name] = WorkerInfo(
                model_names=status["model_names"],
                speed=status["speed"],
                queue_length=status["queue_length"],
                check_heart_beat=bool(check_heart_beat),
                last_heart_beat=self.clock(),
            )
        logger.info("%s worker %s serving %s", "Updated" if known else "Registered", worker_name, status["model_names"])
        return True

    def remove_worker(self, worker_name: str) -> bool:
        with self._lock:
            return self._workers.pop(worker_name, None) is not None

    def workers(self) -> dict[str, WorkerInfo]:
        """A snapshot copy of the registry."""
        with self._lock:
            return {name: replace(info, model_names=list(info.model_names)) for name, info in self._workers.items()}

    def refresh_all_workers(self) -> list[str]:
        """Re-register every known worker from its live status; drop those that do not answer. Returns the kept."""
        kept = []
        for name, info in self.workers().items():
            if self.register_worker(name, info.check_heart_beat, None):
                kept.append(name)
            else:
                self.remove_worker(name)
                logger.info("Removed worker %s: it did not answer a status request", name)
        return kept

    def list_models(self) -> list[str]:
        with self._lock:
            return sorted({name for info in self._workers.values() for name in info.model_names})

    def receive_heart_beat(self, worker_name: str, queue_length: int) -> bool:
        """Record a heartbeat; False tells the worker it is unknown here (and should register again)."""
        with self._lock:
            info = self._workers.get(worker_name)
            if info is None:
                logger.info("Heartbeat from unknown worker %s", worker_name)
                return False
            info.queue_length = queue_length
            info.last_heart_beat = self.clock()
            return True

    def remove_stale_workers(self) -> list[str]:
        """Drop workers (with check_heart_beat) whose last heartbeat is older than the expiration."""
        deadline = self.clock() - self.heart_beat_expiration
        with self._lock:
            stale = [n for n, w in self._workers.items() if w.check_heart_beat and w.last_heart_beat < deadline]
            for name in stale:
                del self._workers[name]
        for name in stale:
            logger.info("Removed worker %s: no heartbeat for %.1f s", name, self.heart_beat_expiration)
        return stale

    # ------------------------------------------------------------------ dispatch

    def get_worker_address(self, model: str) -> str:
        """URL of a worker serving ``model`` chosen by the dispatch method, or "" when there is none."""
        with self._lock:
            candidates = [(n, w) for n, w in self._workers.items() if model in w.model_names]
            if not candidates:
                return ""
            if self.dispatch_method is DispatchMethod.LOTTERY:
                names = [n for n, _ in candidates]
                return self.rng.choices(names, weights=[w.speed for _, w in candidates])[0]
            # min() keeps the first of equal loads, i.e. registration order
            name, info = min(candidates, key=lambda item: item[1].queue_length / item[1].speed)
            info.queue_length += 1
            return name

    def worker_api_get_status(self) -> dict[str, Any]:
        """The sum of the live status of all workers, in the worker's status format."""
        model_names: set[str] = set()
        speed = 0.0
        queue_length = 0
        for name in self.workers():
            status = _valid_status(self._fetch_status(name))
            if status is None:
                continue
            model_names.update(status["model_names"])
            speed += status["speed"]
            queue_length += status["queue_length"]
        return {"model_names": sorted(model_names), "speed": speed, "queue_length": queue_length}

    def secret_matches(self, authorization: str | None) -> bool:
        """Whether a registration / heartbeat may proceed: always without a secret, else only with
        ``Authorization: Bearer <secret>`` (constant-time comparison)."""
        if self.register_secret is None:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("utf-8", "replace"),
                                                                  self.register_secret.encode("utf-8"))

    def mark_unhealthy(self, worker_name: str, why: str) -> None:
        """Take a worker out of rotation at once; it returns when it registers again."""
        if self.remove_worker(worker_name):
            logger.warning("Worker %s taken out of rotation: %s", worker_name, why)

    def open_stream(self, params: Mapping[str, Any], headers: Mapping[str, str] | None = None
                    ) -> "ProxyError | ProxyStream":
        """Send a generation request to a worker and wait for its first message (at most
        ``first_token_timeout``). Returns the stream, or the ProxyError to answer with (see the module docstring)."""
        model = params.get("model")
        address = self.get_worker_address(model) if isinstance(model, str) else ""
        if not address:
            logger.info("No worker for model %r", model)
            return ProxyError(503, ErrorCode.NO_WORKER, f"no worker serves model {model!r}", {"Retry-After": "5"})
        import httpx

        deadline = time.monotonic() + self.first_token_timeout
        upstream = _Upstream(self.client, f"{address.rstrip('/')}/worker_generate_stream", dict(params),
                             dict(headers or {}),
                             httpx.Timeout(max(self.first_token_timeout, self.stream_timeout) + 1,
                                           connect=self.worker_timeout))

        def timed_out(what: str) -> ProxyError:
            upstream.close()
            self.mark_unhealthy(address, what)
            return ProxyError(504, ErrorCode.WORKER_UNREACHABLE, f"worker {address} {what}")

        try:
            kind, value = upstream.get(deadline - time.monotonic())
        except queue.Empty:
            return timed_out(f"sent no answer within the first-token timeout of {self.first_token_timeout:g} s")
        if kind == "error":
            upstream.close()
            self.mark_unhealthy(address, f"unreachable ({value!r})")
            return ProxyError(502, ErrorCode.WORKER_UNREACHABLE, f"worker {address} unreachable: {value!r}")
        status, reply_headers = value
        if status != 200:
            try:
                kind, body = upstream.get(max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                return timed_out("sent an error status but no body within the first-token timeout")
            upstream.close()
            forwarded = {k: v for k, v in reply_headers.items() if k.lower() in ("retry-after", "www-authenticate")}
            return _error_from_body(body if kind == "body" else b"", status, address, forwarded)
        decoder = StreamDecoder()
        first: list[dict[str, Any]] = []
        while not first:
            try:
                kind, value = upstream.get(deadline - time.monotonic())
            except queue.Empty:
                return timed_out(f"sent no message within the first-token timeout of {self.first_token_timeout:g} s")
            if kind == "data":
                try:
                    first = decoder.feed(value)
                except ValueError as err:
                    upstream.close()
                    return ProxyError(502, ErrorCode.WORKER_ERROR, f"worker {address} sent a malformed stream: {err}")
            else:
                upstream.close()
                self.mark_unhealthy(address, "ended its stream before the first message")
                return ProxyError(502, ErrorCode.WORKER_UNREACHABLE,
                                  f"worker {address} ended its stream without a message"
                                  + (f": {value!r}" if kind == "error" else ""))
        return ProxyStream(self, address, upstream, decoder, first)

    def worker_api_generate_stream(self, params: Mapping[str, Any],
                                   headers: Mapping[str, str] | None = None) -> Iterator[bytes]:
        """The proxied stream as \\0-framed chunks, a refusal as one error chunk (for in-process callers)."""
        opened = self.open_stream(params, headers)
        if isinstance(opened, ProxyError):
            yield error_chunk(opened.text, opened.code)
            return
        yield from opened.chunks()

    # ------------------------------------------------------------------ plumbing

    @property
    def client(self) -> "httpx.Client":
        import httpx

        with self._lock:
            if self._client is None:
                # trust_env=False: a proxy set in the environment must not intercept calls to local workers
                self._client = httpx.Client(timeout=self.worker_timeout, trust_env=False)
            return self._client

    def _http_worker_status(self, worker_name: str) -> dict[str, Any] | None:
        import httpx

        url = f"{worker_name.rstrip('/')}/worker_get_status"
        try:
            response = self.client.post(url, json={}, timeout=self.worker_timeout)
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError) as err:
            logger.warning("Status request to %s failed: %s", worker_name, err)
            return None

    def start(self) -> None:
        """Start the daemon thread that drops expired workers (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._heart_beat_loop, name="controller-heart-beat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the heartbeat thread and close the HTTP client."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heart_beat_check_interval + 5)
            self._thread = None
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def _heart_beat_loop(self) -> None:
        while not self._stop.wait(self.heart_beat_check_interval):
            try:
                self.remove_stale_workers()
            except Exception:  # keep checking; one bad pass must not end expiry for good
                logger.exception("Heartbeat check failed")

    def __enter__(self) -> "Controller":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class ProxyError:
    """A proxied request's refusal: the HTTP status, the streamed error code and the message."""

    status: int
    code: int
    text: str
    headers: dict[str, str] | None = None

    def body(self) -> bytes:
        # ASCII JSON: the text may quote the client's input, and a lone surrogate cannot be UTF-8 encoded
        return json.dumps({"text": self.text, "error_code": int(self.code)}).encode("ascii")


def _error_from_body(body: bytes, status: int, address: str, headers: dict[str, str]) -> ProxyError:
    """A worker's non-200 answer as a ProxyError with the same status: its own message when it sent one."""
    try:
        messages = StreamDecoder().feed(body.rstrip(b"\0") + b"\0")
    except ValueError:
        messages = []
    first = messages[0] if messages else None
    if first is not None and isinstance(first.get("text"), str) and isinstance(first.get("error_code"), int):
        return ProxyError(status, first["error_code"], first["text"], headers or None)
    detail = first.get("detail", first) if first is not None else body[:200].decode("utf-8", "replace")
    return ProxyError(status, ErrorCode.WORKER_ERROR, f"worker {address} answered HTTP {status}: {detail}",
                      headers or None)


class _Upstream:
    """A request to a worker read by a daemon thread into a queue, so that the proxy waits with deadlines of its
    own (time to first message, silence between messages) whatever the socket does. Items: ("status", (code,
    headers)), then ("body", bytes) for an error status or ("data", bytes)... ("end", None); ("error", exc)."""

    def __init__(self, client: "httpx.Client", url: str, params: dict[str, Any], headers: dict[str, str],
                 timeout: "httpx.Timeout"):
        self._items: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(client, url, params, headers, timeout),
                                        name="controller-proxy", daemon=True)
        self._thread.start()

    def _run(self, client, url, params, headers, timeout) -> None:
        try:
            with client.stream("POST", url, json=params, headers=headers, timeout=timeout) as response:
                self._items.put(("status", (response.status_code, dict(response.headers))))
                if response.status_code != 200:
                    self._items.put(("body", response.read()))
                    return
                for raw in response.iter_bytes():
                    if self._closed.is_set():
                        return
                    self._items.put(("data", raw))
            self._items.put(("end", None))
        except Exception as err:  # noqa: BLE001 - handed to the consumer, which answers for it
            self._items.put(("error", err))

    def get(self, timeout: float) -> tuple[str, Any]:
        """The next item; raises queue.Empty after ``timeout`` seconds."""
        return self._items.get(timeout=max(timeout, 0.0))

    def close(self) -> None:
        """Stop forwarding; the reader thread ends at its next chunk or at the HTTP read timeout."""
        self._closed.set()


class ProxyStream:
    """An opened proxied stream: the first messages, then the rest, each within ``stream_timeout``."""

    def __init__(self, controller: Controller, address: str, upstream: _Upstream, decoder: StreamDecoder,
                 first: list[dict[str, Any]]):
        self.controller = controller
        self.address = address
        self._upstream = upstream
        self._decoder = decoder
        self._pending = first

    def chunks(self) -> Iterator[bytes]:
        """The worker's messages re-framed one per chunk; a stall, a break or a malformed message ends the stream
        with one error message (and a stall takes the worker out of rotation)."""
        timeout = self.controller.stream_timeout
        try:
            for message in self._pending:
                yield encode_chunk(message)
            while True:
                try:
                    kind, value = self._upstream.get(timeout)
                except queue.Empty:
                    self.controller.mark_unhealthy(self.address, f"silent for more than {timeout:g} s mid-stream")
                    yield error_chunk(f"worker {self.address} timed out: no message for {timeout:g} s",
                                      ErrorCode.WORKER_UNREACHABLE)
                    return
                if kind == "end":
                    for message in self._decoder.close():
                        yield encode_chunk(message)
                    return
                if kind == "error":
                    logger.warning("Worker %s broke its stream: %s", self.address, value)
                    yield error_chunk(f"worker {self.address} unreachable or timed out: {value!r}",
                                      ErrorCode.WORKER_UNREACHABLE)
                    return
                for message in self._decoder.feed(value):
                    yield encode_chunk(message)
        except ValueError as err:  # malformed message from the worker
            logger.warning("Worker %s sent a malformed stream: %s", self.address, err)
            yield error_chunk(f"worker {self.address} sent a malformed stream: {err}", ErrorCode.WORKER_ERROR)
        finally:
            self._upstream.close()


# ---------------------------------------------------------------------------------------------------- HTTP


def create_app(controller: Controller, max_body_bytes: int = 32 * 1024 * 1024):
    """The FastAPI app serving ``controller``; its heartbeat thread runs for the app's lifetime."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import StreamingResponse
    from pydantic import BaseModel, Field
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import Response

    from ferret.serve.api import ApiError, read_json_body

    class WorkerStatusModel(BaseModel):
        model_names: list[str]
        speed: float = Field(default=1.0, gt=0)
        queue_length: int = Field(default=0, ge=0)

    class RegisterWorkerRequest(BaseModel):
        worker_name: str
        check_heart_beat: bool = True
        worker_status: WorkerStatusModel | None = None

    class HeartBeatRequest(BaseModel):
        worker_name: str
        queue_length: int = Field(default=0, ge=0)

    class WorkerAddressRequest(BaseModel):
        model: str

    def require_secret(request: Request) -> None:
        if not controller.secret_matches(request.headers.get("authorization")):
            raise HTTPException(401, "this controller requires the workers' secret: send "
                                "'Authorization: Bearer <secret>' (--register-secret / $FERRET_WORKER_SECRET)",
                                headers={"WWW-Authenticate": "Bearer"})

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        controller.start()
        try:
            yield
        finally:
            controller.stop()

    app = FastAPI(title="Ferret controller", lifespan=lifespan)
    app.state.controller = controller

    # Handlers that may call workers are plain `def`: FastAPI runs them in its thread pool.
    @app.post("/register_worker")
    def register_worker(request: RegisterWorkerRequest, http: Request):
        require_secret(http)
        status = request.worker_status.model_dump() if request.worker_status is not None else None
        return {"registered": controller.register_worker(request.worker_name, request.check_heart_beat, status)}

    @app.post("/refresh_all_workers")
    def refresh_all_workers():
        return {"workers": controller.refresh_all_workers()}

    @app.post("/list_models")
    def list_models():
        return {"models": controller.list_models()}

    @app.post("/get_worker_address")
    def get_worker_address(request: WorkerAddressRequest):
        return {"address": controller.get_worker_address(request.model)}

    @app.post("/receive_heart_beat")
    def receive_heart_beat(request: HeartBeatRequest, http: Request):
        require_secret(http)
        return {"exist": controller.receive_heart_beat(request.worker_name, request.queue_length)}

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request):
        try:
            params = await read_json_body(request, max_body_bytes)
            if not isinstance(params, dict):
                raise ApiError(400, "the request body must be a JSON object")
        except ApiError as err:
            refused = ProxyError(err.status, ErrorCode.BAD_REQUEST, err.message)
            return Response(refused.body(), status_code=refused.status, media_type="application/json")
        forward = {"Authorization": request.headers["authorization"]} if "authorization" in request.headers else {}
        opened = await run_in_threadpool(controller.open_stream, params, forward)
        if isinstance(opened, ProxyError):
            return Response(opened.body(), status_code=opened.status, headers=opened.headers,
                            media_type="application/json")
        return StreamingResponse(opened.chunks(), media_type="application/octet-stream")

    @app.post("/worker_get_status")
    def worker_get_status():
        return controller.worker_api_get_status()

    return app


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Ferret controller: routes requests to model workers.")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (loopback unless asked otherwise)")
    parser.add_argument("--port", type=int, default=21001)
    parser.add_argument(
        "--dispatch-method", choices=[m.value for m in DispatchMethod], default=DispatchMethod.SHORTEST_QUEUE.value
    )
    parser.add_argument(
        "--heart-beat-expiration",
        type=float,
        default=CONTROLLER_HEART_BEAT_EXPIRATION,
        help="drop a worker after this many seconds without a heartbeat",
    )
    parser.add_argument(
        "--heart-beat-check-interval", type=float, default=None, help="seconds between checks (default: expiration/3)"
    )
    parser.add_argument("--worker-timeout", type=float, default=DEFAULT_WORKER_TIMEOUT)
    parser.add_argument("--first-token-timeout", type=float, default=DEFAULT_FIRST_TOKEN_TIMEOUT,
                        help="seconds from a proxied request to the worker's first message; a worker that misses "
                             "it is taken out of rotation")
    parser.add_argument("--stream-timeout", type=float, default=DEFAULT_STREAM_TIMEOUT,
                        help="seconds a worker may stay silent between two messages of a stream (then out of "
                             "rotation)")
    parser.add_argument("--register-secret", default=os.environ.get(WORKER_SECRET_ENV) or None,
                        help=f"workers must present this secret to register (env {WORKER_SECRET_ENV})")
    parser.add_argument("--log-level", default="info")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    controller = Controller(
        dispatch_method=args.dispatch_method,
        heart_beat_expiration=args.heart_beat_expiration,
        heart_beat_check_interval=args.heart_beat_check_interval,
        worker_timeout=args.worker_timeout,
        stream_timeout=args.stream_timeout,
        first_token_timeout=args.first_token_timeout,
        register_secret=args.register_secret,
    )
    logger.info("Controller on %s:%d, dispatch %s, registration %s", args.host, args.port,
                controller.dispatch_method.value, "needs the secret" if controller.register_secret else "open")
    uvicorn.run(create_app(controller), host=args.host, port=args.port, log_level=args.log_level.lower())


if __name__ == "__main__":
    main()
