"""Training: arguments, the recipe on a tiny model (CPU), checkpoints, resume, LoRA merge, DeepSpeed ZeRO-2/3.

Single-process runs call `ferret.train.train.main` in-process; the distributed ones start
``python -m torch.distributed.run --nproc_per_node=2`` (gloo on CPU) and are marked slow. DeepSpeed JIT-compiles
one op on first use (~1-2 min, cached under ~/.cache/torch_extensions).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from ferret.train.trainer import (
    SealCheckpointCallback,
    checkpoint_problems,
    is_complete_checkpoint,
    latest_checkpoint,
    non_lora_trainables,
)

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 64-record toy world (56 px images), its tokenizer, a region-only subset and a saved tiny Ferret."""
    from transformers import AutoTokenizer

    from ferret.data.toy import make_world, train_toy_tokenizer, world_corpus
    from ferret.model.configuration import small
    from ferret.model.modeling import build_model
    from ferret.processing import FerretProcessor

    root = tmp_path_factory.mktemp("world")
    splits = make_world(root, num_train=64, num_val=0, num_test=0, image_size=56, seed=0)
    train_toy_tokenizer(root / "tokenizer", world_corpus(splits["train"]), vocab_size=400)
    # The same records plus 8 whose image is missing: training skips and counts them.
    bad = [{**r, "id": f"bad_{i}", "image": "images/missing.png"} for i, r in enumerate(splits["train"][:8])]
    mixed = splits["train"][:]
    for i, record in enumerate(bad):
        mixed.insert(8 * i + 3, record)
    (root / "with_bad.json").write_text(json.dumps(mixed))
    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    processor = FerretProcessor(tokenizer, image_size=56, num_image_tokens=16, model_max_length=256)
    model = build_model(small(len(tokenizer), region_token=processor.region_token_id), seed=1)
    model.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    return root


def _common(world, out, data="train.json"):
    return [
        "--data_path", str(world / data), "--image_folder", str(world), "--dataset_type", "toy",
        "--output_dir", str(out), "--model_max_length", "256", "--logging_steps", "1", "--seed", "0",
        "--report_to", "none",
    ]


def _tiny(world, out, *extra, data="train.json"):
    return ["--init_config", "small", "--tokenizer_path", str(world / "tokenizer"), *_common(world, out, data),
            "--use_cpu", "True", *extra]


def _losses(output_dir) -> dict[int, float]:
    history = json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.fixture(scope="module")
def single_run(world, tmp_path_factory):
    """8 steps of the entry point on one process, checkpoints every 4 steps, tensorboard logging."""
    from ferret.train.train import main

    out = tmp_path_factory.mktemp("single") / "run"
    args = _tiny(world, out, "--max_steps", "8", "--save_steps", "4", "--per_device_train_batch_size", "4",
                 "--learning_rate", "3e-3", "--report_to", "tensorboard", "--group_by_length", "True",
                 data="with_bad.json")
    assert main(args) == 0
    return out, args


# ------------------------------------------------------------------------------------------------ arguments
ORIGINAL_FLAGS = [
    "--lora_enable", "False", "--model_name_or_path", "./model/vicuna-7b-v1-3", "--version", "v1",
    "--data_path", "dataset/git_instruction.json", "dataset/vg_objects.json",
    "--image_folder", "dataset/coco2014/train2014", "dataset/vg/images", "--data_multiple", "3", "0.2",
    "--vision_tower", "openai/clip-vit-large-patch14-336",
    "--pretrain_mm_mlp_adapter", "./model/llava/mm_projector.bin", "--mm_vision_select_layer", "-2",
    "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False", "--bf16", "False",
    "--output_dir", "./checkpoints/ferret_7b", "--num_train_epochs", "3", "--per_device_train_batch_size", "16",
    "--per_device_eval_batch_size", "4", "--gradient_accumulation_steps", "1", "--evaluation_strategy", "no",
    "--save_strategy", "steps", "--save_steps", "1500", "--save_total_limit", "3", "--learning_rate", "2e-5",
    "--weight_decay", "0.", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1",
    "--fsdp", "full_shard auto_wrap", "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
    "--model_max_length", "2048", "--gradient_checkpointing", "True", "--dataloader_num_workers", "8",
    "--lazy_preprocess", "True", "--report_to", "tensorboard", "--point_input_sample", "segment_mask|center",
    "--add_region_feature", "True", "--region_geo_sampler", "True", "--sampler_pooler_mode", "max",
    "--add_region_feature", "True", "--refer_previous_point", "False", "--resized_image_h", "336",
    "--resized_image_w", "336", "--save_vision_tower", "True", "--mpt_attn_impl", "triton",
]


