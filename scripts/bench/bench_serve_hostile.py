"""What hostile requests cost a running OpenAI-compatible API server (a tiny random Ferret on 127.0.0.1).

Usage:
    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python scripts/bench/bench_serve_hostile.py [--body-mb 200]

It builds a tiny checkpoint in a temporary folder, starts ``python -m ferret.serve.api`` on a free loopback port,
and measures, from outside the server process:
  * a ``--body-mb`` body, sent with an honest Content-Length and again chunked (no length): the status, the time to
    the answer, how many bytes the client got to send, and the server's peak RSS (VmHWM) before and after;
  * the RLE bomb (a COCO RLE of a few hundred bytes declaring 10^6 x 10^6 pixels): status and response time
    (median of 5);
  * ``--help`` of the api, controller and model_worker modules: wall time of each.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The benchmarks' shared helpers, scripts/bench/synthetic.py, loaded by path from beside this file (registered in
# sys.modules before it runs, as its dataclasses need).
_SPEC = importlib.util.spec_from_file_location("bench_synthetic", Path(__file__).with_name("synthetic.py"))
S = sys.modules[_SPEC.name] = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(S)


def child_env() -> dict[str, str]:
    """This environment (so the children import the same ferret) without proxies, offline, one thread each."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vm(pid: int, key: str) -> int:
    """A /proc/<pid>/status field in KiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def oversized(port: int, total: int, chunked: bool) -> dict:
    piece = b"x" * (256 << 10)
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + (b"Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {total}\r\n\r\n".encode()))
    sent, reply = 0, b""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        try:
            while sent < total and not reply:
                try:
                    reply = sock.recv(65536)
                    break
                except BlockingIOError:
                    pass
                frame = (f"{len(piece):x}\r\n".encode() + piece + b"\r\n") if chunked else piece
                sock.setblocking(True)
                sock.sendall(frame)
                sock.setblocking(False)
                sent += len(piece)
            if chunked and not reply:  # the whole body went through: end it, or the server waits for more
                sock.setblocking(True)
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.setblocking(True)
        sock.settimeout(60)
        try:
            while b"\r\n\r\n" not in reply:
                data = sock.recv(65536)
                if not data:
                    break
                reply += data
        except (ConnectionResetError, TimeoutError):
            pass
    status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else 0
    return {"status": status, "seconds": round(time.monotonic() - started, 3), "client_sent_mb": round(sent / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--body-mb", type=int, default=200)
    args = parser.parse_args()
    import httpx

    from ferret.serve.protocol import encode_image

    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = S.save_tiny_checkpoint(Path(tmp) / "tiny-ferret", ["What is this? a red circle [1, 2, 3, 4]"] * 20)
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "ferret.serve.api", "--model-path", checkpoint, "--port",
                                   str(port), "--device", "cpu", "--log-level", "warning"],
                                  env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            with httpx.Client(trust_env=False, timeout=30) as client:
                while True:
                    try:
                        if client.get(f"{url}/health").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise SystemExit("the API server did not start")
                    time.sleep(0.2)
                results["server_rss_mib_idle"] = round(vm(server.pid, "VmRSS") / 1024, 1)
                results["server_peak_rss_mib_before"] = round(vm(server.pid, "VmHWM") / 1024, 1)
                total = args.body_mb << 20
                results[f"body_{args.body_mb}mb_content_length"] = oversized(port, total, chunked=False)
                results[f"body_{args.body_mb}mb_chunked"] = oversized(port, total, chunked=True)
                results["server_peak_rss_mib_after"] = round(vm(server.pid, "VmHWM") / 1024, 1)

                image = "data:image/png;base64," + encode_image(S.random_image())
                bomb = S.rle_bomb_region()
                results["rle_bomb_counts_bytes"] = len(bomb["rle"]["counts"])
                body = {"messages": [{"role": "user", "regions": [bomb],
                                      "content": [{"type": "text", "text": "What is <region0>?"},
                                                  {"type": "image_url", "image_url": {"url": image}}]}]}
                times, statuses = [], set()
                for _ in range(5):
                    started = time.monotonic()
                    reply = client.post(f"{url}/v1/chat/completions", json=body)
                    times.append(time.monotonic() - started)
                    statuses.add(reply.status_code)
                results["rle_bomb"] = {"statuses": sorted(statuses), "median_ms": round(statistics.median(times) * 1e3, 1),
                                       "message": reply.json()["error"]["message"], "server_alive": server.poll() is None}
        finally:
            server.terminate()
            server.wait(timeout=30)

    for module in ("api", "controller", "model_worker"):
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", f"ferret.serve.{module}", "--help"], env=child_env(),
                       stdout=subprocess.DEVNULL, check=True, timeout=120)
        results[f"help_seconds_{module}"] = round(time.monotonic() - started, 2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
