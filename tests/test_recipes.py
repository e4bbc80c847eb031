"""The shipped recipes (recipes/*.yaml): each says in its first lines how to run it, loads through the real training
argument parser, and holds the paper's values; the experiments/ launchers are thin wrappers of them."""

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from serve_helpers import REPO

from ferret.train.arguments import parse_args

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
# Paper recipes run on GPUs; parsing them here needs the CPU switches (bf16/tf32 are checked in the file instead).
ON_CPU = ["--use_cpu", "True", "--tf32", "False"]


def header(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "\n".join(line for line in lines[:6] if line.startswith("#"))


def test_the_recipes_are_shipped():
    assert {p.name for p in RECIPES} == {"ferret_7b.yaml", "ferret_13b.yaml", "tiny_cpu.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_says_how_to_run_it_and_parses(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), first
    assert f"--config recipes/{path.name}" in header(path)  # the command that runs it
    keys = yaml.safe_load(path.read_text())
    assert isinstance(keys, dict) and keys
    # every key is a flag of the real parser, and every value survives the trip through it
    argv = ["--config", str(path)] + (ON_CPU if keys.get("bf16") else [])
    model_args, data_args, training_args = parse_args(argv)
    parsed = {**vars(model_args), **vars(data_args), **vars(training_args)}
    for key, value in keys.items():
        if key in ("warmup_ratio", "tf32", "use_cpu") or key not in parsed:
            continue  # translated into another field, or overridden above for the CPU
        got = parsed[key]
        got = getattr(got, "value", got)  # enums of TrainingArguments
        if isinstance(value, list):
            assert [type(v)(g) for v, g in zip(value, got)] == value and len(got) == len(value), key
        else:
            assert type(value)(got) == value, (key, got, value)


@pytest.mark.parametrize("name, model", [("ferret_7b", "vicuna-7b-v1-3"), ("ferret_13b", "vicuna-13b-v1-3")])
def test_paper_recipes_hold_the_papers_values(name, model):
    path = REPO / "recipes" / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    assert raw["bf16"] is True and raw["tf32"] is True
    m, d, t = parse_args(["--config", str(path), *ON_CPU])
    assert m.model_name_or_path == f"./model/{model}"
    assert m.vision_tower == "openai/clip-vit-large-patch14-336"
    assert m.pretrain_mm_mlp_adapter == f"./model/llava-336px-pretrain-{model}/mm_projector.bin"
    assert t.learning_rate == 2e-5 and t.num_train_epochs == 3
    assert t.per_device_train_batch_size == 16 and t.gradient_accumulation_steps == 1  # x 8 GPUs = 128
    assert t.model_max_length == 2048
    assert t.warmup_steps == 0.03 and t.weight_decay == 0.0 and str(t.lr_scheduler_type.value) == "cosine"
    assert m.add_region_feature is True and m.region_geo_sampler is True and m.sampler_pooler_mode == "max"
    assert d.point_input_sample == "segment_mask|center" and d.refer_previous_point is False
    assert m.mm_vision_select_layer == -2 and m.version == "v1" and not m.mm_use_im_start_end
    assert d.resized_image_h == d.resized_image_w == 336 and d.image_aspect_ratio == "square_nocrop"
    assert len(d.data_path) == len(d.image_folder) == len(d.data_multiple) == 10
    assert d.data_multiple == [3, 1, 0.2, 0.2, 1, 1, 1, 1, 1, 1]
    assert str(t.eval_strategy.value) == "no" and t.save_steps == 1500 and t.save_total_limit == 3
    assert t.output_dir.endswith(f"checkpoints/{name}")


def test_the_13b_recipe_differs_from_the_7b_only_in_the_model():
    a = yaml.safe_load((REPO / "recipes" / "ferret_7b.yaml").read_text())
    b = yaml.safe_load((REPO / "recipes" / "ferret_13b.yaml").read_text())
    assert {k for k in a if a[k] != b[k]} == {"model_name_or_path", "pretrain_mm_mlp_adapter", "output_dir"}


def test_command_line_flags_override_the_recipe():
    path = REPO / "recipes" / "ferret_7b.yaml"
    m, _, t = parse_args(["--config", str(path), *ON_CPU, "--learning_rate", "1e-5", "--no-region-feature",
                          "--gradient_accumulation_steps", "2"])
    assert t.learning_rate == 1e-5 and t.gradient_accumulation_steps == 2 and m.add_region_feature is False


def test_tiny_cpu_recipe():
    m, d, t = parse_args(["--config", str(REPO / "recipes" / "tiny_cpu.yaml")])
    assert m.init_config == "small" and d.dataset_type == ["toy"] and t.use_cpu is True
    assert t.max_steps == 40 and t.per_device_train_batch_size == 8 and t.learning_rate == 2e-3
    assert t.resume_from_checkpoint == "no"  # the string: YAML's bare `no` would have been False
    assert t.model_max_length == 256


@pytest.mark.parametrize("script, recipe", [("ferret_7b_train.sh", "ferret_7b.yaml"),
                                            ("ferret_13b_train.sh", "ferret_13b.yaml"),
                                            ("tiny_cpu_train.sh", "tiny_cpu.yaml")])
def test_launchers_are_thin(script, recipe):
    text = (REPO / "experiments" / script).read_text()
    subprocess.run(["bash", "-n", str(REPO / "experiments" / script)], check=True)
    assert f"recipes/{recipe}" in text
    code = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(code) <= 30, f"{script}: {len(code)} lines of code; the settings belong in recipes/{recipe}"
    # no training setting is spelled out in the launcher (they are the recipe's)
    assert not re.search(r"--(learning_rate|num_train_epochs|model_max_length|point_input_sample)\b",
                         "\n".join(code)), script
