"""Smoke test of `make demo` (ferret/demo.py) on a tiny world: every output file exists and the metrics are sane."""

import json

import pytest
import torch


@pytest.mark.slow
def test_run_demo_writes_every_output(tmp_path):
    from ferret.demo import HEADLINE, run_demo, sincos_position_table
    from ferret.model.builder import load_pretrained_model

    out, figs = tmp_path / "demo", tmp_path / "figs"
    result = run_demo(out, figs_dir=figs, num_train=40, num_test=12, vocab_size=360, max_steps=4, batch_size=4,
                      eval_batch_size=12, max_new_tokens=12, logging_steps=1)

    for path in ("metrics.json", "test_answers.jsonl", "model_config.json", "train/trainer_state.json",
                 "checkpoint/config.json", "checkpoint/model.safetensors", "checkpoint/vision_tower/config.json",
                 "checkpoint/tokenizer.json", "checkpoint/preprocessor_config.json"):
        assert (out / path).is_file(), path
    assert list((out / "train").rglob("events.out.tfevents.*")), "no tensorboard log"
    for name in ("toy_training_curve.png", "toy_grounding_examples.png"):
        assert (figs / name).stat().st_size > 1000

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result))
    # 12 test records hold every task and every region type, so no headline number is missing.
    for key in HEADLINE:
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["test_records"] == 12
    assert metrics["training"]["steps"] == 4 and metrics["training"]["seconds"] > 0
    answers = [json.loads(line) for line in (out / "test_answers.jsonl").read_text().splitlines()]
    assert len(answers) == 12 and all("text" in a for a in answers)
    assert metrics["chat_command"].startswith("python -m ferret.serve.cli --model-path ")

    model, processor = load_pretrained_model(str(out / "checkpoint"), device="cpu")
    assert model.config.hidden_size == metrics["config"]["hidden"]
    assert processor.image_size == metrics["config"]["image_size"]
    # The trained checkpoint carries the demo's frozen tower, with its 2-D sin-cos position embedding.
    clip = model.vision_tower.vision_tower
    position = getattr(clip, "vision_model", clip).embeddings.position_embedding.weight
    side = metrics["config"]["image_size"] // metrics["config"]["patch_size"]
    torch.testing.assert_close(position[1:], sincos_position_table(side, position.shape[1]))


def test_sincos_position_table_tells_patches_apart():
    from ferret.demo import sincos_position_table

    table = sincos_position_table(4, 64)
    assert table.shape == (16, 64)
    distances = (table[:, None] - table[None]).norm(dim=-1)
    assert distances[~torch.eye(16, dtype=torch.bool)].min() > 0.5  # every patch has its own code
    # x lives in the first half of the channels, y in the second: patches of one column share the x half
    assert (table[0, :32] - table[4, :32]).abs().max() < 1e-6
    assert (table[0, 32:] - table[1, 32:]).abs().max() < 1e-6
