"""Training survives faults around its checkpoints: killed during or between checkpoint writes, or with the newest
checkpoint's files torn afterwards, a restart resumes from the newest intact checkpoint, reaches the uninterrupted
run's losses, and ``final-checkpoint`` always loads.

A tiny model trains 8 steps with a checkpoint every 2. Kills inside the process raise `Killed` (a BaseException
nothing in the stack catches) at a chosen point; one case SIGKILLs a child process instead, so no Python cleanup
runs at all.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from ferret.model.checkpoint import MANIFEST_NAME, folder_problems
from ferret.train.trainer import checkpoint_problems, latest_checkpoint

REPO = Path(__file__).resolve().parents[2]
STEPS, EVERY = 8, 2


class Killed(BaseException):
    """A crash at a chosen point (BaseException: no `except Exception` on the way can swallow it)."""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from ferret.data.toy import make_world, train_toy_tokenizer, world_corpus

    root = tmp_path_factory.mktemp("faults_world")
    splits = make_world(root, num_train=32, num_val=0, num_test=0, image_size=56, seed=0)
    train_toy_tokenizer(root / "tokenizer", world_corpus(splits["train"]), vocab_size=400)
    return root


def run_args(world, out):
    return ["--init_config", "small", "--tokenizer_path", str(world / "tokenizer"), "--data_path",
            str(world / "train.json"), "--image_folder", str(world), "--dataset_type", "toy", "--output_dir",
            str(out), "--model_max_length", "256", "--logging_steps", "1", "--seed", "0", "--report_to", "none",
            "--use_cpu", "True", "--max_steps", str(STEPS), "--save_steps", str(EVERY),
            "--per_device_train_batch_size", "4", "--learning_rate", "3e-3"]


def losses(out) -> dict[int, float]:
    history = json.loads((Path(out) / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    from ferret.train.train import main

    out = tmp_path_factory.mktemp("faults_reference") / "run"
    assert main(run_args(world, out)) == 0
    return out


def assert_recovered(out, reference):
    """The resumed run logged the reference's losses and its final-checkpoint loads with the reference's weights."""
    from ferret.model.builder import load_pretrained_model

    got, expected = losses(out), losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step
    final = out / "final-checkpoint"
    assert folder_problems(str(final)) == []  # its manifest matches every file
    model, _ = load_pretrained_model(str(final), device="cpu")
    want, _ = load_pretrained_model(str(reference / "final-checkpoint"), device="cpu")
    state, expected_state = model.state_dict(), want.state_dict()
    assert state.keys() == expected_state.keys()
    for key in expected_state:
        torch.testing.assert_close(state[key], expected_state[key], atol=1e-5, rtol=0, msg=key)
    assert (final / MANIFEST_NAME).is_file() and not (final / "optimizer.pt").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith("tmp-")]


# ------------------------------------------------------------------------------------------ kills inside the run
def _kill_in_torch_save(monkeypatch, step: int, name: str):
    """HF writes `name` of checkpoint-`step` half-way, then the process dies."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        if isinstance(f, (str, os.PathLike)) and str(f).endswith(name) and f"checkpoint-{step}" in str(f):
            size = os.path.getsize(f)
            with open(f, "r+b") as handle:
                handle.truncate(size // 2)
            raise Killed(f"while writing {f}")

    monkeypatch.setattr(torch, "save", save)


def _kill_around(monkeypatch, module, name: str, when: str, match: str = ""):
    """Die before or after `module.name(path, ...)` is called on a path containing `match`."""
    real = getattr(module, name)

    def wrapped(path, *args, **kwargs):
        if match in str(path) and when == "before":
            raise Killed(f"before {name}({path})")
        result = real(path, *args, **kwargs)
        if match in str(path) and when == "after":
            raise Killed(f"after {name}({path})")
        return result

    monkeypatch.setattr(module, name, wrapped)


def _kill_at_step(monkeypatch, step: int):
    from ferret.train.trainer import FerretTrainer

    real = FerretTrainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step == step:
            raise Killed(f"between checkpoints, at step {step + 1}")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FerretTrainer, "training_step", training_step)


