"""Serving under hostile input and under faults, all on 127.0.0.1 with a tiny random Ferret.

* Fuzz (property tests): requests mutated at random (wrong types, lone surrogates, deep nesting, huge numbers,
  RLE masks of any declared size) never get a 5xx and never take a server down; every refusal names what is
  wrong in the server's error shape (OpenAI's for the API, ``{"text", "error_code"}`` for the worker).
* Faults: a real controller and a real worker process. The worker is frozen (SIGSTOP) before and during an
  answer, resumed, killed; the controller is killed and restarted. The test measures how long a client waits and
  how long the worker stays in rotation, and asserts the bounds (first-token and stall deadlines, immediate
  removal). Run it alone to see the figures::

      PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python -m pytest -q -s tests/serve/test_serve_faults.py -k faults
"""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import (
    LoopbackServer,
    free_port,
    http_ok,
    make_checkpoint,
    make_image,
    rle_bomb,
    scripted_generate,
    start_process,
    stop_process,
    wait_for,
)

from ferret.model.builder import load_pretrained_model
from ferret.serve.api import ChatServer
from ferret.serve.api import create_app as create_api_app
from ferret.serve.model_worker import ModelWorker
from ferret.serve.model_worker import create_app as create_worker_app
from ferret.serve.protocol import ErrorCode, build_chat_payload, chat_messages, encode_image, iter_messages

W, H = 64, 48
DATA_URL = "data:image/png;base64," + encode_image(make_image())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-ferret", tokenizer_dir)


@pytest.fixture(scope="module")
def servers(checkpoint):
    """The API and a worker in this process, with a scripted generate (the fuzz is about parsing, not decoding)."""
    model, processor = load_pretrained_model(checkpoint, device="cpu")
    model.generate = scripted_generate(processor.tokenizer, "a cat [1, 2, 30, 40]")
    api = ChatServer(model, processor, "tiny-ferret", limit_model_concurrency=64)
    worker = ModelWorker(model, processor, "tiny-ferret", "http://127.0.0.1:1", None, limit_model_concurrency=64)
    with LoopbackServer(create_api_app(api)) as api_server, LoopbackServer(create_worker_app(worker)) as wrk_server:
        yield api_server, wrk_server, api, worker


# ----------------------------------------------------------------------------------------------- fuzz

BOX = {"type": "box", "x1": 5, "y1": 5, "x2": 30, "y2": 30}


def valid_api_body() -> dict:
    return {"model": "tiny-ferret", "max_tokens": 3, "temperature": 0.5, "top_p": 0.9, "stream": False,
            "stream_options": {"include_usage": True}, "stop": ["###"],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "What is <region0>?"},
                                                      {"type": "image_url", "image_url": {"url": DATA_URL}}],
                          "regions": [dict(BOX)]}]}


def valid_worker_body() -> dict:
    messages = chat_messages([{"from": "human", "value": "What is <region0>?"}], make_image(), [[dict(BOX)]])
    return build_chat_payload(messages, temperature=0.5, max_new_tokens=3, stop="###")


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(["\ud800", "a\udfffb", "<region0>", "<region99999999>", "<image>",
                                            "<region_fea>", "data:image/png;base64,AAAA", "", "\x00"]),
)
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
REGIONS = st.one_of(
    JSON_VALUES,
    st.builds(lambda h, w, counts: {"type": "mask", "rle": {"size": [h, w], "counts": counts}},
              st.integers(-5, 10**7), st.integers(-5, 10**7),
              st.one_of(st.text(max_size=200), st.lists(st.one_of(st.integers(-3, 5000), st.floats()), max_size=30))),
    st.builds(lambda x, y: {"type": "point", "x": x, "y": y}, SCALARS, SCALARS),
    st.builds(lambda depth: nested(depth), st.integers(20, 3000)),
)