def test_original_launch_flags_parse(caplog):
    from ferret.train.arguments import parse_args

    with caplog.at_level("INFO", logger="ferret.train.arguments"):
        model_args, data_args, args = parse_args(ORIGINAL_FLAGS)
    assert model_args.mm_vision_select_layer == -2 and model_args.sampler_pooler_mode == "max"
    assert data_args.data_path == ["dataset/git_instruction.json", "dataset/vg_objects.json"]
    assert data_args.data_multiple == [3.0, 0.2] and data_args.resized_image_h == 336
    # Flags transformers 5 dropped are translated.
    assert args.warmup_steps == pytest.approx(0.03)
    assert args.eval_strategy.value == "no"
    assert args.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert args.gradient_checkpointing and args.model_max_length == 2048 and args.learning_rate == 2e-5
    assert not args.remove_unused_columns
    ignored = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert any("--mpt_attn_impl" in m for m in ignored) and any("--lazy_preprocess" in m for m in ignored)


def test_defaults_are_the_recipe_and_v0_becomes_v1(caplog, tmp_path):
    from ferret.train.arguments import parse_args

    with caplog.at_level("WARNING"):
        model_args, data_args, args = parse_args(["--model_name_or_path", "m", "--data_path", "a.json",
                                                  "--image_folder", "img", "--output_dir", str(tmp_path),
                                                  "--version", "v0"])
    assert model_args.version == "v1" and any("only the v1" in r.getMessage() for r in caplog.records)
    assert (model_args.mm_use_im_patch_token, model_args.add_region_feature, model_args.save_vision_tower) == (
        False, True, True)
    assert data_args.point_input_sample == "segment_mask|center" and data_args.refer_previous_point is False
    assert args.model_max_length == 2048 and args.report_to == ["tensorboard"]


def test_config_file_with_command_line_override(tmp_path):
    from ferret.train.arguments import parse_args

    config = tmp_path / "recipe.yaml"
    config.write_text("model_name_or_path: m\ndata_path: [a.json, b.json]\nimage_folder: [img]\n"
                      f"output_dir: {tmp_path}\nlearning_rate: 1.0e-4\nlora_enable: true\n")
    _, data_args, args = parse_args([str(config), "--learning_rate", "3e-5"])
    assert args.learning_rate == 3e-5 and args.lora_enable is True
    assert data_args.image_folder == ["img", "img"]  # one folder serves every file
    json_config = tmp_path / "recipe.json"
    json_config.write_text(json.dumps({"model_name_or_path": "m", "data_path": ["a.json"], "image_folder": ["i"],
                                       "output_dir": str(tmp_path)}))
    assert parse_args(["--config", str(json_config)])[0].model_name_or_path == "m"


@pytest.mark.parametrize("flags, message", [
    (["--image_folder", "x", "y", "z"], "one folder per --data_path"),
    (["--data_multiple", "1"], "one value per --data_path"),
    (["--bits", "4"], "--lora_enable True"),
    (["--resized_image_h", "336", "--resized_image_w", "224"], "must be equal"),
])
def test_inconsistent_arguments_are_named(flags, message, tmp_path):
    from ferret.train.arguments import parse_args

    base = ["--model_name_or_path", "m", "--data_path", "a.json", "b.json", "--output_dir", str(tmp_path)]
    if "--image_folder" not in flags:
        base += ["--image_folder", "img"]
    with pytest.raises(ValueError, match=message):
        parse_args(base + flags)


