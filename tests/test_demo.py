"""Smoke test of `make demo` (ferret/demo.py) on a tiny world: every output file exists and the metrics are sane."""

import json

import pytest
import torch


@pytest.mark.slow
def test_run_demo_writes_every_output(tmp_path):
    from ferret.demo import HEADLINE, random_vision_tower, run_demo, sincos_position_table
    from ferret.model.builder import load_pretrained_model

    out, figs = tmp_path / "demo", tmp_path / "figs"
    result = run_demo(out, figs_dir=figs, num_train=40, num_test=20, vocab_size=360, max_steps=4, batch_size=4,
                      eval_batch_size=20, max_new_tokens=12, logging_steps=1, tower_steps=3, tower_batch_size=8)

    for path in ("metrics.json", "test_answers.jsonl", "model_config.json", "train/trainer_state.json",
                 "vision_tower/config.json", "vision_tower/model.safetensors",
                 "checkpoint/config.json", "checkpoint/model.safetensors", "checkpoint/vision_tower/config.json",
                 "checkpoint/tokenizer.json", "checkpoint/preprocessor_config.json"):
        assert (out / path).is_file(), path
    assert list((out / "train").rglob("events.out.tfevents.*")), "no tensorboard log"
    for name in ("toy_training_curve.png", "toy_grounding_examples.png"):
        assert (figs / name).stat().st_size > 1000

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result))
    # 20 test records hold every task and every region type, so no headline number is missing.
    for key in HEADLINE:
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["test_records"] == 20
    tower = metrics["vision_tower"]
    assert tower["steps"] == 3 and 0 <= tower["test_object_patch_accuracy"] <= tower["test_patch_accuracy"] <= 1
    assert metrics["training"]["steps"] == 4 and metrics["training"]["seconds"] > 0
    answers = [json.loads(line) for line in (out / "test_answers.jsonl").read_text().splitlines()]
    assert len(answers) == 20 and all("text" in a for a in answers)
    assert metrics["chat_command"].startswith("python -m ferret.serve.cli --model-path ")

    model, processor = load_pretrained_model(str(out / "checkpoint"), device="cpu")
    assert model.config.hidden_size == metrics["config"]["hidden"]
    assert processor.image_size == metrics["config"]["image_size"]
    # The checkpoint carries the stage-0 tower unchanged (frozen in training), its position table still sin-cos.
    from transformers import CLIPVisionModel

    clip = model.vision_tower.vision_tower
    stage0 = CLIPVisionModel.from_pretrained(str(out / "vision_tower"))
    for (name, trained), (_, saved) in zip(clip.state_dict().items(), stage0.state_dict().items()):
        torch.testing.assert_close(trained, saved, msg=name)
    position = getattr(clip, "vision_model", clip).embeddings.position_embedding.weight
    side = metrics["config"]["image_size"] // metrics["config"]["patch_size"]
    torch.testing.assert_close(position[1:], sincos_position_table(side, position.shape[1]))
    # ... while stage 0 did train the rest of it.
    vision_config = json.loads((out / "model_config.json").read_text())["vision_config"]
    random = random_vision_tower(vision_config, metrics["config"]["seed"])

    def fc1(module):
        return next(v for k, v in module.state_dict().items() if k.endswith("layers.0.mlp.fc1.weight"))

    assert not torch.equal(fc1(random), fc1(clip))


def test_sincos_position_table_tells_patches_apart():
    from ferret.demo import sincos_position_table

    table = sincos_position_table(4, 64)
    assert table.shape == (16, 64)
    distances = (table[:, None] - table[None]).norm(dim=-1)
    assert distances[~torch.eye(16, dtype=torch.bool)].min() > 0.5  # every patch has its own code
    # x lives in the first half of the channels, y in the second: patches of one column share the x half
    assert (table[0, :32] - table[4, :32]).abs().max() < 1e-6
    assert (table[0, 32:] - table[1, 32:]).abs().max() < 1e-6
