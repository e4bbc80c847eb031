"""`make demo` (ferret/demo.py) on a tiny world: every output file exists, the metrics are sane, a second run reuses
the world, the stage-0 tower and the finished training, and the same settings give the same numbers."""

import json
import stat

import pytest
import torch


from ferret.demo import TINY  # noqa: E402 - the `ferret demo --tiny` settings: seconds per run


@pytest.mark.slow
def test_run_demo_writes_every_output(tmp_path):
    from ferret.demo import HEADLINE, run_demo
    from ferret.train.tower_pretraining import random_vision_tower, sincos_position_table
    from ferret.model.builder import load_pretrained_model

    out = tmp_path / "demo"
    figs = out / "figs"
    result = run_demo(out, **TINY)

    tower_dir = out / "vision_tower" / result["vision_tower"]["key"]
    for path in ("metrics.json", "test_answers.jsonl", "model_config.json", "train/trainer_state.json",
                 f"{tower_dir.relative_to(out)}/config.json", f"{tower_dir.relative_to(out)}/model.safetensors",
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
    assert metrics["chat_command"].startswith(".venv/bin/ferret serve cli --model-path ")
    assert metrics["threads"] == 1 and metrics["training"]["cpu_seconds"] > 0
    private = [p for p in out.rglob("*") if p.is_file() and stat.S_IMODE(p.stat().st_mode) == 0o600]
    assert not private, private[:3]

    model, processor = load_pretrained_model(str(out / "checkpoint"), device="cpu")
    assert model.config.hidden_size == metrics["config"]["hidden"]
    assert processor.image_size == metrics["config"]["image_size"]
    # The checkpoint carries the stage-0 tower unchanged (frozen in training), its position table still sin-cos.
    from transformers import CLIPVisionModel

    clip = model.vision_tower.vision_tower
    stage0 = CLIPVisionModel.from_pretrained(str(tower_dir))
    for (name, trained), (_, saved) in zip(clip.state_dict().items(), stage0.state_dict().items()):
        torch.testing.assert_close(trained, saved, msg=name)
    position = model.vision_tower.position_table()
    side = metrics["config"]["image_size"] // metrics["config"]["patch_size"]
    torch.testing.assert_close(position, sincos_position_table(side, position.shape[1]))
    # ... while stage 0 did train the rest of it.
    vision_config = json.loads((out / "model_config.json").read_text())["vision_config"]
    random = random_vision_tower(vision_config, metrics["config"]["seed"])

    def fc1(module):
        return next(v for k, v in module.state_dict().items() if k.endswith("layers.0.mlp.fc1.weight"))

    assert not torch.equal(fc1(random), fc1(clip))


@pytest.mark.slow
def test_same_settings_same_numbers_and_a_rerun_reuses_everything(tmp_path):
    from safetensors.torch import load_file

    from ferret.demo import HEADLINE, run_demo

    first = run_demo(tmp_path / "a", **TINY, save_steps=2)
    again = run_demo(tmp_path / "a", **TINY, save_steps=2)  # the same folder: world, tower and training reused
    other = run_demo(tmp_path / "b", **TINY, save_steps=2)  # from scratch elsewhere

    assert not first["vision_tower"]["cached"] and again["vision_tower"]["cached"]
    assert again["training"]["resumed_from_step"] == 4 and first["training"]["resumed_from_step"] == 0
    assert (tmp_path / "a" / "train" / "checkpoint-4").is_dir()  # the resumable checkpoint (the last one kept)
    assert not (tmp_path / "a" / "train" / "checkpoint-2").exists()
    for run in (again, other):
        assert {k: run[k] for k in HEADLINE} == {k: first[k] for k in HEADLINE}
        assert run["vision_tower"]["test_patch_accuracy"] == first["vision_tower"]["test_patch_accuracy"]
    assert other["training"]["final_loss"] == first["training"]["final_loss"]
    weights_a = load_file(str(tmp_path / "a" / "checkpoint" / "model.safetensors"))
    weights_b = load_file(str(tmp_path / "b" / "checkpoint" / "model.safetensors"))
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name
    answers = [(tmp_path / run / "test_answers.jsonl").read_text() for run in ("a", "b")]
    assert answers[0] == answers[1]


def test_stage_banners_say_what_when_and_how_long(capsys):
    from ferret.demo import DemoConfig, Stages, plan_stages

    stages = Stages(plan_stages(DemoConfig(), None))
    stages.begin("world", "detail")
    stages.end()
    out = capsys.readouterr().out
    assert "=== [1/5] the toy world and its tokenizer: detail" in out
    assert "expected ~" in out and "ETA " in out and "the demo ends ~" in out and "done in" in out


def test_sincos_position_table_tells_patches_apart():
    from ferret.train.tower_pretraining import sincos_position_table

    table = sincos_position_table(4, 64)
    assert table.shape == (16, 64)
    distances = (table[:, None] - table[None]).norm(dim=-1)
    assert distances[~torch.eye(16, dtype=torch.bool)].min() > 0.5  # every patch has its own code
    # x lives in the first half of the channels, y in the second: patches of one column share the x half
    assert (table[0, :32] - table[4, :32]).abs().max() < 1e-6
    assert (table[0, 32:] - table[1, 32:]).abs().max() < 1e-6


def test_tower_recipe_warm_up_works_for_any_step_count():
    """OneCycleLR divides by (warm-up steps - 1): 20 steps at a plain 5% warm-up crashed; the recipe keeps at least
    2 warm-up steps, keeps 5% for long runs (the demo's 150 and 1,000 steps) and refuses fewer than 3 steps."""
    import torch

    from ferret.train.tower_pretraining import TowerPretrainingConfig

    assert TowerPretrainingConfig(steps=1000).warmup_fraction == 0.05
    assert TowerPretrainingConfig(steps=150).warmup_fraction == 0.05
    assert TowerPretrainingConfig(steps=20).warmup_fraction == 0.1
    assert TowerPretrainingConfig(steps=3).warmup_fraction == 0.5
    for steps in range(3, 60):
        config = TowerPretrainingConfig(steps=steps)
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1.0, total_steps=steps,
                                                       pct_start=config.warmup_fraction)
        for _ in range(steps):
            optimizer.step()
            schedule.step()
    with pytest.raises(ValueError, match="steps must be at least 3"):
        TowerPretrainingConfig(steps=2)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        TowerPretrainingConfig(batch_size=0)
