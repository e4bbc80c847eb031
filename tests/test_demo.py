"""`make demo` (ferret/demo.py) on a tiny world: every output file exists, the metrics are sane, a second run reuses
the world, the stage-0 tower and the finished training, and the same settings give the same numbers; the figures read
the per-task losses and draw the boxes in colours no shape has."""

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
    result = run_demo(out, curve=True, **{**TINY, "save_steps": 2})

    # --curve: the kept checkpoint (step 2) evaluated on the test split, and the final model (step 4).
    curve = json.loads((out / "curve.json").read_text())
    assert list(curve) == ["2", "4"] and curve["4"] == {key: result[key] for key in HEADLINE}
    assert (out / "curve" / "step-2" / "test_answers.jsonl").is_file()
    assert (out / "train" / "checkpoint-2").is_dir() and (out / "train" / "checkpoint-4").is_dir()
    assert _png(figs / "toy_metric_curve.png").size == (880, 484)

    tower_dir = out / "vision_tower" / result["vision_tower"]["key"]
    for path in ("metrics.json", "test_answers.jsonl", "model_config.json", "train/trainer_state.json",
                 f"{tower_dir.relative_to(out)}/config.json", f"{tower_dir.relative_to(out)}/model.safetensors",
                 "checkpoint/config.json", "checkpoint/model.safetensors", "checkpoint/vision_tower/config.json",
                 "checkpoint/tokenizer.json", "checkpoint/preprocessor_config.json"):
        assert (out / path).is_file(), path
    assert list((out / "train").rglob("events.out.tfevents.*")), "no tensorboard log"
    assert _png(figs / "toy_training_curve.png").size == (840, 480)  # one run: one panel and the legend
    assert _png(figs / "toy_grounding_examples.png").size[0] == 1100  # 4 columns of questions
    from ferret.data.toy import TASKS
    from ferret.demo import training_history

    history = training_history(out / "train")
    assert [step for step, _ in history.total] == [1, 2, 3, 4] and history.tasks
    assert set(history.tasks) <= set(TASKS) and all(steps for steps in history.tasks.values())

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


# ----------------------------------------------------------------------------------------------------------
# The figures: what they read and what they draw


def _write_trainer_state(folder, log_history):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 20, "log_history": log_history}))
    return folder


def test_training_history_reads_the_total_and_each_tasks_loss(tmp_path):
    from ferret.demo import training_history

    folder = _write_trainer_state(tmp_path / "train", [
        {"epoch": 0.5, "grad_norm": 3.5, "learning_rate": 0.001, "loss": 2.0, "loss_yesno": 1.0, "loss_ground": 3.0,
         "step": 10},
        {"eval_loss": 9.0, "step": 15},  # not a training loss
        {"loss": 1.5, "loss_ground": 2.5, "loss_refer": 1.25, "loss_my_task": 0.5, "step": 20},
        {"step": 20, "train_loss": 1.75, "train_runtime": 3.0},  # the trainer's closing summary
    ])
    history = training_history(folder)
    assert history.total == [(10, 2.0), (20, 1.5)]
    # The toy world's task order, then any other task by name; a task missing from a logging interval has no point.
    assert list(history.tasks) == ["refer", "ground", "yesno", "my_task"]
    assert history.tasks == {"refer": [(20, 1.25)], "ground": [(10, 3.0), (20, 2.5)], "yesno": [(10, 1.0)],
                             "my_task": [(20, 0.5)]}

    empty = training_history(tmp_path / "nowhere")
    assert empty.total == [] and empty.tasks == {}
    bad = _write_trainer_state(tmp_path / "bad", [{"loss": 2.0, "step": 10}, {"loss": 1.5, "loss_ground": "n/a",
                                                                              "step": 20}])
    with pytest.raises(ValueError, match=r"log_history\[1\] needs an integer step and numeric losses.*loss_ground"):
        training_history(bad)
    _write_trainer_state(bad, [{"loss": 2.0, "step": 10}, "loss 1.5"])
    with pytest.raises(ValueError, match=r"log_history\[1\] must be an object, got 'loss 1.5'"):
        training_history(bad)


def test_smooth_is_a_trailing_mean():
    from ferret.demo import smooth

    assert smooth([1.0, 2.0, 3.0, 5.0], 1) == [1.0, 2.0, 3.0, 5.0]
    assert smooth([1.0, 2.0, 3.0, 5.0], 2) == [1.0, 1.5, 2.5, 4.0]
    assert smooth([1.0, 2.0, 3.0, 5.0], 3) == [1.0, 1.5, 2.0, 10 / 3]
    with pytest.raises(ValueError, match="window must be >= 1, got 0"):
        smooth([1.0], 0)


