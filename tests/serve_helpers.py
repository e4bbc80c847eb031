"""Shared pieces of the serving tests: a tiny checkpoint on disk, loopback servers, a scripted generate, and
subprocess handling. Everything listens on 127.0.0.1 and every wait is bounded."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(folder: Path, tokenizer_dir: str) -> str:
    """A tiny random Ferret (56 px images, 16 image tokens, context 512) saved as a loadable checkpoint."""
    from transformers import AutoTokenizer

    from ferret.model.configs import build_model, small
    from ferret.processing import FerretProcessor

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    processor = FerretProcessor(tokenizer, image_size=56, num_image_tokens=16, model_max_length=512)
    model = build_model(small(len(processor.tokenizer), region_token=processor.region_token_id)).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def make_image(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LoopbackServer:
    """A uvicorn server for ``app`` on 127.0.0.1 (ephemeral port) in a daemon thread; stopped on exit."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "loopback server did not start within 20 s"
            assert self.thread.is_alive(), "loopback server thread died"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
        assert not self.thread.is_alive(), "loopback server did not stop"


def scripted_generate(tokenizer, answer: str, calls: list | None = None, delay: float = 0.0):
    """A stand-in for ``model.generate`` that streams the tokens of ``answer`` then eos (honours max_new_tokens and
    stopping criteria). ``calls`` receives the keyword arguments of each call (to check images and masks)."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    def generate(input_ids=None, streamer=None, max_new_tokens=20, stopping_criteria=None, **kwargs):
        if calls is not None:
            calls.append({"input_ids": input_ids, **kwargs})
        if streamer is not None:
            streamer.put(input_ids)
        out: list[int] = []
        for token in ids[:max_new_tokens]:
            if delay:
                time.sleep(delay)
            out.append(token)
            if streamer is not None:
                streamer.put(torch.tensor([token]))
            if stopping_criteria is not None and bool(stopping_criteria(torch.tensor([out]), None).all()):
                break
        if streamer is not None:
            streamer.end()
        return torch.tensor([out])

    return generate


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", GRADIO_ANALYTICS_ENABLED="False",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(key, None)
    return env


def start_process(args: list[str], log: Path) -> subprocess.Popen:
    """``python -m ...`` in its own process group, output to ``log``."""
    handle = open(log, "wb")
    try:
        return subprocess.Popen([sys.executable, *args], cwd=REPO, env=python_env(), stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        handle.close()


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    """Stop ``process`` (and its group) and reap it."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1, process: subprocess.Popen | None = None,
             log: Path | None = None):
    """Poll ``predicate`` until it returns a truthy value; fail with ``what`` (and the log tail) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log is not None else ""
            raise AssertionError(f"{what}: the process exited with {process.returncode}\n{tail}")
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log is not None else ""
            raise AssertionError(f"{what}: not within {timeout} s\n{tail}")
        time.sleep(interval)


def http_ok(url: str, method: str = "GET", json: dict | None = None) -> dict | bool:
    try:
        with httpx.Client(trust_env=False, timeout=2) as client:
            reply = client.request(method, url, json=json)
            if reply.status_code != 200:
                return False
            try:
                return reply.json()
            except ValueError:
                return True
    except httpx.HTTPError:
        return False


def coco_rle_counts(runs: list[int]) -> str:
    """The compressed COCO RLE string of run lengths ``runs`` (pycocotools' format: 5-bit groups with a
    continuation bit, runs after the second stored as differences from the run two before)."""
    out = []
    for i, x in enumerate(runs):
        if i > 2:
            x -= runs[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def rle_bomb() -> dict:
    """A well-formed mask region declaring 10^6 x 10^6 pixels in a 146-byte counts string: 128 runs of
    7,812,500,000 pixels, which sum to exactly 10^12. Decoding it would allocate a terabyte."""
    counts = coco_rle_counts([7_812_500_000] * 128)
    assert len(counts) == 146
    return {"type": "mask", "rle": {"size": [1_000_000, 1_000_000], "counts": counts}}