def test_shipped_deepspeed_configs_and_scripts():
    for name, stage in (("zero2.json", 2), ("zero3.json", 3), ("zero3_offload.json", 3)):
        config = json.loads((REPO / "scripts" / name).read_text())
        assert config["zero_optimization"]["stage"] == stage
        assert config["train_micro_batch_size_per_gpu"] == "auto" and config["bf16"]["enabled"] == "auto"
    assert json.loads((REPO / "scripts" / "zero3.json").read_text())["zero_optimization"][
        "stage3_gather_16bit_weights_on_model_save"] is True
    for script in ("ferret_7b_train.sh", "ferret_13b_train.sh", "tiny_cpu_train.sh"):
        subprocess.run(["bash", "-n", str(REPO / "experiments" / script)], check=True)


# ------------------------------------------------------------------------------------------------ checkpoints
def _fake_checkpoint(path: Path, state=True, weights=True, sealed=True):
    from ferret.model.checkpoint import write_manifest

    path.mkdir(parents=True)
    if state:
        (path / "trainer_state.json").write_text("{}")
    if weights:
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(path / "model.safetensors"))
    if sealed:
        write_manifest(path)


def test_latest_checkpoint_skips_incomplete(tmp_path, caplog):
    _fake_checkpoint(tmp_path / "checkpoint-5")
    _fake_checkpoint(tmp_path / "checkpoint-20", state=False)
    _fake_checkpoint(tmp_path / "checkpoint-15", weights=False)
    _fake_checkpoint(tmp_path / "checkpoint-25", sealed=False)  # every file there, but the save never finished
    _fake_checkpoint(tmp_path / "tmp-checkpoint-30")
    _fake_checkpoint(tmp_path / "checkpoint-3")
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-5")
    messages = [r.getMessage() for r in caplog.records]
    assert sum("incomplete: no trainer_state.json or no model weights" in m for m in messages) == 2
    assert any("checkpoint-25: no manifest.json: the save did not finish" in m for m in messages), messages
    assert checkpoint_problems(str(tmp_path / "checkpoint-25")) == []  # given explicitly, it is checked by format
    assert not is_complete_checkpoint(str(tmp_path / "checkpoint-20"))
    assert latest_checkpoint(str(tmp_path / "missing")) is None


def test_rotation_deletes_only_sealed_checkpoints_after_the_new_one_is_sealed(tmp_path):
    """save_total_limit=1: sealing checkpoint-6 deletes the sealed 2 and 4, never the unsealed 8 (a save under
    way elsewhere); before 6 is sealed, nothing is deleted, so the newest sealed checkpoint always survives."""
    from types import SimpleNamespace

    from transformers import TrainerControl

    for step in (2, 4):
        _fake_checkpoint(tmp_path / f"checkpoint-{step}")
    _fake_checkpoint(tmp_path / "checkpoint-6", sealed=False)
    _fake_checkpoint(tmp_path / "checkpoint-8", sealed=False)
    callback = SealCheckpointCallback(save_total_limit=1)
    args = SimpleNamespace(output_dir=str(tmp_path), should_save=True)
    state = SimpleNamespace(global_step=6, is_local_process_zero=True, best_model_checkpoint=None)
    callback.on_save(args, state, TrainerControl())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6", "checkpoint-8"]
    assert (tmp_path / "checkpoint-6" / "manifest.json").is_file()
    assert not (tmp_path / "checkpoint-8" / "manifest.json").exists()
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-6")


def test_non_lora_trainables_use_plain_names():
    state = {
        "base_model.model.model.mm_projector.modules_to_save.default.weight": torch.ones(2),
        "base_model.model.model.mm_projector.original_module.weight": torch.zeros(2),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight": torch.zeros(2),
    }
    assert list(non_lora_trainables(state)) == ["model.mm_projector.weight"]


