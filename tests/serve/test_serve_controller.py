"""Controller: registry, heartbeat expiry, dispatch, every HTTP endpoint, and the stream proxy against a fake
worker on 127.0.0.1. All traffic stays on loopback; every wait is bounded; threads stop on their own."""

import asyncio
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

uvicorn = pytest.importorskip("uvicorn")
fastapi = pytest.importorskip("fastapi")
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from ferret.serve.controller import Controller, WorkerInfo, build_arg_parser, create_app  # noqa: E402
from ferret.serve.protocol import ErrorCode, encode_chunk, iter_messages  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def status(*names, speed=1.0, queue_length=0):
    return {"model_names": list(names), "speed": speed, "queue_length": queue_length}


# ----------------------------------------------------------------------------------------- loopback servers


class LoopbackServer:
    """A uvicorn server for ``app`` on 127.0.0.1 with an ephemeral port, in a daemon thread."""

    def __init__(self, app, lifespan: str = "auto"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan=lifespan, timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "loopback server did not start within 10 s"
            assert self.thread.is_alive(), "loopback server thread died"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=5)
        self.sock.close()
        assert not self.thread.is_alive()


def fake_worker_app():
    """A worker that streams \\0-framed JSON; the request's "mode" picks its behaviour."""
    app = fastapi.FastAPI()

    @app.post("/worker_get_status")
    async def worker_get_status():
        return status("fake-model", speed=2.0, queue_length=1)

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(params: dict, request: fastapi.Request):
        mode = params.get("mode", "normal")
        if mode == "reject":
            return JSONResponse({"text": "region 0 (box) lies outside the image", "error_code": 4}, status_code=422)
        if mode == "busy":
            return JSONResponse({"text": "busy", "error_code": 5}, status_code=429, headers={"Retry-After": "1"})
        if mode == "frozen":
            await asyncio.sleep(3)  # connected, but no answer: what a stopped process looks like to a client
        if mode == "auth":
            auth = request.headers.get("authorization", "")
            return StreamingResponse(iter([encode_chunk({"text": auth, "error_code": 0})]))

        async def frames():
            if mode == "slow":
                yield encode_chunk({"text": "first", "error_code": 0})
                await asyncio.sleep(1.5)
                yield encode_chunk({"text": "too late", "error_code": 0})
                return
            # split frames across chunk boundaries and pack two in one chunk: the proxy must re-frame them
            data = b"".join(encode_chunk({"text": params["prompt"] + " é" * i, "error_code": 0}) for i in range(1, 4))
            yield data[:7]
            yield data[7:40]
            yield data[40:]

        return StreamingResponse(frames(), media_type="application/octet-stream")

    return app


@pytest.fixture(scope="module")
def fake_worker():
    with LoopbackServer(fake_worker_app()) as server:
        yield server