def paths(value, prefix=()):
    """Every (path) into a JSON value, so a mutation can hit any level."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from paths(child, (*prefix, key))
    elif isinstance(value, list):
        for k, child in enumerate(value):
            yield from paths(child, (*prefix, k))


def mutate(body: dict, data) -> dict:
    """Replace (or delete) one node of ``body`` with a drawn value; regions get region-shaped hostility."""
    targets = list(paths(body))[1:]
    path = data.draw(st.sampled_from(targets), label="path")
    parent = body
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if data.draw(st.booleans(), label="delete") and isinstance(parent, dict):
        del parent[last]
    else:
        strategy = REGIONS if "regions" in path else JSON_VALUES
        parent[last] = data.draw(strategy, label="value")
    return body


def send(url: str, body) -> httpx.Response:
    raw = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    with httpx.Client(trust_env=False, timeout=30) as client:
        return client.post(url, content=raw, headers={"Content-Type": "application/json"})


FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


@FUZZ
@given(data=st.data())
def test_fuzzed_api_requests_get_200_or_a_named_4xx(servers, data):
    api_server, _, api, _ = servers
    body = mutate(valid_api_body(), data)
    started = time.monotonic()
    reply = send(f"{api_server.url}/v1/chat/completions", body)
    assert time.monotonic() - started < 10
    assert reply.status_code == 200 or 400 <= reply.status_code < 500, (body, reply.status_code, reply.text[:300])
    if reply.status_code != 200:
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], reply.text
    assert api.limiter.in_flight == 0 or wait_for(lambda: api.limiter.in_flight == 0, 10, "API slots released")


@FUZZ
@given(data=st.data())
def test_fuzzed_worker_requests_get_200_or_a_named_4xx(servers, data):
    _, worker_server, _, worker = servers
    body = mutate(valid_worker_body(), data)
    reply = send(f"{worker_server.url}/worker_generate_stream", body)
    assert reply.status_code == 200 or 400 <= reply.status_code < 500, (body, reply.status_code, reply.text[:300])
    messages = list(iter_messages([reply.content]))
    if reply.status_code == 200:
        assert messages and messages[-1]["error_code"] == 0, messages
    else:
        assert messages[0]["error_code"] == int(ErrorCode.BAD_REQUEST) and messages[0]["text"], reply.text
    wait_for(lambda: worker.limiter.in_flight == 0, 10, "worker slots released")


def test_hand_cases_through_the_worker(servers):
    """The named cases of the fuzz, each once: what the worker says for them."""
    _, worker_server, _, _ = servers
    url = f"{worker_server.url}/worker_generate_stream"
    good = valid_worker_body()
    bomb = rle_bomb()
    cases = [
        ({**good, "messages": [{**good["messages"][0], "regions": [bomb]}]}, 422, "RLE 'size' is [H, W] = [1000000"),
        ({**good, "messages": nested(100)}, 400, "nested more than 32 levels"),
        ({**good, "messages": [{"role": "user", "content": "\ud800"}]}, 400, "lone surrogate"),
        ({**good, "stop": "\udfff"}, 400, "'stop' contains a lone surrogate"),
        ({**good, "prompt": "x"}, 400, "either 'messages' or the legacy 'prompt'"),
        ({**good, "region_feature": "yes"}, 400, "'region_feature' must be true, false or absent"),
        ({**good, "messages": [{"role": "user", "content": "<region0> " * 40, "regions": [BOX]}]}, 422,
         "refer to regions 40 times; at most 32"),
    ]
    for body, status, text in cases:
        reply = send(url, body)
        assert reply.status_code == status and text in reply.json()["text"], (text, reply.text[:300])
    with httpx.Client(trust_env=False, timeout=30) as client:
        deep = client.post(url, content=b"[" * 100_000 + b"]" * 100_000, headers={"Content-Type": "application/json"})
        assert deep.status_code == 400 and "nested too deeply" in deep.json()["text"]
        plain = client.post(url, content=json.dumps(good), headers={"Content-Type": "text/plain"})
        assert plain.status_code == 415


# ----------------------------------------------------------------------------------------------- faults


class Stack:
    """A controller and a worker, each a real process on 127.0.0.1."""

    def __init__(self, checkpoint: str, tmp_path, first_token_timeout: float, stream_timeout: float,
                 expiration: float, beat: float):
        self.checkpoint, self.tmp = checkpoint, tmp_path
        self.timeouts = (first_token_timeout, stream_timeout, expiration)
        self.beat = beat
        self.controller_port, self.worker_port = free_port(), free_port()
        self.controller_url = f"http://127.0.0.1:{self.controller_port}"
        self.worker_url = f"http://127.0.0.1:{self.worker_port}"
        self.controller = self.worker = None

    def start_controller(self) -> None:
        first, stall, expiration = self.timeouts
        log = self.tmp / "controller.log"
        self.controller = start_process(
            ["-m", "ferret.serve.controller", "--port", str(self.controller_port), "--first-token-timeout", str(first),
             "--stream-timeout", str(stall), "--heart-beat-expiration", str(expiration),
             "--heart-beat-check-interval", "0.1", "--log-level", "warning"], log)
        wait_for(lambda: http_ok(f"{self.controller_url}/list_models", "POST"), 60, "controller up",
                 process=self.controller, log=log)

    def start_worker(self) -> None:
        log = self.tmp / "worker.log"
        self.worker = start_process(
            ["-m", "ferret.serve.model_worker", "--model-path", self.checkpoint, "--port", str(self.worker_port),
             "--controller-address", self.controller_url, "--device", "cpu", "--heart-beat-interval", str(self.beat),
             "--max-new-tokens-limit", "500", "--log-level", "warning"], log)
        wait_for(self.in_rotation, 120, "worker registered", process=self.worker, log=log)

    def models(self) -> list:
        reply = http_ok(f"{self.controller_url}/list_models", "POST")
        return reply["models"] if isinstance(reply, dict) else []

    def in_rotation(self) -> bool:
        return self.models() == ["tiny-ferret"]

    def stop(self) -> None:
        for process in (self.worker, self.controller):
            if process is not None:
                if process.poll() is None:
                    try:
                        os.killpg(process.pid, signal.SIGCONT)
                    except ProcessLookupError:
                        pass
                stop_process(process)


def ask(url: str, max_new_tokens: int = 3, temperature: float = 0.0, on_first=None, timeout: float = 60):
    """One request through the controller: (HTTP status, messages, seconds waited). ``on_first`` runs when the
    first message arrives (to freeze the worker mid-answer)."""
    messages_out: list = []
    payload = build_chat_payload(chat_messages([{"from": "human", "value": "Describe <region0>."}], make_image(),
                                               [[BOX]]), model="tiny-ferret", temperature=temperature,
                                 max_new_tokens=max_new_tokens)
    started = time.monotonic()
    with httpx.Client(trust_env=False, timeout=timeout) as client:
        try:
            with client.stream("POST", f"{url}/worker_generate_stream", json=payload) as reply:
                from ferret.serve.protocol import StreamDecoder

                decoder = StreamDecoder()
                for raw in reply.iter_bytes():
                    for message in decoder.feed(raw):
                        if not messages_out and on_first is not None:
                            on_first()
                        messages_out.append(message)
                messages_out.extend(decoder.close())
                status = reply.status_code
        except httpx.ConnectError as err:
            return 0, [{"text": repr(err), "error_code": -1}], time.monotonic() - started
    return status, messages_out, time.monotonic() - started


def test_faults_frozen_killed_worker_and_killed_controller(checkpoint, tmp_path):
    first_token, stall, expiration, beat = 3.0, 1.5, 6.0, 0.5
    stack = Stack(checkpoint, tmp_path, first_token, stall, expiration, beat)
    figures: dict[str, float] = {}
    try:
        stack.start_controller()
        stack.start_worker()
        status, messages, _ = ask(stack.controller_url)
        assert status == 200 and messages[-1]["error_code"] == 0, messages

        # 1. frozen before answering: the client waits the first-token timeout, the worker leaves rotation at once
        os.killpg(stack.worker.pid, signal.SIGSTOP)
        status, messages, waited = ask(stack.controller_url)
        assert status == 504 and messages[0]["error_code"] == int(ErrorCode.WORKER_UNREACHABLE), messages
        assert first_token - 0.1 <= waited <= first_token + 2.5
        assert not stack.in_rotation()
        figures["frozen: client waited = worker out of rotation after (s)"] = round(waited, 2)
        status, messages, waited_next = ask(stack.controller_url)
        assert status == 503 and waited_next < 1.5  # the next client is told at once, not held
        figures["frozen: next client waited (s)"] = round(waited_next, 2)
        # resumed: its next heartbeat is answered "unknown", it registers again
        os.killpg(stack.worker.pid, signal.SIGCONT)
        resumed = time.monotonic()
        wait_for(stack.in_rotation, beat + 10, "back in rotation after SIGCONT")
        figures["frozen: back in rotation after SIGCONT (s)"] = round(time.monotonic() - resumed, 2)

        # 2. frozen mid-answer: the stream ends with an error after the stall timeout
        for attempt in range(3):
            frozen_at: list[float] = []

            def freeze():
                os.killpg(stack.worker.pid, signal.SIGSTOP)
                frozen_at.append(time.monotonic())

            status, messages, _ = ask(stack.controller_url, max_new_tokens=400, temperature=1.0, on_first=freeze)
            if messages[-1]["error_code"] != 0:
                break
            os.killpg(stack.worker.pid, signal.SIGCONT)  # it finished before the freeze landed: try again
            wait_for(stack.in_rotation, beat + 10, "in rotation")
        assert status == 200 and messages[-1]["error_code"] == int(ErrorCode.WORKER_UNREACHABLE), messages[-2:]
        stalled = time.monotonic() - frozen_at[0]
        assert stall - 0.1 <= stalled <= stall + 2.5 and not stack.in_rotation()
        figures["stalled mid-stream: client waited after the freeze (s)"] = round(stalled, 2)
        os.killpg(stack.worker.pid, signal.SIGCONT)
        wait_for(stack.in_rotation, beat + 10, "back after the mid-stream freeze")

        # 3. killed controller: clients are refused at once; a restarted controller gets the worker back
        os.killpg(stack.controller.pid, signal.SIGKILL)
        stack.controller.wait(timeout=10)
        status, messages, waited = ask(stack.controller_url)
        assert status == 0 and waited < 2.0  # connection refused, no hang
        figures["killed controller: client waited (s)"] = round(waited, 3)
        assert stack.worker.poll() is None  # the worker survives its controller
        restarted = time.monotonic()
        stack.start_controller()
        wait_for(stack.in_rotation, beat + 10, "worker re-registered with the new controller")
        figures["restarted controller: worker back in rotation after (s)"] = round(time.monotonic() - restarted, 2)
        status, messages, _ = ask(stack.controller_url)
        assert status == 200 and messages[-1]["error_code"] == 0

        # 4. killed worker: the next request is refused at once and the worker leaves rotation with it (without
        # traffic it leaves at the heartbeat expiry: test_serve_worker.py measures that)
        os.killpg(stack.worker.pid, signal.SIGKILL)
        stack.worker.wait(timeout=10)
        status, messages, waited = ask(stack.controller_url)
        assert status == 502 and messages[0]["error_code"] == int(ErrorCode.WORKER_UNREACHABLE)
        assert waited < 2.0 and not stack.in_rotation()
        figures["killed worker: client waited = worker out of rotation after (s)"] = round(waited, 2)
    finally:
        stack.stop()
    print("\nserving fault figures (first-token timeout %.1f s, stall timeout %.1f s, heartbeat expiry %.1f s, "
          "heartbeat every %.1f s):" % (first_token, stall, expiration, beat))
    for name, value in figures.items():
        print(f"  {name}: {value}")