# ------------------------------------------------------------------------------------------------ building the model
def test_llama_base_gets_ferret_modules(world, tmp_path):
    """A Vicuna-style base (LlamaForCausalLM, no <region_fea>) + a local CLIP folder + a stage-1 projector."""
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from ferret.train.arguments import parse_args
    from ferret.train.train import build_model, configure_trainable

    tokenizer = AutoTokenizer.from_pretrained(str(world / "tokenizer"))
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256))
    llama.save_pretrained(tmp_path / "vicuna")
    tokenizer.save_pretrained(tmp_path / "vicuna")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=56, patch_size=14)).save_pretrained(tmp_path / "clip")
    projector = {"model.mm_projector.weight": torch.randn(64, 32), "model.mm_projector.bias": torch.randn(64)}
    torch.save(projector, tmp_path / "mm_projector.bin")

    model_args, data_args, args = parse_args([
        "--model_name_or_path", str(tmp_path / "vicuna"), "--vision_tower", str(tmp_path / "clip"),
        "--pretrain_mm_mlp_adapter", str(tmp_path / "mm_projector.bin"), "--data_path", "x.json",
        "--image_folder", "img", "--output_dir", str(tmp_path / "out"), "--use_cpu", "True", "--freeze_backbone", "True",
    ])
    model, processor, from_ferret = build_model(model_args, data_args, args)
    assert not from_ferret
    old = llama.get_input_embeddings().weight
    new = model.get_input_embeddings().weight
    assert new.shape[0] == len(tokenizer) + 1 == model.config.vocab_size
    assert model.config.im_region_fea_token == processor.region_token_id == len(tokenizer)
    assert torch.equal(new[:-1], old) and torch.allclose(new[-1], old.mean(0))
    assert torch.allclose(model.get_output_embeddings().weight[-1], llama.lm_head.weight.mean(0))
    assert torch.equal(model.model.mm_projector.weight, projector["model.mm_projector.weight"])
    assert model.config.mm_vision_tower == str(tmp_path / "clip") and model.config.region_feature_axes == "xy"
    assert model.vision_tower is not None and processor.num_image_tokens == 16
    sampler = model.model.region_geo_sampler
    assert all(torch.isfinite(p).all() for p in sampler.parameters())

    configure_trainable(model, model_args, args)  # freeze_backbone: the Ferret modules train, the LLM does not
    trainable = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"mm_projector", "region_geo_sampler"} and model.config.use_cache is False


# ------------------------------------------------------------------------------------------------ single process
def test_single_process_run_learns_logs_and_saves(single_run):
    out, _ = single_run
    losses = _losses(out)
    assert sorted(losses) == list(range(1, 9))
    first, last = (losses[1] + losses[2]) / 2, (losses[7] + losses[8]) / 2
    assert last < first - 0.3, losses

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = list((out / "runs").iterdir())
    events = EventAccumulator(str(run_dir))
    events.Reload()
    for tag in ("train/loss", "train/learning_rate", "train/samples_per_second", "train/tokens_per_second",
                "train/skipped_records"):
        values = [e.value for e in events.Scalars(tag)]
        assert len(values) == 8, tag
    assert all(v > 0 for v in (e.value for e in events.Scalars("train/tokens_per_second")))
    skipped = [e.value for e in events.Scalars("train/skipped_records")]
    assert skipped == sorted(skipped) and skipped[-1] > 0  # records with a missing image were skipped
    # tokens/s counts image positions too: every sample has 16 of them plus the prompt.
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    per_sample = [h["tokens_per_second"] / h["samples_per_second"] for h in history if "loss" in h]
    assert min(per_sample) > 16 + 60

    for name in ("checkpoint-4", "checkpoint-8", "final-checkpoint"):
        folder = out / name
        for file in ("model.safetensors", "config.json", "tokenizer.json", "preprocessor_config.json",
                     "vision_tower/config.json", "vision_tower/model.safetensors"):
            assert (folder / file).is_file(), folder / file
    assert (out / "checkpoint-8" / "trainer_state.json").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith("tmp-")]
    assert json.loads((out / "final-checkpoint" / "config.json").read_text())["use_cache"] is True


