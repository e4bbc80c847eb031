"""The model worker with a tiny random Ferret: every endpoint, the streaming protocol, rejected inputs, the
concurrency limit under load (nothing hangs, nothing leaks), client disconnects, heartbeats and re-registration,
a killed worker leaving the controller, and controller + worker + web-server logic end to end. All on 127.0.0.1."""

import asyncio
import json
import os
import signal
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from serve_helpers import (
    LoopbackServer,
    free_port,
    make_checkpoint,
    make_image,
    rle_bomb,
    scripted_generate,
    start_process,
    stop_process,
    wait_for,
)

from ferret import regions as R
from ferret.conversation import get_template
from ferret.model.builder import load_pretrained_model
from ferret.serve.controller import Controller
from ferret.serve.controller import create_app as create_controller_app
from ferret.serve.model_worker import ModelWorker, build_arg_parser, create_app
from ferret.serve.protocol import ErrorCode, build_generate_payload, encode_image, iter_messages

W, H = 64, 48
LOAD_REQUESTS, LOAD_LIMIT = 50, 5


def prompt_for(question: str) -> str:
    conv = get_template("ferret_v1")
    conv.append_message("USER", "<image>\n" + question)
    conv.append_message("ASSISTANT", None)
    return conv.get_prompt()


BOX_PROMPT = prompt_for("What is [78, 104, 468, 625] <region_fea>?")
BOX = R.Box(5, 5, 30, 30)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-ferret", tokenizer_dir)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_pretrained_model(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def worker(loaded):
    model, processor = loaded
    return ModelWorker(model, processor, "tiny-ferret", "http://127.0.0.1:1", None,
                       limit_model_concurrency=LOAD_LIMIT)


@pytest.fixture(scope="module")
def server(worker):
    with LoopbackServer(create_app(worker)) as running:
        yield running


def post_stream(url: str, payload, timeout: float = 60.0):
    with httpx.Client(trust_env=False, timeout=timeout) as client:
        reply = client.post(f"{url}/worker_generate_stream", json=payload)
    return reply.status_code, list(iter_messages([reply.content]))


def reference_output(loaded, payload) -> str:
    """What the model generates for ``payload`` (greedy) when called directly, without the worker."""
    model, processor = loaded
    image = make_image()
    features = processor.encode_prompt(payload["prompt"], image, [R.region_mask(BOX, W, H)])
    with torch.no_grad():
        ids = model.generate(**processor.model_inputs(features, model), max_new_tokens=payload["max_new_tokens"],
                             do_sample=False, pad_token_id=processor.tokenizer.pad_token_id,
                             eos_token_id=processor.tokenizer.eos_token_id)
    return processor.tokenizer.decode(ids[0], skip_special_tokens=True)


# ----------------------------------------------------------------------------------------- endpoints


def test_status(server, worker):
    with httpx.Client(trust_env=False, timeout=10) as client:
        status = client.post(f"{server.url}/worker_get_status").json()
    assert status == {"model_names": ["tiny-ferret"], "speed": 1, "queue_length": 0, "limit_model_concurrency": 5,
                      "context_length": 512, "image_aspect_ratio": "square_nocrop", "region_feature": True}


def test_stream_protocol_matches_direct_generation(server, loaded):
    payload = build_generate_payload(BOX_PROMPT, [make_image()], [BOX], temperature=0.0, max_new_tokens=6,
                                     model="tiny-ferret")
    status, messages = post_stream(server.url, payload)
    assert status == 200
    assert all(m["error_code"] == 0 and m["text"].startswith(BOX_PROMPT) for m in messages)
    outputs = [m["text"][len(BOX_PROMPT):] for m in messages]
    assert all(b.startswith(a) for a, b in zip(outputs, outputs[1:], strict=False))  # each message extends the previous
    final = messages[-1]
    usage = final["usage"]
    assert len(messages) == usage["completion_tokens"] + 1  # stream_interval 1: one per token, then the final
    assert 1 <= usage["completion_tokens"] <= 6
    _, processor = loaded
    expected_prompt_tokens = len(processor.encode_prompt(BOX_PROMPT, make_image(), [R.region_mask(BOX, W, H)])
                                 ["input_ids"])
    assert usage["prompt_tokens"] == expected_prompt_tokens
    assert final["finish_reason"] in ("stop", "length")
    assert final["text"][len(BOX_PROMPT):] == reference_output(loaded, payload)
    assert isinstance(final["regions"], list) and isinstance(final["clean_text"], str)
    # greedy decoding is deterministic across requests
    assert post_stream(server.url, payload)[1][-1]["text"] == final["text"]


