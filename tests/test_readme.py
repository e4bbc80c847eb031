"""The shell commands of README.md and EVAL.md, pasted as they are into bash (litgpt's test_readme), on a tiny demo.

Every fenced ``bash`` block runs, in order, in a scratch folder laid out like the repository after the Quickstart:
``.venv/bin/{python,ferret,pip,tensorboard,torchrun}`` run this interpreter on this checkout, ``experiments/``,
``recipes/`` and ``scripts/`` are the repository's. A comment line right before a block changes that:

* ``<!-- readme-test: skip (why) -->``: not run (real weights, data or GPUs), and the test says why;
* ``<!-- readme-test: shortened (how) -->``: run with the shortening of `SHORTENINGS`, documented options
  (``ferret demo --tiny``, ``STEPS=2``, ``--quick``) that make a long command take seconds.

Servers a block starts with ``&`` keep running for the next blocks of the same document (the API examples talk to
the API the serving block started) and are stopped at the end. The fixed ports of the docs are replaced by free ones.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serve_helpers import REPO, free_port

pytestmark = pytest.mark.slow

BLOCK = re.compile(r"(?:<!-- readme-test: (?P<mark>[^\n]*?) -->\n)?```bash\n(?P<body>.*?)^```", re.S | re.M)
PORTS = ("21001", "21002", "7860", "8000", "6006")
# (what a shortened block contains, what it becomes): each shortened block must match at least one.
SHORTENINGS = [
    (re.compile(r"(ferret demo)\b"), r"\1 --tiny"),
    (re.compile(r"^(bash experiments/tiny_cpu_train\.sh)", re.M), r"STEPS=2 \1"),
    (re.compile(r"(scripts/bench/bench_eval\.py)(?!\S)"), r"\1 --quick"),
]
BLOCK_TIMEOUT = 900  # seconds; the serving block loads a model in three processes


def blocks(document: str) -> list[tuple[str | None, str]]:
    """(marker, body) of every fenced bash block of ``document``, in order."""
    text = (REPO / document).read_text()
    return [(m.group("mark"), m.group("body")) for m in BLOCK.finditer(text)]


def shorten(body: str) -> str:
    changed = body
    for pattern, replacement in SHORTENINGS:
        changed = pattern.sub(replacement, changed)
    if changed == body:
        raise AssertionError(f"a block marked 'shortened' matches no known shortening:\n{body}")
    return changed


def test_every_block_is_found_and_marked_sensibly():
    for document in ("README.md", "EVAL.md"):
        found = blocks(document)
        assert found, document
        for mark, body in found:
            assert mark is None or mark.startswith(("skip (", "shortened (")), (document, mark)
            assert not re.search(r"(?m)^\s*python3? ", body), f"bare python in {document}:\n{body}"
            if mark is None:  # a block that runs cannot hold placeholders
                assert not re.search(r"<[a-z_]+>|\bCKPT\b", body), f"placeholders in a runnable block:\n{body}"
            if mark and mark.startswith("shortened"):
                shorten(body)
    assert shorten("ferret demo --quick") == "ferret demo --tiny --quick"


def _workspace(root: Path) -> None:
    """Lays ``root`` out like the repository after `make setup`."""
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    commands = {
        "python": [sys.executable],
        "ferret": [sys.executable, "-m", "ferret.cli"],
        "pip": [sys.executable, "-m", "pip"],
        "tensorboard": [sys.executable, "-m", "tensorboard.main"],
        "torchrun": [sys.executable, "-m", "torch.distributed.run"],
    }
    for name, argv in commands.items():
        script = bin_dir / name
        script.write_text("#!/bin/sh\nexec " + " ".join(f"'{a}'" for a in argv) + ' "$@"\n')
        script.chmod(0o755)
    for folder in ("experiments", "recipes", "scripts"):
        (root / folder).symlink_to(REPO / folder)


def _env() -> dict[str, str]:
    """The blocks' environment: this checkout on the path, no hub, no proxies, one thread."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1")
    return env


@pytest.mark.parametrize("document", ["README.md", "EVAL.md"])
def test_commands_run_when_pasted(document, tmp_path_factory):
    # EVAL.md's toy command reads the demo's outputs: both documents share one workspace, README first.
    root = tmp_path_factory.getbasetemp() / "readme_workspace"
    env = _env()
    if not root.exists():
        root.mkdir()
        _workspace(root)
        if document == "EVAL.md":  # run alone: make the demo outputs EVAL.md expects
            subprocess.run([str(root / ".venv/bin/ferret"), "demo", "--tiny"], cwd=root, env=env, check=True,
                           capture_output=True, timeout=BLOCK_TIMEOUT)
    ports = {port: str(free_port()) for port in PORTS}
    groups: list[int] = []
    skipped, failures = [], []
    try:
        for k, (mark, body) in enumerate(blocks(document)):
            first = body.strip().splitlines()[0]
            if mark and mark.startswith("skip"):
                skipped.append(f"{first[:60]}: {mark}")
                continue
            script = shorten(body) if mark else body
            for port, free in ports.items():
                script = re.sub(rf"(?<![\d.]){port}(?!\d)", free, script)
            log = root / f"{document}.block{k}.log"
            with open(log, "wb") as handle:
                process = subprocess.Popen(["bash", "-e", "-c", script], cwd=root, env=env, stdout=handle,
                                           stderr=subprocess.STDOUT, start_new_session=True)
            groups.append(process.pid)
            try:
                code = process.wait(timeout=BLOCK_TIMEOUT)
            except subprocess.TimeoutExpired:
                code = "timeout"
            if code != 0:
                failures.append(f"block {k} ({first}) exited {code}:\n{log.read_text()[-3000:]}")
    finally:
        for group in groups:
            try:
                os.killpg(group, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(1)
        for group in groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not failures, "\n\n".join(failures)
    print(f"{document}: skipped {len(skipped)} block(s):\n  " + "\n  ".join(skipped))

