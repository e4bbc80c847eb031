"""The OpenAI-compatible API over loopback HTTP with a tiny random Ferret: /v1/models, chat completions plain and
streamed, regions in and out in pixels, image sources and their access rules, rejected inputs, the busy answer,
and (when the package is installed) the official ``openai`` client."""

import base64
import json
import os
import time

import httpx
import pytest
import torch
from serve_helpers import LoopbackServer, make_checkpoint, make_image, rle_bomb, scripted_generate, wait_for

from ferret import regions as R
from ferret.model.builder import load_pretrained_model
from ferret.serve.api import ChatServer, build_arg_parser, create_app
from ferret.serve.protocol import encode_image

W, H = 64, 48
ANSWER = "a red circle [100, 200, 500, 600] and a dot [700, 100]"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, tokenizer_dir):
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-ferret", tokenizer_dir)
    return load_pretrained_model(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    make_image().save(folder / "cat.png")
    (folder / "sub").mkdir()
    make_image(seed=1).save(folder / "sub" / "dog.jpg", format="JPEG")
    outside = tmp_path_factory.mktemp("secret")
    make_image(seed=2).save(outside / "secret.png")
    os.symlink(outside / "secret.png", folder / "link.png")
    return folder, outside


@pytest.fixture(scope="module")
def chat(loaded, image_dir):
    model, processor = loaded
    server = ChatServer(model, processor, "tiny-ferret", limit_model_concurrency=2,
                        allowed_image_dir=str(image_dir[0]))
    with LoopbackServer(create_app(server)) as running:
        running.chat_server = server
        yield running


def data_url(image) -> str:
    return "data:image/png;base64," + encode_image(image)


def question(image_url: str, text: str = "What is <region0>?", regions=None):
    message = {"role": "user", "content": [{"type": "text", "text": text},
                                           {"type": "image_url", "image_url": {"url": image_url}}]}
    if regions is not None:
        message["regions"] = regions
    return message


BOX = {"type": "box", "x1": 5, "y1": 5, "x2": 30, "y2": 30}


def post(chat, body, timeout=60):
    with httpx.Client(trust_env=False, timeout=timeout) as client:
        return client.post(f"{chat.url}/v1/chat/completions", json=body)


def sse_events(text: str) -> list:
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            payload = block[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# ----------------------------------------------------------------------------------------- basics


def test_models(chat):
    with httpx.Client(trust_env=False, timeout=10) as client:
        listing = client.get(f"{chat.url}/v1/models").json()
        assert listing["object"] == "list"
        assert [(m["id"], m["object"], m["owned_by"]) for m in listing["data"]] == [("tiny-ferret", "model", "ferret")]
        assert client.get(f"{chat.url}/v1/models/tiny-ferret").json()["id"] == "tiny-ferret"
        assert client.get(f"{chat.url}/v1/models/gpt-4").status_code == 404


def test_chat_completion_plain_and_streamed_agree(chat, loaded):
    body = {"model": "tiny-ferret", "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "system", "content": "ignored"}, question(data_url(make_image()), regions=[BOX])]}
    reply = post(chat, body)
    assert reply.status_code == 200, reply.text
    completion = reply.json()
    assert completion["object"] == "chat.completion" and completion["model"] == "tiny-ferret"
    (choice,) = completion["choices"]
    message = choice["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    assert isinstance(message["regions"], list) and isinstance(message["clean_text"], str)
    assert choice["finish_reason"] in ("stop", "length")
    _, processor = loaded
    encoded = processor.encode([{"from": "human", "value": "What is <region0>?"}], make_image(),
                               regions=[[R.Box(5, 5, 30, 30)]], add_generation_prompt=True)
    usage = completion["usage"]
    assert usage["prompt_tokens"] == len(encoded["input_ids"])
    assert 1 <= usage["completion_tokens"] <= 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    reply = post(chat, {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
    events = sse_events(reply.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == message["content"]  # greedy: the stream says exactly what the plain answer said
    last = [c for c in chunks if c["choices"]][-1]
    assert last["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert last["choices"][0]["delta"]["regions"] == message["regions"]
    assert chunks[-1]["usage"] == usage


def test_regions_in_and_out_in_pixels(chat, loaded, monkeypatch):
    model, processor = loaded
    calls = []
    monkeypatch.setattr(model, "generate", scripted_generate(processor.tokenizer, ANSWER, calls))
    point = {"type": "point", "x": 40, "y": 20}
    body = {"messages": [question(data_url(make_image()), "Compare <region0> with <region1>.", [BOX, point])]}
    message = post(chat, body).json()["choices"][0]["message"]
    assert message["content"] == ANSWER
    assert message["regions"] == [
        {"phrase": "a red circle", "type": "box", "x1": 6.0, "y1": 9.0, "x2": 32.0, "y2": 28.0},
        {"phrase": "a dot", "type": "point", "x": 44.0, "y": 4.0},
    ]
    assert message["clean_text"] == "a red circle and a dot"
    (call,) = calls
    box_mask, point_mask = call["region_masks"][0]
    assert torch.equal(box_mask, torch.from_numpy(R.region_mask(R.Box(5, 5, 30, 30), W, H)))
    assert torch.equal(point_mask, torch.from_numpy(R.region_mask(R.Point(40, 20), W, H)))
    assert point_mask.sum() == 11 * 11 and point_mask[20, 40]
    # the prompt carries the regions as grid coordinates followed by <region_fea>
    text = processor.tokenizer.decode([t for t in call["input_ids"][0].tolist() if t >= 0])
    # decoded ids: the original token stream has no "▁" before <region_fea>
    assert "[78, 104, 468, 625]<region_fea> with [625, 416]<region_fea> ." in text

    # a follow-up turn: the earlier answer goes back verbatim; new regions refer to the new message
    calls.clear()
    follow_up = {"messages": body["messages"] + [
        {"role": "assistant", "content": ANSWER, "regions": message["regions"]},
        {"role": "user", "content": "And <region0>?", "regions": [{"type": "point", "x": 1, "y": 1}]},
    ], "stream": True}
    events = sse_events(post(chat, follow_up).text)
    assert events[-2]["choices"][0]["delta"]["regions"][1] == {"phrase": "a dot", "type": "point", "x": 44.0,
                                                                "y": 4.0}
    (call,) = calls
    assert len(call["region_masks"][0]) == 3  # two from the first question, one from the follow-up


def test_stop_strings(chat, loaded, monkeypatch):
    model, processor = loaded
    monkeypatch.setattr(model, "generate", scripted_generate(processor.tokenizer, "one two. three"))
    body = {"messages": [{"role": "user", "content": "Count."}], "stop": ["."]}
    completion = post(chat, body).json()
    assert completion["choices"][0]["message"]["content"] == "one two"
    assert completion["choices"][0]["finish_reason"] == "stop"
    events = sse_events(post(chat, {**body, "stream": True}).text)
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert content == "one two"


# ----------------------------------------------------------------------------------------- images


def test_image_paths_only_under_the_allowed_folder(chat, image_dir, monkeypatch, loaded):
    model, processor = loaded
    monkeypatch.setattr(model, "generate", scripted_generate(processor.tokenizer, "ok"))
    folder, outside = image_dir
    allowed = [str(folder / "cat.png"), "cat.png", "sub/dog.jpg", f"file://{folder / 'cat.png'}", "sub/../cat.png"]
    for url in allowed:
        reply = post(chat, {"messages": [question(url, "Describe the image.")]})
        assert reply.status_code == 200, (url, reply.text)
    forbidden = [str(outside / "secret.png"), "../" + outside.name + "/secret.png", "link.png",
                 f"file://{outside / 'secret.png'}", "/etc/passwd"]
    for url in forbidden:
        reply = post(chat, {"messages": [question(url, "Describe the image.")]})
        assert reply.status_code == 403, (url, reply.text)
        assert reply.json()["error"]["type"] == "permission_error"
    reply = post(chat, {"messages": [question("missing.png", "Describe the image.")]})
    assert reply.status_code == 400 and "does not exist" in reply.json()["error"]["message"]
    reply = post(chat, {"messages": [question("https://example.com/cat.png", "Describe the image.")]})
    assert reply.status_code == 400 and "not fetched" in reply.json()["error"]["message"]


def test_paths_refused_without_an_allowed_folder(loaded, image_dir):
    model, processor = loaded
    server = ChatServer(model, processor, "tiny-ferret")
    with LoopbackServer(create_app(server)) as running:
        reply = post(running, {"messages": [question(str(image_dir[0] / "cat.png"), "Describe the image.")]})
    assert reply.status_code == 403 and "--allowed-image-dir" in reply.json()["error"]["message"]


def test_bad_requests(chat):
    image = data_url(make_image())
    corrupt = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20).decode()
    cases = [
        ({"messages": [question(corrupt, regions=[BOX])]}, 400, "corrupt"),
        ({"messages": [question(image, regions=[{**BOX, "x2": 65}])]}, 400, "lies outside the image of 64x48"),
        ({"messages": [question(image, regions=[{"type": "point", "x": -1, "y": 3}])]}, 400, "lies outside"),
        ({"messages": [question(image, "Describe.", regions=[BOX])]}, 400, "region 0 is not referred to"),
        ({"messages": [question(image, "What is <region1>?", regions=[BOX])]}, 400,
         "<region1> refers to region 1 but the message has 1 region(s)"),
        ({"messages": [{"role": "user", "content": "x", "regions": [BOX]}]}, 400, "no image"),
        ({"messages": [question(image, "dog " * 400)]}, 400, "no room to generate"),
        ({"messages": []}, 400, "non-empty"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "alternate"),
        ({"messages": [question(image, "x"), {"role": "user", "content": "y"}]}, 400, "alternate"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, 400, "'temperature'"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "'max_tokens'"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n=1"),
        ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"}, 404, "not found"),
    ]
    for body, status, text in cases:
        reply = post(chat, body)
        assert reply.status_code == status, (body.get("messages"), reply.text)
        assert text in reply.json()["error"]["message"], reply.json()
    long_prompt = post(chat, {"messages": [question(image, "dog " * 400)]}).json()["error"]
    assert long_prompt["code"] == "context_length_exceeded"
    assert chat.chat_server.limiter.in_flight == 0


def test_busy_answers_429_and_frees_the_slot(chat, loaded, monkeypatch):
    model, processor = loaded
    monkeypatch.setattr(model, "generate", scripted_generate(processor.tokenizer, "dog " * 100, delay=0.05))
    server = chat.chat_server
    body = {"messages": [{"role": "user", "content": "Talk."}], "stream": True, "max_tokens": 500}
    with httpx.Client(trust_env=False, timeout=60) as a, httpx.Client(trust_env=False, timeout=60) as b:
        with a.stream("POST", f"{chat.url}/v1/chat/completions", json=body) as first, \
                b.stream("POST", f"{chat.url}/v1/chat/completions", json=body) as second:
            assert first.status_code == second.status_code == 200
            assert server.limiter.in_flight == 2
            start = time.monotonic()
            busy = post(chat, {**body, "stream": False})
            assert time.monotonic() - start < 5
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["code"] == "server_busy"
    wait_for(lambda: server.limiter.in_flight == 0, 10, "slots released after the clients hung up")


# ----------------------------------------------------------------------------------------- openai client


def test_official_openai_client(chat, loaded, monkeypatch):
    openai = pytest.importorskip("openai")
    model, processor = loaded
    monkeypatch.setattr(model, "generate", scripted_generate(processor.tokenizer, ANSWER))
    client = openai.OpenAI(base_url=f"{chat.url}/v1", api_key="unused", max_retries=0, timeout=60,
                           http_client=httpx.Client(trust_env=False))
    try:
        assert [m.id for m in client.models.list()] == ["tiny-ferret"]
        messages = [question(data_url(make_image()), regions=[BOX])]
        completion = client.chat.completions.create(model="tiny-ferret", messages=messages, max_tokens=200)
        message = completion.choices[0].message
        assert message.content == ANSWER
        assert message.model_extra["regions"][0]["phrase"] == "a red circle"
        stream = client.chat.completions.create(model="tiny-ferret", messages=messages, max_tokens=200, stream=True)
        pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
        assert "".join(pieces) == ANSWER
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny-ferret", messages=[question("data:image/png;base64,AAAA")])
    finally:
        client.close()


def test_cli_defaults():
    args = build_arg_parser().parse_args(["--model-path", "m"])
    assert (args.host, args.port, args.allowed_image_dir, args.limit_model_concurrency) == ("127.0.0.1", 8000, None, 5)


def test_image_decoding_of_jpeg_path_keeps_pixels(chat, image_dir, loaded, monkeypatch):
    model, processor = loaded
    calls = []
    monkeypatch.setattr(model, "generate", scripted_generate(processor.tokenizer, "ok", calls))
    post(chat, {"messages": [question("cat.png", "Describe the image.")]})
    expected = processor.preprocess_image(make_image())
    assert torch.allclose(calls[0]["images"][0], expected)


# ----------------------------------------------------------------------------------------- hostile clients


def complete(reply: bytes) -> bool:
    """Whether ``reply`` holds a whole HTTP response (headers and a Content-Length body)."""
    head, sep, body = reply.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return True


def raw_request(url: str, head: bytes, chunks, timeout: float = 20.0) -> tuple[int, bytes, int]:
    """Send ``head`` and then ``chunks`` on a raw socket, stopping as soon as the server answers or closes.
    Returns (status, reply, bytes of the body actually sent)."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    sent = 0
    with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        reply = b""
        try:
            for chunk in chunks:
                try:
                    reply += sock.recv(65536)
                except BlockingIOError:
                    pass
                if reply:
                    break
                sock.setblocking(True)
                sock.sendall(chunk)
                sent += len(chunk)
                sock.setblocking(False)
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.setblocking(True)
        sock.settimeout(timeout)
        try:
            while not complete(reply):
                data = sock.recv(65536)
                if not data:
                    break
                reply += data
        except (ConnectionResetError, TimeoutError):
            pass
    status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else 0
    return status, reply, sent


def test_body_size_limit_is_enforced_while_reading(loaded):
    """A 200 MB body is refused after the first megabyte or so: never read, never buffered whole."""
    model, processor = loaded
    server = ChatServer(model, processor, "tiny-ferret", max_body_bytes=1 << 20)
    total = 200 << 20
    piece = b"x" * (256 << 10)
    with LoopbackServer(create_app(server)) as running:
        for head in (
            # an honest Content-Length is refused before a byte of the body is read ...
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {total}\r\n\r\n".encode(),
            # ... and a chunked body (no length announced) as soon as it passes the limit
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
        ):
            chunked = b"chunked" in head
            frames = ((f"{len(piece):x}\r\n".encode() + piece + b"\r\n") if chunked else piece
                      for _ in range(total // len(piece)))
            started = time.monotonic()
            status, reply, sent = raw_request(running.url, head, frames)
            assert status == 413, reply[:300]
            assert b"larger than the limit" in reply or b"the limit is 1048576" in reply
            assert sent <= 16 << 20, f"the client had to send {sent} bytes before the refusal"
            assert time.monotonic() - started < 10
        # the server is still there and serves
        assert post(running, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}).status_code == 200


def test_only_json_bodies_are_read(chat):
    """A web page can POST text/plain (or a form) to a loopback server without a preflight: refuse it (415)."""
    body = json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1})
    with httpx.Client(trust_env=False, timeout=30) as client:
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=a",
                             None):
            headers = {"Content-Type": content_type} if content_type else {}
            reply = client.post(f"{chat.url}/v1/chat/completions", content=body, headers=headers)
            assert reply.status_code == 415, (content_type, reply.text)
            error = reply.json()["error"]
            assert error["type"] == "invalid_request_error" and "application/json" in error["message"]
        reply = client.post(f"{chat.url}/v1/chat/completions", content=body,
                            headers={"Content-Type": "application/json; charset=utf-8"})
        assert reply.status_code == 200, reply.text


def test_wrong_types_nesting_and_surrogates_get_400_in_openai_shape(chat):
    text_only = [{"role": "user", "content": "x"}]
    cases = [
        ({"messages": text_only, "stream": True, "stream_options": "yes"}, "'stream_options' must be an object"),
        ({"messages": text_only, "stream": True, "stream_options": [1]}, "'stream_options' must be an object"),
        ({"messages": text_only, "stream": True, "stream_options": {"include_usage": "x"}}, "include_usage"),
        ({"messages": text_only, "stream": "yes"}, "'stream' must be a boolean"),
    ]
    for body, text in cases:
        reply = post(chat, body)
        assert reply.status_code == 400 and text in reply.json()["error"]["message"], reply.text
    with httpx.Client(trust_env=False, timeout=30) as client:
        def send(raw: bytes) -> httpx.Response:
            return client.post(f"{chat.url}/v1/chat/completions", content=raw,
                               headers={"Content-Type": "application/json"})

        started = time.monotonic()
        deep = send(b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
        assert deep.status_code == 400 and "nested" in deep.json()["error"]["message"]
        nested: list = []
        for _ in range(40):  # within what json parses, beyond the 32 levels a request may nest
            nested = [nested]
        shallow_but_deep = send(json.dumps({"messages": text_only, "metadata": nested}).encode())
        assert shallow_but_deep.status_code == 400 and "nested more than 32" in shallow_but_deep.text
        assert time.monotonic() - started < 5
        surrogate = send(b'{"messages": [{"role": "user", "content": "caf\\ud800e"}], "max_tokens": 1}')
        assert surrogate.status_code == 400
        assert "messages[0].content contains a lone surrogate" in surrogate.json()["error"]["message"]
        in_part = send(b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}')
        assert in_part.status_code == 400 and "content[0].text" in in_part.json()["error"]["message"]
        in_stop = send(b'{"messages": [{"role": "user", "content": "x"}], "stop": ["\\ud800"]}')
        assert in_stop.status_code == 400 and in_stop.json()["error"]["param"] == "stop"
        in_model = send(b'{"messages": [{"role": "user", "content": "x"}], "model": "\\ud800"}')
        assert in_model.status_code == 404  # quoted back in the error without breaking its encoding
        not_utf8 = send(b'{"messages": "\xff"}')
        assert not_utf8.status_code == 400
    assert chat.chat_server.limiter.in_flight == 0


def test_rle_bomb_is_refused_in_milliseconds(chat):
    """An RLE declaring 10^6 x 10^6 pixels in 148 bytes is refused from its declared size, before decoding."""
    bomb = rle_bomb()
    body = {"messages": [question(data_url(make_image()), regions=[bomb])], "max_tokens": 1}
    post(chat, {"messages": [{"role": "user", "content": "warm up"}], "max_tokens": 1})
    started = time.monotonic()
    reply = post(chat, body)
    elapsed = time.monotonic() - started
    assert reply.status_code == 400, reply.text
    message = reply.json()["error"]["message"]
    assert message == ("messages[0]: region 0 (mask): RLE 'size' is [H, W] = [1000000, 1000000] but the image is "
                       "[48, 64]; a mask must have the image's size")
    assert elapsed < 1.0  # milliseconds of work; the bound leaves room for a loaded machine
    # counts that cannot describe the declared size are refused before decoding too
    lying = {"type": "mask", "rle": {"size": [H, W], "counts": [1] * (W * H + 2)}}
    reply = post(chat, {"messages": [question(data_url(make_image()), regions=[lying])]})
    assert reply.status_code == 400 and "more than a 48x64 mask can hold" in reply.json()["error"]["message"]
    fractional = {"type": "mask", "rle": {"size": [H, W], "counts": [3000.5, W * H - 3000.5]}}
    reply = post(chat, {"messages": [question(data_url(make_image()), regions=[fractional])]})
    assert reply.status_code == 400 and "'counts'[0] must be a non-negative integer" in reply.text


def test_api_key_is_checked_as_openai_clients_send_it(loaded):
    openai = pytest.importorskip("openai")
    model, processor = loaded
    server = ChatServer(model, processor, "tiny-ferret", api_key="sk-local-123")
    with LoopbackServer(create_app(server)) as running, httpx.Client(trust_env=False, timeout=30) as client:
        body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-local-123"},
                        {"Authorization": "Basic sk-local-123"}):
            for method, path, kwargs in (("POST", "/v1/chat/completions", {"json": body}), ("GET", "/v1/models", {})):
                reply = client.request(method, f"{running.url}{path}", headers=headers, **kwargs)
                assert reply.status_code == 401, (headers, path)
                assert reply.json()["error"]["code"] == "invalid_api_key"
                assert reply.headers["www-authenticate"] == "Bearer"
        good = {"Authorization": "Bearer sk-local-123"}
        assert client.post(f"{running.url}/v1/chat/completions", json=body, headers=good).status_code == 200
        assert client.get(f"{running.url}/health").status_code == 200  # liveness stays open
        wrong = openai.OpenAI(base_url=f"{running.url}/v1", api_key="nope", max_retries=0, timeout=30,
                              http_client=httpx.Client(trust_env=False))
        right = openai.OpenAI(base_url=f"{running.url}/v1", api_key="sk-local-123", max_retries=0, timeout=30,
                              http_client=httpx.Client(trust_env=False))
        try:
            with pytest.raises(openai.AuthenticationError):
                wrong.models.list()
            assert [m.id for m in right.models.list()] == ["tiny-ferret"]
        finally:
            wrong.close()
            right.close()


def test_region_features_follow_the_checkpoint(loaded, monkeypatch):
    """No flag: a checkpoint with a region sampler gets <region_fea> and a mask per region; the flag overrides."""
    model, processor = loaded
    assert model.config.region_geo_sampler
    message = question(data_url(make_image()), regions=[BOX])
    on = ChatServer(model, processor, "t").prepare({"messages": [message]}, {})
    off = ChatServer(model, processor, "t", region_feature=False).prepare({"messages": [message]}, {})
    assert len(on["region_masks"]) == 1 and (on["input_ids"] == processor.region_token_id).sum() == 1
    assert off["region_masks"] == [] and (off["input_ids"] == processor.region_token_id).sum() == 0
    monkeypatch.setattr(model.config, "region_geo_sampler", False)
    assert ChatServer(model, processor, "t").region_feature is False
    assert ChatServer(model, processor, "t", region_feature=True).region_feature is True
    for flags, expected in (([], None), (["--add_region_feature"], True), (["--region-feature"], True),
                            (["--no-region-feature"], False), (["--no_region_feature"], False)):
        assert build_arg_parser().parse_args(["--model-path", "m", *flags]).region_feature is expected
    with pytest.raises(SystemExit):
        build_arg_parser().parse_args(["--model-path", "m", "--region-feature", "--no-region-feature"])