def test_stream_interval_and_legacy_dense_masks(server, worker):
    mask = R.region_mask(BOX, W, H)
    payload = build_generate_payload(BOX_PROMPT, [make_image()], temperature=0.0, max_new_tokens=7)
    payload["region_masks"] = [mask.T.astype(float).tolist()]  # the original's [W][H] layout
    worker.stream_interval = 3
    try:
        status, messages = post_stream(server.url, payload)
    finally:
        worker.stream_interval = 1
    assert status == 200
    n = messages[-1]["usage"]["completion_tokens"]
    assert len(messages) == n // 3 + 1
    compact = build_generate_payload(BOX_PROMPT, [make_image()], [BOX], temperature=0.0, max_new_tokens=7)
    assert post_stream(server.url, compact)[1][-1]["text"] == messages[-1]["text"]  # same mask, same answer


def test_sampling_honours_temperature_and_top_p(server):
    payload = build_generate_payload(BOX_PROMPT, [make_image()], [BOX], temperature=1.0, top_p=1.0,
                                     max_new_tokens=8)
    texts = {post_stream(server.url, payload)[1][-1]["text"] for _ in range(3)}
    assert len(texts) > 1  # sampling at T=1 over a random model's flat distribution varies
    payload.update(temperature=1.0, top_p=1e-6)  # nucleus of one token = greedy
    greedy = build_generate_payload(BOX_PROMPT, [make_image()], [BOX], temperature=0.0, max_new_tokens=8)
    assert post_stream(server.url, payload)[1][-1]["text"] == post_stream(server.url, greedy)[1][-1]["text"]


def test_stop_string_and_grounded_regions(loaded, monkeypatch):
    """With a scripted generate: the stop string cuts the output and the regions come back in pixels."""
    model, processor = loaded
    calls = []
    monkeypatch.setattr(model, "generate", scripted_generate(
        processor.tokenizer, "a red circle [100, 200, 500, 600] and a dot [700, 100]### not this", calls))
    worker = ModelWorker(model, processor, "tiny-ferret", "http://127.0.0.1:1", None)
    payload = build_generate_payload(BOX_PROMPT, [make_image()], [BOX], max_new_tokens=100, stop="###")
    with TestClient(create_app(worker)) as client:
        reply = client.post("/worker_generate_stream", json=payload)
    messages = list(iter_messages([reply.content]))
    final = messages[-1]
    assert final["text"] == BOX_PROMPT + "a red circle [100, 200, 500, 600] and a dot [700, 100]"
    assert final["finish_reason"] == "stop"
    assert all("###" not in m["text"] for m in messages)
    # grid 0..999 -> pixels of the 64x48 image: int(v * size / 1000)
    assert final["regions"] == [
        {"phrase": "a red circle", "type": "box", "x1": 6.0, "y1": 9.0, "x2": 32.0, "y2": 28.0},
        {"phrase": "a dot", "type": "point", "x": 44.0, "y": 4.0},
    ]
    assert final["clean_text"] == "a red circle and a dot"
    # the model received the image and the box's mask at the right pixels
    (call,) = calls
    assert call["images"].shape == (1, 3, 56, 56)
    (mask,) = call["region_masks"][0]
    assert torch.equal(mask, torch.from_numpy(R.region_mask(BOX, W, H)))
    assert mask[5:31, 5:31].all() and mask.sum() == 26 * 26


# ----------------------------------------------------------------------------------------- rejected inputs