def closed_port_url() -> str:
    """A loopback URL nobody listens on (connection refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# ----------------------------------------------------------------------------------------- Controller class


def test_register_list_and_status_fetch():
    fetched = []

    def fetcher(name):
        fetched.append(name)
        return status("m-b", "m-c") if name == "http://w2" else None

    controller = Controller(status_fetcher=fetcher, clock=FakeClock(5.0))
    assert controller.register_worker("http://w1", True, status("m-a", speed=3))
    assert controller.register_worker("http://w2", True)  # status fetched from the worker
    assert not controller.register_worker("http://w3", True)  # worker did not answer
    assert not controller.register_worker("http://w4", True, {"model_names": ["x"], "speed": 0})  # invalid speed
    assert fetched == ["http://w2", "http://w3"]
    assert controller.list_models() == ["m-a", "m-b", "m-c"]
    assert controller.workers() == {
        "http://w1": WorkerInfo(["m-a"], 3.0, 0, True, 5.0),
        "http://w2": WorkerInfo(["m-b", "m-c"], 1.0, 0, True, 5.0),
    }


def test_heart_beat_updates_queue_and_unknown_worker_is_told():
    clock = FakeClock(0.0)
    controller = Controller(clock=clock, status_fetcher=lambda name: None)
    controller.register_worker("http://w1", True, status("m"))
    clock.now = 7.0
    assert controller.receive_heart_beat("http://w1", 4) is True
    assert controller.receive_heart_beat("http://nobody", 1) is False
    info = controller.workers()["http://w1"]
    assert (info.queue_length, info.last_heart_beat) == (4, 7.0)


def test_expiry_with_fake_clock():
    clock = FakeClock(0.0)
    controller = Controller(heart_beat_expiration=30, clock=clock, status_fetcher=lambda name: None)
    controller.register_worker("http://silent", True, status("m"))
    controller.register_worker("http://beating", True, status("m"))
    controller.register_worker("http://unchecked", False, status("m"))
    clock.now = 20.0
    controller.receive_heart_beat("http://beating", 0)
    clock.now = 29.0
    assert controller.remove_stale_workers() == []
    clock.now = 31.0
    assert controller.remove_stale_workers() == ["http://silent"]
    clock.now = 1000.0
    assert controller.remove_stale_workers() == ["http://beating"]
    assert list(controller.workers()) == ["http://unchecked"]


def test_expiry_thread_removes_worker_within_expiry():
    expiration, interval = 0.6, 0.1
    controller = Controller(heart_beat_expiration=expiration, heart_beat_check_interval=interval)
    with controller:
        controller.register_worker("http://w1", True, status("m"))
        start = time.monotonic()
        while controller.workers() and time.monotonic() - start < 5:
            time.sleep(0.02)
        elapsed = time.monotonic() - start
        assert controller.workers() == {}
        assert expiration - 0.05 <= elapsed <= expiration + interval + 0.5
        thread = controller._thread
        assert thread.daemon
    assert not thread.is_alive()  # stop() ended it


def test_lottery_proportional_to_speed_and_seeded():
    def draws(seed, n):
        controller = Controller("lottery", rng=random.Random(seed), status_fetcher=lambda name: None)
        controller.register_worker("http://slow", True, status("m", speed=1))
        controller.register_worker("http://fast", True, status("m", speed=3))
        controller.register_worker("http://other", True, status("other", speed=100))
        return [controller.get_worker_address("m") for _ in range(n)]

    picks = draws(0, 4000)
    share_fast = picks.count("http://fast") / len(picks)
    assert set(picks) == {"http://slow", "http://fast"}
    assert 0.72 < share_fast < 0.78  # expected 0.75; 4000 draws give a std of ~0.007
    assert draws(0, 50) == picks[:50]  # same seed, same dispatch
    controller = Controller("lottery", rng=random.Random(0))
    assert controller.get_worker_address("m") == ""


def test_shortest_queue_picks_least_loaded_and_increments():
    controller = Controller("shortest_queue", status_fetcher=lambda name: None)
    controller.register_worker("http://a", True, status("m", speed=1, queue_length=3))  # load 3
    controller.register_worker("http://b", True, status("m", speed=2, queue_length=2))  # load 1
    controller.register_worker("http://c", True, status("m", speed=1, queue_length=2))  # load 2
    controller.register_worker("http://d", True, status("other", speed=1, queue_length=0))
    picks = [controller.get_worker_address("m").removeprefix("http://") for _ in range(6)]
    # b 1.0 -> 1.5 -> 2.0 (tie with c: first registered wins) -> 2.5; c 2 -> 3; b 2.5 -> 3; all 3: a first
    assert picks == ["b", "b", "b", "c", "b", "a"]
    queues = {name.removeprefix("http://"): info.queue_length for name, info in controller.workers().items()}
    assert queues == {"a": 4, "b": 6, "c": 3, "d": 0}
    assert controller.get_worker_address("missing") == ""


def test_refresh_and_aggregate_status():
    alive = {"http://w1": status("m1", speed=2, queue_length=3), "http://w2": status("m2", queue_length=1)}
    controller = Controller(status_fetcher=lambda name: alive.get(name))
    controller.register_worker("http://w1", True, status("m1"))
    controller.register_worker("http://w2", True, status("m2"))
    controller.register_worker("http://gone", True, status("m3"))
    assert controller.worker_api_get_status() == {"model_names": ["m1", "m2"], "speed": 3.0, "queue_length": 4}
    assert controller.refresh_all_workers() == ["http://w1", "http://w2"]
    assert controller.list_models() == ["m1", "m2"]
    assert controller.workers()["http://w1"].queue_length == 3  # refreshed from the live status


# ----------------------------------------------------------------------------------------- HTTP app


def test_every_endpoint_through_test_client():
    live = {"http://w1": status("m1", speed=2, queue_length=1)}
    controller = Controller(
        heart_beat_expiration=5, status_fetcher=lambda name: live.get(name), rng=random.Random(0)
    )
    with TestClient(create_app(controller)) as client:
        assert controller._thread is not None and controller._thread.is_alive()  # started by the lifespan
        post = client.post
        assert post("/register_worker", json={"worker_name": "http://w1", "check_heart_beat": True}).json() == {
            "registered": True
        }
        body = {"worker_name": "http://w2", "check_heart_beat": True, "worker_status": status("m2", speed=1)}
        assert post("/register_worker", json=body).json() == {"registered": True}
        assert post("/register_worker", json={"worker_name": "http://w9"}).json() == {"registered": False}
        assert post("/register_worker", json={"check_heart_beat": True}).status_code == 422
        assert post("/list_models").json() == {"models": ["m1", "m2"]}
        assert post("/get_worker_address", json={"model": "m2"}).json() == {"address": "http://w2"}
        assert post("/get_worker_address", json={"model": "nope"}).json() == {"address": ""}
        assert post("/receive_heart_beat", json={"worker_name": "http://w1", "queue_length": 2}).json() == {
            "exist": True
        }
        assert post("/receive_heart_beat", json={"worker_name": "http://zz", "queue_length": 0}).json() == {
            "exist": False
        }
        assert post("/worker_get_status").json() == {"model_names": ["m1"], "speed": 2.0, "queue_length": 1}
        assert post("/refresh_all_workers").json() == {"workers": ["http://w1"]}
        assert post("/list_models").json() == {"models": ["m1"]}
        reply = post("/worker_generate_stream", json={"model": "nope", "prompt": "hi"})
        assert reply.status_code == 503 and reply.headers["retry-after"] == "5"
        assert reply.json() == {"text": "no worker serves model 'nope'", "error_code": int(ErrorCode.NO_WORKER)}
        thread = controller._thread
    thread.join(timeout=5)
    assert not thread.is_alive()  # stopped by the lifespan


def test_proxy_streams_worker_messages(fake_worker):
    controller = Controller()
    with TestClient(create_app(controller)) as client:
        # no worker_status: the controller asks the fake worker over loopback HTTP
        assert client.post("/register_worker", json={"worker_name": fake_worker.url}).json() == {"registered": True}
        assert controller.workers()[fake_worker.url].speed == 2.0
        assert client.post("/get_worker_address", json={"model": "fake-model"}).json() == {
            "address": fake_worker.url
        }
        reply = client.post("/worker_generate_stream", json={"model": "fake-model", "prompt": "hello"})
        raw = reply.content
        messages = list(iter_messages([raw]))
        assert messages == [{"text": "hello" + " é" * i, "error_code": 0} for i in range(1, 4)]
        assert raw == b"".join(encode_chunk(m) for m in messages)  # re-framed one message per frame

        # the controller can stand in for a worker: its status is the sum of its workers'
        assert client.post("/worker_get_status").json() == {
            "model_names": ["fake-model"],
            "speed": 2.0,
            "queue_length": 1,
        }

        reply = client.post("/worker_generate_stream", json={"model": "fake-model", "prompt": "x", "mode": "reject"})
        assert reply.status_code == 422  # the worker's own status, not 200 with an error inside
        assert reply.json() == {"text": "region 0 (box) lies outside the image", "error_code": 4}
        assert fake_worker.url in controller.workers()  # a refused request says nothing about the worker's health


def test_proxy_unreachable_worker_gives_one_error():
    controller = Controller(worker_timeout=2)
    dead = closed_port_url()
    controller.register_worker(dead, True, status("m"))
    with TestClient(create_app(controller)) as client:
        reply = client.post("/worker_generate_stream", json={"model": "m", "prompt": "hi"})
    assert reply.status_code == 502
    message = reply.json()
    assert message["error_code"] == int(ErrorCode.WORKER_UNREACHABLE) and dead in message["text"]
    assert controller.workers() == {}  # out of rotation at once, not after the heartbeat expiry


def test_proxy_timeout_after_partial_stream(fake_worker):
    controller = Controller(stream_timeout=0.3)
    controller.register_worker(fake_worker.url, True, status("fake-model"))
    started = time.monotonic()
    messages = list(controller.worker_api_generate_stream({"model": "fake-model", "prompt": "p", "mode": "slow"}))
    waited = time.monotonic() - started
    decoded = list(iter_messages(messages))
    assert decoded[0] == {"text": "first", "error_code": 0}
    assert [m["error_code"] for m in decoded] == [0, int(ErrorCode.WORKER_UNREACHABLE)]
    assert waited < 1.4  # the stall is cut at 0.3 s, before the fake worker's 1.5 s pause ends
    assert controller.workers() == {}  # and the stalled worker is out of rotation at once
    controller.stop()


def test_first_token_timeout_takes_a_frozen_worker_out_of_rotation(fake_worker):
    """A worker that accepts the connection but never answers (as a SIGSTOPped one does) costs its client the
    first-token timeout, not the 120 s read timeout, and receives no further requests."""
    controller = Controller(first_token_timeout=0.5, stream_timeout=5)
    controller.register_worker(fake_worker.url, True, status("fake-model"))
    with TestClient(create_app(controller)) as client:
        started = time.monotonic()
        reply = client.post("/worker_generate_stream", json={"model": "fake-model", "prompt": "p", "mode": "frozen"})
        waited = time.monotonic() - started
        assert reply.status_code == 504 and reply.json()["error_code"] == int(ErrorCode.WORKER_UNREACHABLE)
        assert "first-token timeout of 0.5 s" in reply.json()["text"]
        assert 0.45 < waited < 2.0
        assert controller.workers() == {}
        again = client.post("/worker_generate_stream", json={"model": "fake-model", "prompt": "p"})
        assert again.status_code == 503  # no worker left: refused at once
        # a live worker comes back by registering again (its next heartbeat asks it to)
        assert client.post("/register_worker", json={"worker_name": fake_worker.url}).json() == {"registered": True}
        assert client.post("/worker_generate_stream", json={"model": "fake-model", "prompt": "p"}).status_code == 200


def test_busy_worker_gives_429_with_retry_after(fake_worker):
    controller = Controller()
    controller.register_worker(fake_worker.url, True, status("fake-model"))
    with TestClient(create_app(controller)) as client:
        reply = client.post("/worker_generate_stream", json={"model": "fake-model", "prompt": "p", "mode": "busy"})
        assert reply.status_code == 429 and reply.headers["retry-after"] == "1"
        assert reply.json() == {"text": "busy", "error_code": int(ErrorCode.SERVER_BUSY)}
        assert fake_worker.url in controller.workers()
        # the caller's API key travels to the worker
        reply = client.post("/worker_generate_stream", json={"model": "fake-model", "prompt": "p", "mode": "auth"},
                            headers={"Authorization": "Bearer k1"})
        assert reply.status_code == 200 and list(iter_messages([reply.content])) == [
            {"text": "Bearer k1", "error_code": 0}]


def test_registration_needs_the_secret_when_one_is_set():
    live = {"http://w1": status("m1")}
    controller = Controller(status_fetcher=lambda name: live.get(name), register_secret="s3cret")
    with TestClient(create_app(controller)) as client:
        body = {"worker_name": "http://w1"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            reply = client.post("/register_worker", json=body, headers=headers)
            assert reply.status_code == 401 and "secret" in reply.json()["detail"], headers
            assert reply.headers["www-authenticate"] == "Bearer"
        assert controller.workers() == {}
        assert client.post("/receive_heart_beat", json=body).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert client.post("/register_worker", json=body, headers=good).json() == {"registered": True}
        assert client.post("/receive_heart_beat", json=body, headers=good).json() == {"exist": True}
    open_controller = Controller(status_fetcher=lambda name: live.get(name))
    with TestClient(create_app(open_controller)) as client:  # no secret set: registration stays open
        assert client.post("/register_worker", json={"worker_name": "http://w1"}).json() == {"registered": True}


def test_controller_refuses_non_json_and_oversized_bodies():
    controller = Controller()
    with TestClient(create_app(controller, max_body_bytes=1000)) as client:
        reply = client.post("/worker_generate_stream", content=b'{"model": "m"}',
                            headers={"Content-Type": "text/plain"})
        assert reply.status_code == 415 and reply.json()["error_code"] == int(ErrorCode.BAD_REQUEST)
        reply = client.post("/worker_generate_stream", json={"model": "m", "prompt": "x" * 2000})
        assert reply.status_code == 413
        reply = client.post("/worker_generate_stream", content=b"[" * 5000 + b"]" * 5000,
                            headers={"Content-Type": "application/json"})
        assert reply.status_code in (400, 413)


def test_real_uvicorn_controller_and_worker_heartbeat_expiry(fake_worker):
    controller = Controller(heart_beat_expiration=1.0, heart_beat_check_interval=0.1)
    with LoopbackServer(create_app(controller)) as server, httpx.Client(trust_env=False, timeout=5) as http:
        url = server.url
        assert http.post(f"{url}/register_worker", json={"worker_name": fake_worker.url}).json() == {
            "registered": True
        }
        assert http.post(f"{url}/list_models").json() == {"models": ["fake-model"]}
        with http.stream("POST", f"{url}/worker_generate_stream", json={"model": "fake-model", "prompt": "a"}) as r:
            texts = [m["text"] for m in iter_messages(r.iter_bytes())]
        assert texts == ["a é", "a é é", "a é é é"]
        # no heartbeats: gone within expiry + check interval (bounded wait)
        start = time.monotonic()
        while http.post(f"{url}/list_models").json()["models"] and time.monotonic() - start < 5:
            time.sleep(0.05)
        assert http.post(f"{url}/list_models").json() == {"models": []}
        assert time.monotonic() - start < 1.0 + 0.1 + 1.0  # expiry + check interval + slack for a busy machine
        assert http.post(f"{url}/receive_heart_beat", json={"worker_name": fake_worker.url}).json() == {
            "exist": False
        }
    assert controller._thread is None


# ----------------------------------------------------------------------------------------- CLI


def test_cli_defaults_are_loopback_and_shortest_queue():
    args = build_arg_parser().parse_args([])
    assert (args.host, args.port, args.dispatch_method) == ("127.0.0.1", 21001, "shortest_queue")
    assert args.heart_beat_expiration == 30
    args = build_arg_parser().parse_args(["--dispatch-method", "lottery", "--heart-beat-expiration", "2"])
    assert (args.dispatch_method, args.heart_beat_expiration) == ("lottery", 2.0)
    with pytest.raises(SystemExit):
        build_arg_parser().parse_args(["--dispatch-method", "random"])


def test_cli_serves_on_loopback():
    url = closed_port_url()
    port = url.rsplit(":", 1)[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_PROXY": "127.0.0.1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ferret.serve.controller", "--port", port, "--heart-beat-expiration", "2"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        with httpx.Client(trust_env=False, timeout=2) as http:
            while True:
                assert proc.poll() is None, proc.stderr.read().decode()
                try:
                    reply = http.post(f"{url}/list_models")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "controller did not come up within 30 s"
                    time.sleep(0.1)
            assert reply.json() == {"models": []}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        proc.stderr.close()


def test_controller_import_stays_light():
    code = "import sys, ferret.serve.controller; print(sorted({'torch', 'transformers', 'gradio'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
