"""The command-line chat: one-shot answers with regions in pixels, --save-image, and the interactive loop on stdin;
in-process with a scripted answer (exact output) and as real ``python -m ferret.serve.cli`` processes."""

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from serve_helpers import REPO, make_checkpoint, make_image, python_env, scripted_generate

from ferret import regions as R
from ferret.model.builder import load_pretrained_model
from ferret.serve import cli

ANSWER = "a red circle [100, 200, 500, 600] and a dot [700, 100]"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-ferret", tokenizer_dir)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_pretrained_model(checkpoint, device="cpu")


@pytest.fixture()
def image_file(tmp_path):
    path = tmp_path / "image.png"
    make_image().save(path)
    return path


def run_cli(loaded, argv, stdin_text=""):
    model, processor = loaded
    args = cli.build_arg_parser().parse_args(["--model-path", "unused", *argv])
    out = io.StringIO()
    status = cli.run(args, model, processor, stdin=io.StringIO(stdin_text), out=out)
    return status, out.getvalue()


def test_one_shot_prints_answer_and_regions_in_pixels(loaded, image_file, tmp_path, monkeypatch):
    model, processor = loaded
    calls = []
    monkeypatch.setattr(model, "generate", scripted_generate(processor.tokenizer, ANSWER, calls))
    mask = np.zeros((48, 64), dtype=np.uint8)
    mask[30:40, 10:20] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    saved = tmp_path / "out.png"
    status, output = run_cli(loaded, [
        "--image-file", str(image_file), "--query", "Compare <region0>, <region1> and <region2>.",
        "--region", "box:5,5,30,30", "--region", "point:40,20", "--region", f"mask:{tmp_path / 'mask.png'}",
        "--save-image", str(saved)])
    assert status == 0
    assert output.splitlines() == [
        ANSWER,
        "a red circle\tbox\t6,9,32,28",
        "a dot\tpoint\t44,4",
    ]
    (call,) = calls
    box, point, free = call["region_masks"][0]
    assert torch.equal(box, torch.from_numpy(R.region_mask(R.Box(5, 5, 30, 30), 64, 48)))
    assert torch.equal(point, torch.from_numpy(R.region_mask(R.Point(40, 20), 64, 48)))
    assert torch.equal(free, torch.from_numpy(mask > 0))
    with Image.open(saved) as drawn:
        # drawn on a 10x copy (48 px * 10 >= 448) framed by a margin, the 5 labels in a legend under it
        assert drawn.format == "PNG" and drawn.width > 640 and drawn.height > 480 + 5 * 12
        pixels = np.asarray(drawn.convert("RGB")).astype(int)
    margin = (drawn.width - 640) // 2
    picture = pixels[margin:margin + 480, margin:margin + 640]
    original = np.kron(np.asarray(make_image()).astype(int), np.ones((10, 10, 1), int))
    changed = (picture != original).any(axis=2)
    assert changed[90, 60:330].mean() > 0.9  # the answer's box (6, 9)-(32, 28), top edge at y = 9 * 10
    assert not changed[200:260, 100:300].any()  # inside that box nothing is drawn: the labels are in the legend


def test_polygon_scribble_and_bracket_placeholders(loaded, image_file, monkeypatch):
    model, processor = loaded
    calls = []
    monkeypatch.setattr(model, "generate", scripted_generate(processor.tokenizer, "ok", calls))
    status, _ = run_cli(loaded, [
        "--image-file", str(image_file), "--query", "Is [region0] next to <region1>?",
        "--region", "polygon:10,10,30,10,20,30", "--region", "scribble:2,40,20,40"])
    assert status == 0
    polygon, scribble = calls[0]["region_masks"][0]
    assert torch.equal(polygon, torch.from_numpy(R.FreeForm.from_polygon([(10, 10), (30, 10), (20, 30)], 64, 48).mask.copy()))
    # a 5 px wide stroke from (2, 40) to (20, 40) with round ends: rows 38..42, columns 0..22
    rows, cols = np.nonzero(scribble.numpy())
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (38, 42, 0, 22)
    text = processor.tokenizer.decode([t for t in calls[0]["input_ids"][0].tolist() if t >= 0])
    assert text.count("<region_fea>") == 2 and "[region0]" not in text