def test_bad_inputs_get_clear_4xx(server, worker):
    image = make_image()
    good = build_generate_payload(BOX_PROMPT, [image], [BOX], max_new_tokens=4)
    cases = [
        ({**good, "images": [encode_image(image)[:200]]}, 400, "image 0"),
        ({**good, "regions": [{"type": "box", "x1": 5, "y1": 5, "x2": 65, "y2": 30}]}, 422,
         "region 0 (box) corner 2 (65, 30) lies outside the image of 64x48"),
        ({**good, "prompt": prompt_for("What is [1, 1] <region_fea> and <region_fea>?")}, 422,
         "<region_fea> 2 time(s) but 1 region(s)"),
        ({**good, "prompt": prompt_for("dog " * 300 + "[1, 1] <region_fea>")}, 400, "the limit is 512"),
        ({**good, "max_new_tokens": 5000}, 422, "'max_new_tokens' must be between 1 and 1024"),
        ({**good, "temperature": -1}, 422, "'temperature' must be >= 0"),
        ({**good, "prompt": "no image token <region_fea>"}, 422, "<image> 0 time(s) but 1 image(s)"),
    ]
    with httpx.Client(trust_env=False, timeout=30) as client:
        for payload, status, text in cases:
            reply = client.post(f"{server.url}/worker_generate_stream", json=payload)
            body = reply.json()
            assert (reply.status_code, body["error_code"]) == (status, int(ErrorCode.BAD_REQUEST)), body
            assert text in body["text"], body["text"]
        reply = client.post(f"{server.url}/worker_generate_stream", content=b"{not json",
                            headers={"content-type": "application/json"})
        assert reply.status_code == 400 and "not JSON" in reply.json()["text"]
    assert worker.limiter.in_flight == 0


def test_prompt_near_the_context_limit_gets_fewer_tokens(server, loaded):
    _, processor = loaded
    mask = R.region_mask(R.Point(1, 1), W, H)

    def length(prompt):
        return len(processor.tokenizer(prompt)["input_ids"]) + 16  # + image positions - the <image> text

    dogs = 0
    while length(prompt_for("dog " * (dogs + 1) + "[1, 1] <region_fea>")) < 490:
        dogs += 1
    prompt = prompt_for("dog " * dogs + "[1, 1] <region_fea>")
    prompt_tokens = len(processor.encode_prompt(prompt, make_image(), [mask])["input_ids"])
    assert 450 < prompt_tokens < 510
    payload = build_generate_payload(prompt, [make_image()], [R.Point(1, 1)], temperature=0.0, max_new_tokens=1000)
    payload["max_new_tokens"] = 1000
    status, messages = post_stream(server.url, payload, timeout=120)
    assert status == 200
    usage = messages[-1]["usage"]
    assert usage["prompt_tokens"] == prompt_tokens and usage["total_tokens"] <= 512


# ----------------------------------------------------------------------------------------- load and leaks


def fire(url: str, payload, n: int = LOAD_REQUESTS, timeout: float = 150):
    """``n`` concurrent POSTs of ``payload`` to ``url``: [(HTTP status, seconds, messages)], bounded by ``timeout``."""

    async def one(client):
        start = time.monotonic()
        async with client.stream("POST", url, json=payload) as reply:
            body = await reply.aread()
        return reply.status_code, time.monotonic() - start, list(iter_messages([body]))

    async def run_all():
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
        async with httpx.AsyncClient(trust_env=False, timeout=60, limits=limits) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client) for _ in range(n))), timeout)

    return asyncio.run(run_all())


def load_figures(label: str, answered: list[float], refused: list[float], wall: float) -> dict:
    def pct(values, q):
        values = sorted(values)
        return round(values[min(len(values) - 1, int(round(q * (len(values) - 1))))], 3) if values else None

    figures = {"path": label, "requests": len(answered) + len(refused), "limit": LOAD_LIMIT,
               "answered": len(answered), "refused": len(refused),
               "answered_p50_s": pct(answered, 0.5), "answered_p95_s": pct(answered, 0.95),
               "refused_p50_s": pct(refused, 0.5), "refused_p95_s": pct(refused, 0.95), "wall_s": round(wall, 2)}
    print("\nLOAD TEST", json.dumps(figures))
    report = os.environ.get("FERRET_LOAD_REPORT")
    if report:
        with open(report, "a") as handle:
            handle.write(json.dumps(figures) + "\n")
    return figures