def _png(path):
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        return image.convert("RGB")


def _count_color(image, rgb):
    """How many pixels of ``image`` are exactly ``rgb``."""
    import numpy as np

    return int((np.asarray(image) == np.array(rgb, dtype=np.uint8)).all(axis=-1).sum())


def _has_color(image, rgb):
    return _count_color(image, rgb) > 0


def test_training_curve_draws_every_task_of_every_run(tmp_path):
    import matplotlib

    from ferret.demo import TrainingHistory, plot_training_curve

    steps = range(10, 610, 10)  # 60 logged points: a trailing mean of 2
    on = TrainingHistory([(s, 6.0 / (1 + s / 50)) for s in steps],
                         {"refer": [(s, 5.0 / (1 + s / 40)) for s in steps],
                          "ground": [(s, 7.0 / (1 + s / 100)) for s in steps]})
    off = TrainingHistory([(s, 6.5 / (1 + s / 60)) for s in steps], {"yesno": [(s, 1.0) for s in steps[::2]]})

    one = _png(plot_training_curve({"run": on}, tmp_path / "one.png"))
    two = _png(plot_training_curve({"region features on": on, "region features off": off}, tmp_path / "two.png"))
    assert one.size == (840, 480) and two.size == (1440, 480)  # one 5-inch panel per run at 120 dpi, + the legend
    tab10 = [tuple(round(255 * c) for c in matplotlib.colormaps["tab10"](i)[:3]) for i in range(4)]
    # One colour per task across the runs, in the order first seen: refer, ground (run "on"), yesno (run "off").
    assert [_has_color(two, color) for color in tab10] == [True, True, True, False]
    assert [_has_color(one, color) for color in tab10] == [True, True, False, False]
    assert _has_color(one, (0, 0, 0))  # the total


def test_grounding_box_colours_are_not_the_worlds_colours():
    import itertools
    import math

    from ferret.data.toy import COLOR_RGB, WorldConfig
    from ferret.demo import PREDICTED_BOX_RGB, TRUTH_BOX_RGB

    fills = list(COLOR_RGB.values())
    # At least 100 apart in RGB from every fill and from the background's greys: further than any two fills are
    # from each other (the closest, yellow and orange, are 71 apart).
    assert min(math.dist(a, b) for a, b in itertools.combinations(fills, 2)) < 100
    low, high = WorldConfig().background_levels
    backgrounds = [(level,) * 3 for level in range(low, high + 1)]
    for box in (TRUTH_BOX_RGB, PREDICTED_BOX_RGB):
        assert min(math.dist(box, fill) for fill in fills + backgrounds) >= 100, box
    assert math.dist(TRUTH_BOX_RGB, PREDICTED_BOX_RGB) >= 100


def test_grounding_verdict_is_the_scorers():
    from ferret.demo import grounding_verdict

    record = {"image_w": 56, "image_h": 56, "box_x1y1x2y2": [[], [[10, 10, 19, 19]]]}

    def answer(text, *regions):
        return {"text": text, "regions": list(regions)}

    exact = answer("a red circle [..]", {"phrase": "a red circle", "box": [10, 10, 19, 19]})
    assert grounding_verdict(record, exact) == ((10.0, 10.0, 19.0, 19.0),
                                                "predicted: “a red circle”\nIoU 1.00 >= 0.5: right", True)
    # 5 of 10 columns overlap: 50 shared pixels of 150, IoU 1/3.
    shifted = answer("a blue star [..]", {"phrase": "a blue star", "box": [15, 10, 24, 19]})
    assert grounding_verdict(record, shifted) == ((15.0, 10.0, 24.0, 19.0),
                                                  "predicted: “a blue star”\nIoU 0.33 < 0.5: wrong", False)
    assert grounding_verdict(record, answer("a red circle")) == (None, "no box: “a red circle”", False)
    assert grounding_verdict(record, answer(" ")) == (None, "no box: an empty answer", False)
    assert grounding_verdict(record, None) == (None, "no answer", False)
    point = answer("a red circle [..]", {"phrase": "a red circle", "point": [14, 14]})
    assert grounding_verdict(record, point) == (None, "predicted: “a red circle”\na point, not a box: wrong", False)
    broken = answer("a red circle", {"phrase": "a red circle", "box": [1, 2]})
    assert grounding_verdict(record, broken)[1:] == ("unreadable regions: “a red circle”", False)