@pytest.mark.parametrize("average", ["sample", "token"])
def test_loss_average_and_the_loss_per_task(average, world, tmp_path):
    """A batch of a 1-token yes/no answer and a long description: `token` weighs each answer token alike, `sample`
    each sample; either way each sample's mean loss goes to its task's log."""
    from PIL import Image

    from ferret.model.modeling import FerretLlamaForCausalLM
    from ferret.processing import FerretProcessor
    from ferret.regions import Box
    from ferret.train.arguments import TrainingArguments
    from ferret.train.trainer import FerretTrainer

    model = FerretLlamaForCausalLM.from_pretrained(world / "base")
    processor = FerretProcessor.from_pretrained(str(world / "base"))
    samples = [([{"from": "human", "value": "<image>\nIs there a red circle in the image?"},
                 {"from": "gpt", "value": "Yes"}], None),
               ([{"from": "human", "value": "<image>\nDescribe the image."},
                 {"from": "gpt", "value": "a red circle <region0> and a blue star <region1>"}],
                [[], [Box(1, 2, 20, 30), Box(30, 30, 50, 54)]])]
    image = Image.new("RGB", (56, 56), (220, 220, 220))
    batch = processor.pad([processor.encode(turns, image, regions=regions) for turns, regions in samples],
                          padding_side="right")
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", loss_average=average)
    trainer = FerretTrainer(model=model, args=args, processing_class=processor)
    with torch.no_grad():
        out = model(**batch)
        trainer._batch_tasks = ["yesno", "describe"]
        loss = trainer.compute_loss(model, dict(batch))
    means = out.sample_loss_sums / out.sample_token_counts
    assert out.sample_token_counts[0] < 6 < 20 < out.sample_token_counts[1]  # "Yes</s>"; the description
    expected = means.mean() if average == "sample" else out.sample_loss_sums.sum() / out.sample_token_counts.sum()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert trainer._task_losses() == {"loss_describe": round(float(means[1]), 4),
                                      "loss_yesno": round(float(means[0]), 4)}
    assert trainer._task_losses() == {}  # reset at each log


def test_trained_checkpoint_loads_and_generates(single_run, world):
    from PIL import Image

    from ferret.model.builder import load_pretrained_model
    from ferret.regions import Box

    out, _ = single_run
    for name in ("checkpoint-4", "final-checkpoint"):
        model, processor = load_pretrained_model(str(out / name), device="cpu")
        assert model.config.region_feature_axes == "xy"
        image = Image.open(world / "images" / "train_00000.png")
        batch = processor([image], ["What is <region0>?"], regions=[[Box(5, 5, 30, 30)]])
        batch.pop("image_sizes", None)
        new = model.generate(**batch, max_new_tokens=4, do_sample=False)
        assert new.shape == (1, 4)
        assert isinstance(processor.decode(new[0]), str)


def test_interrupted_save_keeps_previous_checkpoint_and_resume_matches(single_run, world, tmp_path, monkeypatch):
    """The save of step 8 dies after the weights are written (before its RNG state): checkpoint-8 has no manifest,
    so checkpoint-4 stays the latest; the restart resumes from it and reproduces the uninterrupted run's losses."""
    from ferret.train.train import main

    reference, args = single_run
    out = tmp_path / "run"
    args = [str(out) if a == str(reference) else a for a in args]
    real_save = torch.save

    def dies_at_step_8(obj, f, *a, **k):
        if str(f).endswith(os.path.join("checkpoint-8", "rng_state.pth")):
            raise RuntimeError("simulated crash while saving")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dies_at_step_8)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(args)
    assert (out / "checkpoint-8" / "model.safetensors").is_file()  # written, but the save never finished
    assert not (out / "checkpoint-8" / "manifest.json").exists()
    assert latest_checkpoint(str(out)) == str(out / "checkpoint-4")

    monkeypatch.setattr(torch, "save", real_save)
    assert main(args) == 0
    assert checkpoint_problems(str(out / "checkpoint-8"), require_manifest=True) == []  # saved again, sealed
    resumed, expected = _losses(out), _losses(reference)
    assert sorted(resumed) == sorted(expected)
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], abs=1e-5), step

    def skipped(folder):
        history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
        return [h["skipped_records"] for h in history if "skipped_records" in h]

    assert skipped(out) == skipped(reference)  # the count continues across the restart