def test_load_50_concurrent_requests_limit_5(server, worker):
    """50 requests at once against a limit of 5: each is answered (200) or refused busy (429) at once; nothing
    hangs; afterwards no slot is held and no thread is left."""
    baseline = threading.active_count()
    payload = build_generate_payload(BOX_PROMPT, [make_image()], [BOX], temperature=0.7, max_new_tokens=4)
    start = time.monotonic()
    results = fire(f"{server.url}/worker_generate_stream", payload)
    wall = time.monotonic() - start
    answered = [(t, m) for s, t, m in results if s == 200]
    refused = [(t, m) for s, t, m in results if s == 429]
    assert len(answered) + len(refused) == LOAD_REQUESTS, [s for s, _, _ in results]
    assert len(answered) >= LOAD_LIMIT and refused
    for _, messages in answered:
        assert messages[-1]["error_code"] == 0 and messages[-1]["finish_reason"] in ("stop", "length")
    for _, messages in refused:
        assert messages == [{"text": messages[0]["text"], "error_code": int(ErrorCode.SERVER_BUSY)}]
        assert "busy" in messages[0]["text"]
    load_figures("worker", [t for t, _ in answered], [t for t, _ in refused], wall)
    assert max(t for t, _ in refused) < 10  # refusals are immediate, not queued behind generations

    wait_for(lambda: worker.limiter.in_flight == 0, 10, "all slots released")
    with httpx.Client(trust_env=False, timeout=10) as client:
        assert client.post(f"{server.url}/worker_get_status").json()["queue_length"] == 0
    wait_for(lambda: threading.active_count() <= baseline + 2, 15, "generation threads ended")


def test_load_through_the_controller(server, worker):
    """The same load routed by a controller: a busy worker's refusal reaches the client as HTTP 429 with
    Retry-After and an error_code 5 body, never as a 200 with the error inside the stream."""
    controller = Controller(heart_beat_expiration=30)
    controller.register_worker(server.url, True, worker.status())
    payload = build_generate_payload(BOX_PROMPT, [make_image()], [BOX], model="tiny-ferret", temperature=0.7,
                                     max_new_tokens=4)
    with LoopbackServer(create_controller_app(controller)) as ctl:
        start = time.monotonic()
        results = fire(f"{ctl.url}/worker_generate_stream", payload)
        wall = time.monotonic() - start
    codes = [messages[-1]["error_code"] for _, _, messages in results]
    assert {(status, code) for (status, _, _), code in zip(results, codes, strict=True)} <= {
        (200, int(ErrorCode.OK)), (429, int(ErrorCode.SERVER_BUSY))}
    assert codes.count(0) >= LOAD_LIMIT
    load_figures("controller->worker", [t for (_, t, _), c in zip(results, codes, strict=True) if c == 0],
                 [t for (_, t, _), c in zip(results, codes, strict=True) if c != 0], wall)
    wait_for(lambda: worker.limiter.in_flight == 0, 10, "all slots released")


def test_client_disconnect_releases_the_slot(server, worker, loaded, monkeypatch):
    """A client that hangs up mid-stream cancels its generation; the slot is free long before the answer would
    have been complete (the scripted answer takes ~40 s)."""
    model, processor = loaded
    monkeypatch.setattr(model, "generate", scripted_generate(processor.tokenizer, "dog " * 200, delay=0.05))
    baseline = threading.active_count()
    payload = build_generate_payload(BOX_PROMPT, [make_image()], [BOX], max_new_tokens=1000)
    with httpx.Client(trust_env=False, timeout=60) as client:
        with client.stream("POST", f"{server.url}/worker_generate_stream", json=payload) as reply:
            assert reply.status_code == 200
            next(reply.iter_bytes())  # the first message arrived; now hang up
            assert worker.limiter.in_flight == 1
        hung_up = time.monotonic()
    wait_for(lambda: worker.limiter.in_flight == 0, 10, "slot released after the client hung up")
    assert time.monotonic() - hung_up < 10
    wait_for(lambda: threading.active_count() <= baseline + 1, 10, "generation thread ended")


# ----------------------------------------------------------------------------------------- controller


def test_heartbeats_and_reregistration(loaded):
    model, processor = loaded
    controller = Controller(heart_beat_expiration=30)
    with LoopbackServer(create_controller_app(controller)) as ctl:
        worker = ModelWorker(model, processor, "tiny-ferret", "http://127.0.0.1:9", ctl.url, heart_beat_interval=0.2)
        worker.start()
        try:
            wait_for(lambda: "http://127.0.0.1:9" in controller.workers(), 10, "registered")
            assert controller.list_models() == ["tiny-ferret"]
            thread = worker._thread
            assert thread.daemon
            first_beat = controller.workers()["http://127.0.0.1:9"].last_heart_beat
            wait_for(lambda: controller.workers().get("http://127.0.0.1:9") and
                     controller.workers()["http://127.0.0.1:9"].last_heart_beat > first_beat, 5, "heartbeat")
            controller.remove_worker("http://127.0.0.1:9")  # e.g. the controller restarted
            wait_for(lambda: "http://127.0.0.1:9" in controller.workers(), 5, "re-registered after exist: false")
        finally:
            worker.stop()
        assert not thread.is_alive()