KILL_POINTS = {
    # during a checkpoint write
    "optimizer.pt half-written (step 6)": lambda mp: _kill_in_torch_save(mp, 6, "optimizer.pt"),
    "files written, no manifest yet (step 6)": lambda mp: _kill_around(
        mp, __import__("ferret.train.trainer", fromlist=["x"]), "write_manifest", "before", "checkpoint-6"),
    "manifest written, run folder not yet synced (step 8)": lambda mp: _kill_around(
        mp, __import__("ferret.train.trainer", fromlist=["x"]), "write_manifest", "after", "checkpoint-8"),
    "sealed, run folder not yet synced (step 4)": lambda mp: _kill_around(
        mp, __import__("ferret.train.trainer", fromlist=["x"]), "fsync_path", "before", ""),
    "weights written, optimizer not yet (step 6)": lambda mp: _kill_in_torch_save(mp, 6, "training_args.bin"),
    # between checkpoint writes
    "between checkpoints (step 5)": lambda mp: _kill_at_step(mp, 5),
    "after the last checkpoint, before final-checkpoint": lambda mp: _kill_around(
        mp, __import__("ferret.train.train", fromlist=["x"]), "write_manifest", "before", "final-checkpoint"),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_run_resumes_to_the_same_losses_and_a_loadable_final(point, world, reference, tmp_path,
                                                                    monkeypatch):
    from ferret.train.train import main

    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        KILL_POINTS[point](mp)
        with pytest.raises(Killed):
            main(run_args(world, out))
    assert not (out / "final-checkpoint").exists()
    latest = latest_checkpoint(str(out))
    assert latest is None or checkpoint_problems(latest) == []
    assert main(run_args(world, out)) == 0
    assert_recovered(out, reference)


def test_sigkill_during_a_checkpoint_write(world, reference, tmp_path):
    """A child process SIGKILLs itself (no cleanup at all, unlike the in-process kills above) with optimizer.pt of
    checkpoint-4 a third written; the restart resumes from checkpoint-2 and reaches the reference."""
    script = textwrap.dedent("""
        import os, signal, sys, torch
        from ferret.train.train import main
        real_save = torch.save
        def save(obj, f, *a, **k):
            real_save(obj, f, *a, **k)
            if str(f).endswith(os.path.join("checkpoint-4", "optimizer.pt")):
                os.truncate(f, os.path.getsize(f) // 3)
                os.kill(os.getpid(), signal.SIGKILL)
        torch.save = save
        sys.exit(main(sys.argv[1:]))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    child = subprocess.run([sys.executable, "-c", script, *run_args(world, out)], env=env, capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    assert (out / "checkpoint-4" / "optimizer.pt").is_file() and not (out / "checkpoint-4" / MANIFEST_NAME).exists()
    assert latest_checkpoint(str(out)) == str(out / "checkpoint-2")
    from ferret.train.train import main

    assert main(run_args(world, out)) == 0
    assert_recovered(out, reference)


# ------------------------------------------------------------------------------------------ torn checkpoints
def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


TEARS = {
    "truncated optimizer.pt": lambda c: _truncate(c / "optimizer.pt"),
    "0-byte model.safetensors": lambda c: (c / "model.safetensors").write_bytes(b""),
    "one flipped byte in the weights": lambda c: _flip_byte(c / "model.safetensors"),
    "missing scheduler.pt": lambda c: (c / "scheduler.pt").unlink(),
    # a folder without a manifest (other tools, older versions) is checked by format
    "no manifest, truncated optimizer.pt": lambda c: ((c / MANIFEST_NAME).unlink(), _truncate(c / "optimizer.pt")),
    "no manifest, 0-byte model.safetensors": lambda c: ((c / MANIFEST_NAME).unlink(),
                                                        (c / "model.safetensors").write_bytes(b"")),
}


@pytest.mark.parametrize("tear", list(TEARS))
@pytest.mark.parametrize("newest", [6, 8])
def test_torn_newest_checkpoint_is_named_and_the_newest_intact_one_used(tear, newest, world, reference, tmp_path,
                                                                        caplog):
    """The run died (or its disk tore files) with checkpoint-`newest` torn; 8 is the LAST step, which used to be
    published as an unloadable final-checkpoint."""
    from ferret.train.train import main

    out = tmp_path / "run"
    out.mkdir()
    for step in range(EVERY, newest + 1, EVERY):
        shutil.copytree(reference / f"checkpoint-{step}", out / f"checkpoint-{step}")
    torn = out / f"checkpoint-{newest}"
    TEARS[tear](torn)
    assert checkpoint_problems(str(torn))
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(str(out)) == str(out / f"checkpoint-{newest - EVERY}")
        assert main(run_args(world, out)) == 0
    assert f"skipping the torn or incomplete checkpoint {torn}" in caplog.text
    assert_recovered(out, reference)
    assert checkpoint_problems(str(torn)) == []  # saved again by the resumed run


def test_a_torn_checkpoint_given_explicitly_is_refused_by_name(world, reference, tmp_path):
    from ferret.train.train import main

    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoint-4", out / "checkpoint-4")
    _truncate(out / "checkpoint-4" / "optimizer.pt")
    with pytest.raises(ValueError, match=r"checkpoint-4 cannot be resumed from: optimizer.pt is \d+ bytes, the "
                                         r"manifest says \d+"):
        main(run_args(world, out) + ["--resume_from_checkpoint", str(out / "checkpoint-4")])


def test_final_checkpoint_that_does_not_load_is_never_published(tmp_path):
    from ferret.train.train import publish_model_folder

    staging, final = tmp_path / "tmp-final-checkpoint", tmp_path / "final-checkpoint"
    staging.mkdir()
    final.mkdir()
    (final / "config.json").write_text("{}")
    (staging / "config.json").write_text("{}")
    (staging / "model.safetensors").write_bytes(b"")
    with pytest.raises(RuntimeError, match="refusing to publish .*final-checkpoint.*model.safetensors is 0 bytes"):
        publish_model_folder(str(staging), str(final))
    assert sorted(p.name for p in final.iterdir()) == ["config.json"]  # the previous final stays