def test_run_that_died_after_its_last_checkpoint_only_publishes_it(single_run, tmp_path):
    from safetensors.torch import load_file

    from ferret.train.train import main

    reference, args = single_run
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(reference / "checkpoint-8", out / "checkpoint-8")
    assert main([str(out) if a == str(reference) else a for a in args]) == 0
    final = out / "final-checkpoint"
    assert not (final / "optimizer.pt").exists() and (final / "vision_tower" / "model.safetensors").is_file()
    weights, expected = load_file(final / "model.safetensors"), load_file(reference / "checkpoint-8" / "model.safetensors")
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    assert _losses(out) == _losses(reference)  # no extra step was trained


def test_lora_merge_matches_adapter(world, tmp_path):
    from peft import PeftModel

    from ferret.data.grit import DataOptions, FerretCollator, GritDataset
    from ferret.model.builder import load_pretrained_model
    from ferret.model.modeling import FerretLlamaForCausalLM
    from ferret.weights.merge_lora import main as merge_main
    from ferret.train.train import main

    out = tmp_path / "lora"
    assert main(_tiny(world, out, "--max_steps", "3", "--save_steps", "100", "--per_device_train_batch_size", "4",
                      "--learning_rate", "1e-2", "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16")) == 0
    adapter = out / "final-checkpoint"
    for file in ("adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.bin", "config.json",
                 "tokenizer.json", "preprocessor_config.json", "vision_tower/config.json"):
        assert (adapter / file).is_file(), file
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        out / "base_model")
    extra = torch.load(adapter / "non_lora_trainables.bin", weights_only=True)
    assert "model.mm_projector.weight" in extra and any("region_geo_sampler" in k for k in extra)

    merged_dir = tmp_path / "merged"
    assert merge_main(["--model-path", str(adapter), "--output", str(merged_dir), "--dtype", "float32"]) == 0
    merged, processor = load_pretrained_model(str(merged_dir), device="cpu")
    base = FerretLlamaForCausalLM.from_pretrained(str(out / "base_model")).eval()
    with_adapter = PeftModel.from_pretrained(
        FerretLlamaForCausalLM.from_pretrained(str(out / "base_model")), str(adapter)).eval()

    dataset = GritDataset([str(world / "train.json")], [str(world)], processor, DataOptions(), dataset_types=["toy"])
    batch = FerretCollator(processor)([dataset[i] for i in range(3)])
    batch.pop("labels")
    with torch.no_grad():
        merged_logits = merged(**batch).logits
        adapter_logits = with_adapter(**batch).logits
        base_logits = base(**batch).logits
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-5)
    assert (merged_logits - base_logits).abs().max() > 1e-3  # the adapter did change the model


def test_gradient_order_does_not_depend_on_regions(world):
    """DeepSpeed ZeRO-2/3 reduce (and ZeRO-3 gathers) parameters in the order gradients become ready, and need that
    order identical on every rank. A batch without regions must therefore build the same graph as one with."""
    from ferret.data.grit import DataOptions, FerretCollator, GritDataset
    from ferret.model.modeling import FerretLlamaForCausalLM
    from ferret.processing import FerretProcessor

    model = FerretLlamaForCausalLM.from_pretrained(str(world / "base")).train()
    processor = FerretProcessor.from_pretrained(str(world / "base"))
    dataset = GritDataset([str(world / "train.json")], [str(world)], processor, DataOptions(), dataset_types=["toy"])
    order: list[str] = []
    for name, param in model.named_parameters():
        param.register_post_accumulate_grad_hook(lambda _, name=name: order.append(name))
    collate = FerretCollator(processor)
    with_regions = [i for i in range(len(dataset)) if dataset[i]["region_masks"]][:2]
    without = [i for i in range(len(dataset)) if not dataset[i]["region_masks"]][:2]

    def grad_order(items):
        order.clear()
        model.zero_grad()
        model(**collate([dataset[i] for i in items])).loss.backward()
        return list(order)

    reference = grad_order(with_regions)
    assert len(reference) == len(list(model.parameters()))
    # DeepSpeed ZeRO-2/3 reduce gradients in the order they become ready; it must not depend on the batch.
    assert grad_order(without) == reference