def test_missing_model_or_file_is_one_line(tmp_path, image_file, monkeypatch):
    env = python_env()
    for argv, expected in (
            (["--model-path", "runs/nothing/checkpoint", "--image-file", str(image_file)], "no such folder"),
            (["--model-path", str(tmp_path), "--image-file", str(image_file)], "has no config.json"),
            (["--model-path", str(tmp_path), "--image-file", str(tmp_path / "none.png")], "has no config.json")):
        done = subprocess.run([sys.executable, "-m", "ferret.serve.cli", *argv, "--query", "q"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and expected in done.stderr, done.stderr
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert cli.model_path_problem("org/name") is None  # left to the hub when it is not offline...
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE" in cli.model_path_problem("org/name")  # ... and named when it is


def test_bad_region_arguments_exit_2(loaded, image_file, capsys):
    for spec in ("box:1,2,3", "circle:1,2", "box:1,2,300,4", "point:a,b", "polygon:1,2,3,4", "scribble:1,2,3",
                 "scribble:1,2,100,2"):
        status, _ = run_cli(loaded, ["--image-file", str(image_file), "--query", "q <region0>", "--region", spec])
        assert status == 2, spec
    assert "box needs 4 numbers" in capsys.readouterr().err
    status, _ = run_cli(loaded, ["--image-file", "/nonexistent.png", "--query", "q"])
    assert status == 2


def test_interactive_multi_turn(loaded, image_file, monkeypatch):
    model, processor = loaded
    calls = []
    monkeypatch.setattr(model, "generate", scripted_generate(processor.tokenizer, ANSWER, calls))
    script = "\n".join([
        "/box 5,5,30,30",
        "What is <region0>?",
        "/point 3,4",
        "/box 1,2,3",  # malformed: reported, the chat goes on
        "And <region0>?",
        "/help",
        "exit",
        "never read",
    ]) + "\n"
    status, output = run_cli(loaded, ["--image-file", str(image_file)], script)
    assert status == 0
    assert output.count("ASSISTANT: " + ANSWER) == 2
    assert "error: box needs 4 numbers" in output and "/point x,y" in output
    assert output.count("USER: ") == 7  # one prompt per line read up to and including "exit"
    first, second = calls
    assert len(first["region_masks"][0]) == 1
    assert len(second["region_masks"][0]) == 2  # the first question's box and the follow-up's point
    text = processor.tokenizer.decode([t for t in second["input_ids"][0].tolist() if t >= 0])
    assert text.count(ANSWER) == 1  # the first answer is part of the second prompt


def test_interactive_end_of_input_and_clear(loaded, image_file, monkeypatch):
    model, processor = loaded
    calls = []
    monkeypatch.setattr(model, "generate", scripted_generate(processor.tokenizer, "ok", calls))
    status, output = run_cli(loaded, ["--image-file", str(image_file)], "Hi?\n/clear\nAgain?\n")
    assert status == 0 and "conversation cleared" in output
    text = processor.tokenizer.decode([t for t in calls[1]["input_ids"][0].tolist() if t >= 0])
    assert "Hi?" not in text and "Again?" in text


def test_real_process_chat_on_stdin(checkpoint, image_file, tmp_path):
    """The module as a user runs it (a real process reading its stdin), saving the drawn image after each answer."""
    saved = tmp_path / "answer.png"
    chat = subprocess.run(
        [sys.executable, "-m", "ferret.serve.cli", "--model-path", checkpoint, "--image-file", str(image_file),
         "--device", "cpu", "--max-new-tokens", "4", "--temperature", "0", "--save-image", str(saved)],
        input="/box 2,2,20,20\nWhat is <region0>?\nDescribe the image.\n", cwd=REPO, env=python_env(),
        capture_output=True, text=True, timeout=180)
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.count("ASSISTANT: ") == 2 and "added <region0>: box 2,2,20,20" in chat.stdout
    assert chat.stdout.count("USER: ") == 4  # the command, two questions, then end of input
    with Image.open(saved) as drawn:
        assert drawn.format == "PNG" and drawn.width > 640


def test_region_features_follow_the_checkpoint_unless_overridden(loaded, image_file, monkeypatch):
    """No flag: this checkpoint has a region sampler, so the region gets a feature mask; --no-region-feature
    sends its coordinates only (no <region_fea>, no mask)."""
    model, processor = loaded
    calls = []
    monkeypatch.setattr(model, "generate", scripted_generate(processor.tokenizer, "ok", calls))
    query = ["--image-file", str(image_file), "--query", "What is <region0>?", "--region", "box:5,5,30,30"]
    assert run_cli(loaded, query)[0] == 0
    assert run_cli(loaded, [*query, "--no-region-feature"])[0] == 0
    on, off = calls
    assert len(on["region_masks"][0]) == 1 and (on["input_ids"] == processor.region_token_id).sum() == 1
    assert off["region_masks"] is None
    assert (off["input_ids"] == processor.region_token_id).sum() == 0