def test_killed_worker_leaves_controller_within_expiry(checkpoint, tmp_path):
    """A real worker process registers, serves through the controller proxy, is killed, and expires."""
    expiration, check = 2.0, 0.2
    controller = Controller(heart_beat_expiration=expiration, heart_beat_check_interval=check)
    port = free_port()
    address = f"http://127.0.0.1:{port}"
    log = tmp_path / "worker.log"
    with LoopbackServer(create_controller_app(controller)) as ctl:
        process = start_process(["-m", "ferret.serve.model_worker", "--model-path", checkpoint, "--port", str(port),
                                 "--controller-address", ctl.url, "--device", "cpu", "--heart-beat-interval", "0.5",
                                 "--log-level", "warning"], log)
        try:
            wait_for(lambda: address in controller.workers(), 120, "worker registered", process=process, log=log)
            assert controller.list_models() == ["tiny-ferret"]
            payload = build_generate_payload(BOX_PROMPT, [make_image()], [BOX], model="tiny-ferret",
                                             temperature=0.0, max_new_tokens=3)
            with httpx.Client(trust_env=False, timeout=60) as client:
                reply = client.post(f"{ctl.url}/worker_generate_stream", json=payload)
            messages = list(iter_messages([reply.content]))
            assert messages[-1]["error_code"] == 0 and messages[-1]["text"].startswith(BOX_PROMPT)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
            killed = time.monotonic()
            wait_for(lambda: address not in controller.workers(), expiration + 5, "expired after the kill")
            assert time.monotonic() - killed <= expiration + 1.5 + check  # slack for a loaded 2-core machine
            assert controller.list_models() == []
        finally:
            stop_process(process)


def test_end_to_end_controller_worker_web(loaded, tmp_path):
    """Controller + worker over loopback, driven by the web server's own logic (no browser)."""
    gws = pytest.importorskip("ferret.serve.gradio_web_server")
    model, processor = loaded
    controller = Controller(heart_beat_expiration=30)
    with LoopbackServer(create_controller_app(controller)) as ctl:
        worker = ModelWorker(model, processor, "tiny-ferret", "http://unset", ctl.url, heart_beat_interval=5)
        wrk = LoopbackServer(create_app(worker))
        worker.worker_address = wrk.url  # the port is bound already; the worker registers when the app starts
        with wrk:
            wait_for(lambda: wrk.url in controller.workers(), 10, "worker registered")
            client = gws.ControllerClient(ctl.url)
            try:
                assert client.model_list() == ["tiny-ferret"]
                settings = gws.BotSettings(client, gws.ConversationLog(str(tmp_path / "logs")), region_feature=True)
                session = gws.WebSession()
                image = make_image(96, 64)
                strokes = np.zeros((64, 96, 4), np.uint8)
                strokes[10:30, 20:50, 3] = 255
                editor = {"background": np.asarray(image), "layers": [strokes], "composite": None}
                session, text = gws.add_region(session, editor, "Box", "What is")
                assert text == "What is [region0]" and session.regions == [("box", R.Box(20, 10, 49, 29))]
                session = gws.add_text(session, text + "?", editor)
                updates = list(gws.answer(settings, session, "tiny-ferret", 0.0, 0.7, 5, ip="127.0.0.1"))
                assert updates and session.turns[-1]["from"] == "gpt"
                assert session.chat[-1]["role"] == "assistant" and not session.answer_failed
                shown = gws.output_visual(session)  # upscaled 7x (64 px -> 448), framed, legend below
                assert shown.width > 96 * 7 and shown.height > 64 * 7
                (log_file,) = (tmp_path / "logs").glob("*-conv.json")
                record = json.loads(log_file.read_text().splitlines()[-1])
                assert record["finish"] >= record["start"] and record["model"] == "tiny-ferret"
                assert record["messages"][0]["content"][0]["text"] == "What is <region0>?"
                assert record["messages"][0]["content"][1]["image_url"] == {"url": "<image>"}
                assert record["regions"][0]["type"] == "box"
                assert os.path.isfile(record["image"])
            finally:
                client.close()
        assert worker.limiter.in_flight == 0