def test_grounding_figure_draws_both_boxes_in_their_colours(tmp_path):
    from ferret.data.toy import make_world
    from ferret.demo import PREDICTED_BOX_RGB, TRUTH_BOX_RGB, plot_grounding_examples

    records = make_world(tmp_path / "world", num_train=0, num_val=0, num_test=25, image_size=56)["test"]
    ground = [r for r in records if r["task"] == "ground"]
    assert len(ground) >= 5
    # The first ground question answered with a box 3 px right of the truth, the second with none, the rest unanswered.
    x1, y1, x2, y2 = ground[0]["box_x1y1x2y2"][1][0]
    answers = [{"id": ground[0]["id"], "text": "a shape [..]", "regions": [{"phrase": "a shape",
                                                                            "box": [x1 + 3, y1, x2 + 3, y2]}]},
               {"id": ground[1]["id"], "text": "no idea"}]
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))

    image = _png(plot_grounding_examples(tmp_path / "world", tmp_path / "answers.jsonl", tmp_path / "g.png",
                                         count=5))
    assert image.size == (1100, 781)  # 4 columns x 2 rows of 2.5 x 3.3-inch panels + the legend, at 110 dpi
    # The legend shows both colours; the predicted box adds magenta to the first panel, the true boxes grey to each.
    (tmp_path / "none.jsonl").write_text(json.dumps(answers[1]) + "\n")
    without = _png(plot_grounding_examples(tmp_path / "world", tmp_path / "none.jsonl", tmp_path / "n.png", count=5))
    assert without.size == image.size
    assert _count_color(image, PREDICTED_BOX_RGB) > _count_color(without, PREDICTED_BOX_RGB) > 0
    # Each of the 5 grey outlines is ~4 x 100 display pixels long and ~3 wide (the legend's line is ~60 x 3).
    assert _count_color(without, TRUTH_BOX_RGB) > 5 * 300


def test_seed_summary_is_the_mean_and_sample_sd_of_each_variant():
    from ferret.demo import HEADLINE, seed_summary, seed_table

    def run(value, off=None):
        result = {metric: value for metric in HEADLINE}
        result["yesno_accuracy"] = None if value == 0.5 else value  # a metric missing in one seed
        if off is not None:
            result["ablation"] = {"on": {}, "off": {metric: off for metric in HEADLINE}}
        return result

    summary = seed_summary({2: run(0.9, off=0.2), 0: run(0.5, off=0.4), 1: run(0.7, off=0.3)})
    assert summary["seeds"] == [0, 1, 2]
    on = summary["on"]["ground_acc@0.5"]
    assert on["values"] == [0.5, 0.7, 0.9] and on["mean"] == pytest.approx(0.7) and on["sd"] == pytest.approx(0.2)
    assert summary["on"]["yesno_accuracy"]["values"] == [0.7, 0.9]  # the seed without it is left out
    assert summary["on"]["yesno_accuracy"]["mean"] == pytest.approx(0.8)
    assert summary["off"]["refer_box_accuracy"]["mean"] == pytest.approx(0.3)
    assert summary["off"]["refer_box_accuracy"]["sd"] == pytest.approx(0.1)
    table = seed_table(summary)
    assert "70.0 ± 20.0" in table and "30.0 ± 10.0" in table and "region fea OFF" in table
    single = seed_summary({0: run(0.6)})
    assert "off" not in single and single["on"]["describe_recall@0.5"] == {"values": [0.6], "mean": 0.6, "sd": None}


def test_box_digits_are_the_hundreds_and_tens_the_model_writes():
    import numpy as np

    from ferret.regions import Box, region_to_text
    from ferret.train.tower_pretraining import box_digits

    # The box (10, 0)-(27, 55) of a 56 px image, stored as (x1, y1, x2 + 1, y2 + 1) / 56; the model writes it as
    # [178, 0, 482, 982] (grid value = int(pixel * 1000 / 56)).
    assert region_to_text(Box(10, 0, 27, 55), 56, 56) == "[178, 0, 482, 982]"
    boxes = np.asarray([[10 / 56, 0, 28 / 56, 1], [0, 0, 0, 0]], dtype=np.float32)
    digits = box_digits(boxes, 56, 56)
    assert digits.tolist() == [[1, 7, 0, 0, 4, 8, 9, 8], [0] * 8]


def test_metric_curve_figure_draws_each_metric_and_its_target(tmp_path):
    import numpy as np
    from PIL import Image

    from ferret.demo import HEADLINE, TARGETS, plot_metric_curve

    curve = {300: {m: 0.2 for m in HEADLINE}, 600: {m: 0.4 for m in HEADLINE}, 900: {m: 0.6 for m in HEADLINE}}
    curve[600]["yesno_accuracy"] = None  # a checkpoint without the metric: no point there
    path = plot_metric_curve(curve, tmp_path / "curve.png")
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape == (484, 880, 3)
    assert set(TARGETS) <= set(HEADLINE) and all(0 < t < 1 for t in TARGETS.values())