# ------------------------------------------------------------------------------------------------ distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, timeout=600, popen=False):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               "-m", "ferret.train.train", *args]
    if popen:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
    result = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def _descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (torchrun starts its workers in their own sessions, so a process-group kill misses
    them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_run(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and every worker at once, as a crash or a preempted node would."""
    for pid in [*_descendants(process.pid), process.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def _deepspeed_args(world, out, stage, steps, model):
    source = (["--model_name_or_path", str(world / "base")] if model == "checkpoint"
              else ["--init_config", "small", "--tokenizer_path", str(world / "tokenizer")])
    return [*source, *_common(world, out), "--deepspeed", str(REPO / "scripts" / f"zero{stage}.json"),
            "--max_steps", str(steps), "--save_steps", "3", "--per_device_train_batch_size", "2",
            "--learning_rate", "2e-3"]


def _assert_same_losses(resumed_dir, reference_dir, steps):
    resumed, expected = _losses(resumed_dir), _losses(reference_dir)
    assert sorted(expected) == list(range(1, steps + 1)) and sorted(resumed) == sorted(expected)
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], abs=1e-5), (step, resumed, expected)


@pytest.mark.slow
def test_deepspeed_zero2_killed_run_resumes_to_the_same_losses(world, tmp_path):
    steps = 10
    reference = tmp_path / "reference"
    _torchrun(_deepspeed_args(world, reference, 2, steps, "init"))
    assert (reference / "final-checkpoint" / "model.safetensors").is_file()
    assert (reference / "checkpoint-9" / "global_step9").is_dir()  # DeepSpeed's optimizer shards

    out = tmp_path / "killed"
    process = _torchrun(_deepspeed_args(world, out, 2, steps, "init"), popen=True)
    deadline = time.time() + 600
    while not (out / "checkpoint-3" / "manifest.json").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed = process.poll() is None
    _kill_run(process)
    assert killed, "the run ended before it could be killed"
    assert not (out / "final-checkpoint").exists()
    start = latest_checkpoint(str(out))
    assert start is not None and int(start.rsplit("-", 1)[1]) < steps

    _torchrun(_deepspeed_args(world, out, 2, steps, "init"))  # resumes from the latest complete checkpoint
    _assert_same_losses(out, reference, steps)


@pytest.mark.slow
def test_deepspeed_zero3_from_checkpoint_resumes_to_the_same_losses(world, tmp_path):
    """ZeRO-3 partitions the model at load time (zero.Init); the unregistered CLIP tower stays whole."""
    from safetensors.torch import load_file

    steps = 8
    reference = tmp_path / "reference"
    _torchrun(_deepspeed_args(world, reference, 3, steps, "checkpoint"))
    final = load_file(reference / "final-checkpoint" / "model.safetensors")
    start = load_file(world / "base" / "model.safetensors")
    assert set(final) == set(start)
    assert all(final[k].shape == start[k].shape for k in final)  # gathered, not partition-sized
    assert (final["model.region_geo_sampler.dim_projector.weight"]
            - start["model.region_geo_sampler.dim_projector.weight"]).abs().max() > 0

    out = tmp_path / "restarted"
    out.mkdir()
    shutil.copytree(reference / "checkpoint-3", out / "checkpoint-3")
    _torchrun(_deepspeed_args(world, out, 3, steps, "checkpoint"))
    _assert_same_losses(out, reference, steps)