def test_cli_flags_match_the_original():
    args = build_arg_parser().parse_args(["--model-path", "/x/final-checkpoint", "--keep-aspect-ratio",
                                          "--add_region_feature", "--image_w", "336"])
    assert (args.host, args.port, args.limit_model_concurrency, args.stream_interval, args.device) == (
        "127.0.0.1", 21002, 5, 1, "auto")
    assert args.keep_aspect_ratio and args.region_feature is True and not args.no_register
    assert build_arg_parser().parse_args(["--model-path", "m"]).region_feature is None  # as the checkpoint says
    for refused in (["--multi-modal"], ["--num-gpus", "2"]):  # flags that would do nothing are refused, with why
        with pytest.raises(SystemExit) as exit_:
            build_arg_parser().parse_args(["--model-path", "m", *refused])
        assert exit_.value.code == 2
    # the README's abbreviations are argparse prefixes
    short = build_arg_parser().parse_args(["--model-path", "m", "--worker", "http://a:1", "--controller", "http://b:2"])
    assert (short.worker_address, short.controller_address) == ("http://a:1", "http://b:2")


# ----------------------------------------------------------------------------------------- structured messages


def test_structured_messages_are_encoded_by_the_processor(server, worker, loaded):
    """The worker's main request: messages with <regionK> and regions in pixels. What it feeds the model is
    exactly FerretProcessor.encode's output, and its answer is the output alone (no prompt echo)."""
    from ferret.serve.protocol import build_chat_payload, chat_messages

    model, processor = loaded
    image = make_image()
    turns = [{"from": "human", "value": "What is <region0>?"}]
    payload = build_chat_payload(chat_messages(turns, image, [[BOX]]), model="tiny-ferret", temperature=0.0,
                                 max_new_tokens=5)
    status, messages = post_stream(server.url, payload)
    assert status == 200, messages
    final = messages[-1]
    expected = processor.encode(turns, image, regions=[[BOX]], add_generation_prompt=True, truncate=False)
    assert final["usage"]["prompt_tokens"] == len(expected["input_ids"])
    with torch.no_grad():
        ids = model.generate(**processor.model_inputs(expected, model), max_new_tokens=5, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id,
                             eos_token_id=processor.tokenizer.eos_token_id)
    assert final["text"] == processor.tokenizer.decode(ids[0], skip_special_tokens=True)
    # the same question in the original's templated form gets the same answer
    legacy = build_generate_payload(BOX_PROMPT, [image], [BOX], temperature=0.0, max_new_tokens=5)
    assert post_stream(server.url, legacy)[1][-1]["text"] == BOX_PROMPT + final["text"]


@pytest.mark.parametrize("aspect", ["square_nocrop", "pad"])
def test_ui_api_and_worker_feed_the_model_the_same_inputs(loaded, aspect, monkeypatch):
    """One image and one conversation with a box, a point and a sketch through the web UI's request builder, the
    worker and the OpenAI API: identical input_ids and masks, equal to FerretProcessor.encode's."""
    gws = pytest.importorskip("ferret.serve.gradio_web_server")
    from ferret.serve.api import ChatServer
    from ferret.serve.protocol import build_chat_payload

    model, processor = loaded
    monkeypatch.setattr(processor, "image_aspect_ratio", aspect)
    image = make_image(80, 50)
    sketch = np.zeros((50, 80), bool)
    sketch[30:40, 50:70] = True
    drawn = [R.Box(5, 6, 40, 30), R.Point(60, 10), R.FreeForm(sketch)]
    ui_turns = [{"from": "human", "value": "Is [region2] left of [region0]?"},
                {"from": "gpt", "value": "No [10, 20, 300, 400]."},
                {"from": "human", "value": "And [region1]?"}]
    messages = gws.build_messages(ui_turns, drawn, image)
    expected = processor.encode(
        [{"from": "human", "value": "Is <region0> left of <region1>?"}, ui_turns[1],
         {"from": "human", "value": "And <region0>?"}],
        image, regions=[[drawn[2], drawn[0]], [], [drawn[1]]], add_generation_prompt=True, truncate=False)

    worker = ModelWorker(model, processor, "tiny-ferret", "http://127.0.0.1:1", None)
    via_worker, _, info = worker.prepare(build_chat_payload(messages, max_new_tokens=4))
    via_api = ChatServer(model, processor, "tiny-ferret").prepare({"messages": messages}, {})
    for features in (via_worker, via_api):
        assert torch.equal(features["input_ids"], expected["input_ids"])
        assert len(features["region_masks"]) == len(expected["region_masks"]) == 3
        for got, want in zip(features["region_masks"], expected["region_masks"], strict=True):
            assert torch.equal(got, want)
        assert torch.equal(features["images"], expected["images"])
    assert info["image_size"] == (80, 50)


def test_rle_bomb_gets_a_named_4xx_from_the_worker_in_milliseconds(server, worker):
    from ferret.serve.protocol import build_chat_payload, chat_messages

    bomb = rle_bomb()
    chat = build_chat_payload(chat_messages([{"from": "human", "value": "What is <region0>?"}], make_image(),
                                            [[bomb]]), max_new_tokens=2)
    legacy = build_generate_payload(BOX_PROMPT, [make_image()], [bomb], max_new_tokens=2)
    post_stream(server.url, build_generate_payload(BOX_PROMPT, [make_image()], [BOX], max_new_tokens=1))  # warm
    for payload, where in ((chat, "messages[0]: region 0 (mask)"), (legacy, "region 0 (mask)")):
        started = time.monotonic()
        status, messages = post_stream(server.url, payload)
        elapsed = time.monotonic() - started
        assert status == 422 and messages[0]["error_code"] == int(ErrorCode.BAD_REQUEST)
        assert messages[0]["text"].startswith(f"{where}: RLE 'size' is [H, W] = [1000000, 1000000] but the image "
                                              "is [48, 64]")
        assert elapsed < 1.0
    assert worker.limiter.in_flight == 0


def test_worker_api_key(loaded):
    model, processor = loaded
    worker = ModelWorker(model, processor, "tiny-ferret", "http://127.0.0.1:1", None, api_key="k-9")
    payload = build_generate_payload(BOX_PROMPT, [make_image()], [BOX], temperature=0.0, max_new_tokens=1)
    with TestClient(create_app(worker)) as client:
        for headers in ({}, {"Authorization": "Bearer k-8"}, {"Authorization": "k-9"}):
            reply = client.post("/worker_generate_stream", json=payload, headers=headers)
            assert reply.status_code == 401 and "API key" in reply.json()["text"]
        assert client.post("/worker_get_status").status_code == 200  # the controller reads it without the key
        reply = client.post("/worker_generate_stream", json=payload, headers={"Authorization": "Bearer k-9"})
        assert reply.status_code == 200 and list(iter_messages([reply.content]))[-1]["error_code"] == 0
    assert worker.limiter.in_flight == 0


def test_worker_presents_the_registration_secret(loaded):
    model, processor = loaded
    controller = Controller(heart_beat_expiration=30, register_secret="reg-1")
    with LoopbackServer(create_controller_app(controller)) as ctl:
        intruder = ModelWorker(model, processor, "tiny-ferret", "http://127.0.0.1:9", ctl.url)
        assert intruder.register_to_controller() is False and controller.workers() == {}
        worker = ModelWorker(model, processor, "tiny-ferret", "http://127.0.0.1:9", ctl.url, controller_secret="reg-1")
        try:
            assert worker.register_to_controller() is True
            assert worker.send_heart_beat() is True
        finally:
            worker.stop()
            intruder.stop()
    assert list(controller.workers()) == ["http://127.0.0.1:9"]


def test_help_is_fast_and_imports_nothing_heavy():
    """`--help` of the three servers must not import torch, transformers or fastapi (measured: well under 3 s)."""
    import subprocess
    import sys

    from serve_helpers import REPO, python_env

    for module in ("api", "controller", "model_worker"):
        code = (f"import sys, runpy; sys.argv = ['x', '--help']\n"
                f"try:\n    runpy.run_module('ferret.serve.{module}', run_name='__main__')\n"
                f"except SystemExit:\n    pass\n"
                f"print(sorted({{'torch', 'transformers', 'fastapi', 'gradio'}} & set(sys.modules)))")
        started = time.monotonic()
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=python_env(), capture_output=True, text=True,
                             timeout=60)
        elapsed = time.monotonic() - started
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().splitlines()[-1] == "[]", (module, out.stdout[-300:])
        assert "--region-feature" in out.stdout or module == "controller"
        assert elapsed < 10, f"{module} --help took {elapsed:.1f} s"  # < 3 s idle; room for a loaded machine
