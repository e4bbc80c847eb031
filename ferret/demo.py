"""`make demo`: train a tiny Ferret on the toy shapes world on a CPU, evaluate it, and draw what it learned.

The demo runs the framework's real entry points, in order:

1. ``ferret.data.toy``: the world (GRIT-format train/test JSON + PNGs) and a 512-piece tokenizer trained on it;
   both are reused when ``world/world.json`` already records the same settings;
   stage 0, `pretrain_vision_tower`: the small CLIP-shaped tower learns to see the world (the stand-in for CLIP
   pretraining; frozen afterwards, as in Ferret);
2. ``ferret.train.train.main``: the HF-Trainer recipe with ``--init_config`` (a JSON of `ferret.model.configs.small`
   fields written by the demo), on CPU, seeded, with a tqdm bar and tensorboard logs;
3. ``ferret.eval.toy`` ``infer`` + ``score``: greedy answers to every test question, then the toy metrics.

Files written (``out_dir`` defaults to ``runs/demo``, ``figs_dir`` to ``figs``)::

    out_dir/world/                      the toy world and world/tokenizer/
    out_dir/model_config.json           the --init_config given to the trainer
    out_dir/vision_tower/               the CLIP tower pretrained on the world, given as --vision_tower (stage 0,
                                        see pretrain_vision_tower)
    out_dir/train/                      trainer output: trainer_state.json, runs/ (tensorboard)
    out_dir/checkpoint/                 the final model (load_pretrained_model, the serving CLI)
    out_dir/test_answers.jsonl          one answer per test record (+ .metrics.json, the full scorer output)
    out_dir/metrics.json                headline metrics (fractions in [0, 1]) + training time and settings
    out_dir/ablation.json               with ``--ablation``: the same run with region features off vs on
    figs_dir/toy_training_curve.png     training loss vs step (from trainer_state.json)
    figs_dir/toy_grounding_examples.png test images, predicted (red) vs true (green) boxes

Command line::

    python -m ferret.demo                      # (= ferret demo, make demo) about 15 minutes on 2 CPU cores
    python -m ferret.demo --ablation           # + the run without region features (twice the training time)
    python -m ferret.demo --max-steps 50 --num-train 500 --num-test 50   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import CLIPVisionModel

    from ferret.data.toy import WorldConfig

logger = logging.getLogger(__name__)

# Headline numbers: keys of `ferret.eval.toy.score_toy`'s summary, copied into metrics.json under the same names.
HEADLINE = (
    "refer_point_accuracy",
    "refer_box_accuracy",
    "refer_free_form_accuracy",
    "refer_accuracy",
    "refer_choice_accuracy",
    "ground_acc@0.5",
    "describe_recall@0.5",
    "yesno_accuracy",
)
CHECKPOINT_DIR = "checkpoint"
VISION_TOWER_DIR = "vision_tower"
ANSWERS_FILE = "test_answers.jsonl"


@dataclass
class DemoConfig:
    """Everything the demo's result depends on; the defaults are the `make demo` run.

    Sizes were chosen by measurement (see the report in the README): a ~1.4M-parameter model on 56 px images
    (7 px patches, 64 image tokens), about 14 minutes on 2 CPU cores.
    """

    # The world.
    num_train: int = 8000
    num_test: int = 500
    image_size: int = 56
    max_objects: int = 2
    # Shape sizes as fractions of the image side (the toy default is 0.2-0.36): 17-28 px shapes on 56 px images.
    min_size_fraction: float = 0.3
    max_size_fraction: float = 0.5
    vocab_size: int = 512
    world_seed: int = 0
    # The model (ferret.model.configs.small).
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    vision_hidden: int = 64
    # Ferret reads the penultimate layer, so 3 layers give 2 that matter.
    vision_layers: int = 3
    patch_size: int = 7
    num_init_point: int = 32
    num_sub_point: tuple[int, ...] = (8, 4)
    num_neighbor: tuple[int, ...] = (4, 4)
    # Stage 0: the vision tower (see pretrain_vision_tower).
    tower_steps: int = 1500
    tower_batch_size: int = 64
    tower_learning_rate: float = 5e-3
    tower_box_weight: float = 0.5
    # Training.
    max_steps: int = 1500
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    seed: int = 0
    logging_steps: int = 10
    # Evaluation.
    eval_batch_size: int = 32
    max_new_tokens: int = 64
    # Threads for torch (None: torch's default, one per core).
    threads: int | None = None

    def __post_init__(self) -> None:
        self.num_sub_point = tuple(int(v) for v in self.num_sub_point)
        self.num_neighbor = tuple(int(v) for v in self.num_neighbor)
        for name in ("num_train", "num_test", "max_steps", "batch_size", "eval_batch_size", "max_new_tokens",
                     "tower_steps", "tower_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")


# ----------------------------------------------------------------------------------------------------------
# 1. World and tokenizer


def world_config(config: DemoConfig) -> "WorldConfig":
    from ferret.data.toy import WorldConfig

    return WorldConfig(max_objects=config.max_objects, min_size_fraction=config.min_size_fraction,
                       max_size_fraction=config.max_size_fraction)


def prepare_world(world_dir: Path, config: DemoConfig) -> tuple[Path, Path]:
    """Generates the world and its tokenizer under ``world_dir`` unless they are there with the same settings.

    Returns (world folder, tokenizer folder).
    """
    from ferret.data.toy import make_world, train_toy_tokenizer, world_corpus

    world = world_config(config)
    wanted = {
        "seed": config.world_seed,
        "image_size": config.image_size,
        "sizes": {"train": config.num_train, "val": 0, "test": config.num_test},
        "config": json.loads(json.dumps(dataclasses.asdict(world))),
        "vocab_size": config.vocab_size,
    }
    stamp = world_dir / "demo_world.json"
    tokenizer_dir = world_dir / "tokenizer"
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted and (tokenizer_dir / "tokenizer.json").is_file():
        logger.info("reusing the toy world in %s", world_dir)
        return world_dir, tokenizer_dir
    if world_dir.exists():
        shutil.rmtree(world_dir)
    start = time.perf_counter()
    splits = make_world(world_dir, num_train=config.num_train, num_val=0, num_test=config.num_test,
                        image_size=config.image_size, seed=config.world_seed, config=world)
    train_toy_tokenizer(tokenizer_dir, world_corpus(splits["train"]), vocab_size=config.vocab_size)
    stamp.write_text(json.dumps(wanted, indent=2) + "\n")
    logger.info("generated the toy world (%d train, %d test) and its tokenizer in %.0f s", config.num_train,
                config.num_test, time.perf_counter() - start)
    return world_dir, tokenizer_dir


def sincos_position_table(side: int, dim: int) -> "torch.Tensor":
    """A 2-D sine-cosine position table [side * side, dim] (row-major patches; x in the first half of the
    channels, y in the second), values in [-1, 1]."""
    import torch

    quarter = dim // 4
    if quarter < 1:
        raise ValueError(f"a 2-D sin-cos table needs at least 4 channels, got {dim}")
    omega = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                            indexing="ij")
    x, y = xs.reshape(-1, 1) * omega, ys.reshape(-1, 1) * omega
    table = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)
    return torch.nn.functional.pad(table, (0, dim - table.shape[1]))


def random_vision_tower(vision_config: dict, seed: int) -> "CLIPVisionModel":
    """A randomly initialised CLIP vision model whose position embedding is a fixed 2-D sin-cos table.

    CLIP's random init gives the position embedding the same small scale (std 0.02) as the patch weights, so after
    the pre-LayerNorm a patch feature says almost nothing about WHERE the patch is (a linear probe recovers the
    patch column/row with R^2 ~0.1-0.3). A unit-scale sin-cos table makes position plain from the start
    (R^2 > 0.98); `pretrain_vision_tower` keeps it fixed.
    """
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    model = CLIPVisionModel(CLIPVisionConfig(**vision_config))
    side = vision_config["image_size"] // vision_config["patch_size"]
    embedding = getattr(model, "vision_model", model).embeddings
    with torch.no_grad():
        weight = embedding.position_embedding.weight  # [1 + side * side, hidden]: CLS first
        weight.zero_()
        weight[1:] = sincos_position_table(side, weight.shape[1])
    return model


def pretrain_vision_tower(path: Path, vision_config: dict, world_dir: Path, tokenizer_dir: Path,
                          config: DemoConfig) -> dict[str, Any]:
    """Stage 0, the toy world's stand-in for CLIP pretraining; writes the tower to ``path`` (a CLIPVisionModel).

    Ferret reads a FROZEN, pretrained CLIP. A frozen random tower is no stand-in for it: its patch features tell
    colours apart but hardly shapes (a linear probe on them names the object under an object patch 30% of the
    time; colour alone gives 25%), and a tiny LLM reading them learns colours but not shapes. So the demo first trains the tower, on the world's
    training images only, to say under every patch (on the features Ferret reads, the penultimate layer) which
    object names cover it (soft cross-entropy over background + every name), where the patch is (its centre) and
    the box of the object covering most of it (L1, weighted ``tower_box_weight``). A linear head reads the three
    and is thrown away. Then the tower is frozen, as in Ferret.

    Returns what was measured: steps, seconds, and on the test images, the share of patches (and of object
    patches) whose majority name the head gets right, and the mean error of the box corners in pixels.
    """
    import numpy as np
    import torch
    from PIL import Image
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from ferret.data.toy import patch_targets
    from ferret.eval.toy import load_records
    from ferret.model.vision import CLIPVisionTower
    from ferret.processing import FerretProcessor

    side, patch = vision_config["image_size"], vision_config["patch_size"]
    grid = side // patch
    names = world_config(config).names
    processor = FerretProcessor(AutoTokenizer.from_pretrained(str(tokenizer_dir)), image_size=side,
                                num_image_tokens=grid * grid)

    def load(split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pixels, shares, boxes = [], [], []
        for record in load_records(world_dir / f"{split}.json"):
            image = Image.open(world_dir / record["image"]).convert("RGB")
            pixels.append(processor.preprocess_image(image))
            record_shares, record_boxes = patch_targets(record, np.asarray(image), names, side, patch)
            shares.append(torch.from_numpy(record_shares))
            boxes.append(torch.from_numpy(record_boxes))
        return torch.stack(pixels), torch.stack(shares), torch.stack(boxes)

    start = time.perf_counter()
    train_pixels, train_shares, train_boxes = load("train")
    tower = CLIPVisionTower(random_vision_tower(vision_config, config.seed))
    tower.vision_tower.requires_grad_(True)
    getattr(tower.vision_tower, "vision_model", tower.vision_tower).embeddings.position_embedding.requires_grad_(False)
    classes = 1 + len(names)
    head = torch.nn.Linear(tower.hidden_size, classes + 2 + 4)
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    centres = (torch.stack([xs, ys], dim=-1).reshape(grid * grid, 2).float() + 0.5) / grid
    params = [p for p in tower.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.tower_learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.tower_learning_rate,
                                                   total_steps=config.tower_steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(config.seed)

    def loss_of(pixels, shares, boxes):
        out = head(tower.features(pixels))
        foreground = shares.argmax(-1) > 0
        name_loss = -(shares * out[..., :classes].log_softmax(-1)).sum(-1).mean()
        place_loss = (out[..., classes:classes + 2] - centres).abs().mean()
        box_loss = (out[..., classes + 2:][foreground] - boxes[foreground]).abs().mean() if foreground.any() else 0
        return name_loss + config.tower_box_weight * (place_loss + box_loss)

    bar = tqdm(range(config.tower_steps), desc="vision tower", unit="step")
    for _ in bar:
        index = torch.randint(len(train_pixels), (config.tower_batch_size,), generator=generator)
        loss = loss_of(train_pixels[index], train_shares[index], train_boxes[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    seconds = time.perf_counter() - start

    test_pixels, test_shares, test_boxes = load("test")
    with torch.no_grad():
        out = torch.cat([head(tower.features(chunk)) for chunk in test_pixels.split(256)])
    truth, guess = test_shares.argmax(-1), out[..., :classes].argmax(-1)
    foreground = truth > 0
    box_error = (out[..., classes + 2:][foreground] - test_boxes[foreground]).abs().mean().item() * side
    tower.save_pretrained(str(path))
    facts = {
        "steps": config.tower_steps,
        "seconds": round(seconds, 1),
        "test_patch_accuracy": round((guess == truth).float().mean().item(), 4),
        "test_object_patch_accuracy": round((guess[foreground] == truth[foreground]).float().mean().item(), 4),
        "test_box_error_px": round(box_error, 2),
    }
    logger.info("vision tower: %s", facts)
    return facts


def write_model_config(path: Path, tokenizer_dir: Path, config: DemoConfig) -> tuple[Path, dict]:
    """The ``--init_config`` JSON: the size fields of `ferret.model.configs.small` for this tokenizer.

    Only sizes go in the file: the trainer's own flags (``--add_region_feature``, ``--vision_tower`` ...) must not
    be overridden. Returns (path, the vision tower's CLIP config).
    """
    from transformers import AutoTokenizer

    from ferret.constants import REGION_TOKEN
    from ferret.model.configs import small

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    vocab = len(tokenizer) + (0 if REGION_TOKEN in tokenizer.get_vocab() else 1)  # <region_fea> is appended
    model_config = small(vocab, hidden=config.hidden, layers=config.layers, heads=config.heads,
                         vision_hidden=config.vision_hidden, vision_layers=config.vision_layers,
                         image_size=config.image_size, patch_size=config.patch_size,
                         num_init_point=config.num_init_point, num_sub_point=config.num_sub_point,
                         num_neighbor=config.num_neighbor)
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "vision_config",
            "mm_hidden_size", "image_size", "sampler_num_init_point", "sampler_num_sub_point",
            "sampler_num_neighbor", "im_region_fea_token")
    fields = {k: getattr(model_config, k) for k in keys}
    fields["vision_config"] = dict(fields["vision_config"])
    path.write_text(json.dumps(fields, indent=2) + "\n")
    return path, fields["vision_config"]


# ----------------------------------------------------------------------------------------------------------
# 2. Training and 3. evaluation, through the real entry points


@dataclass
class Prepared:
    """What training needs besides the settings: the world, its tokenizer, the model config and vision tower."""

    world_dir: Path
    tokenizer_dir: Path
    model_config: Path
    vision_tower: Path
    vision_tower_facts: dict[str, Any]


def prepare(out_dir: Path, config: DemoConfig) -> Prepared:
    """World + tokenizer (cached), the --init_config JSON, then the vision tower (stage 0)."""
    world_dir, tokenizer_dir = prepare_world(out_dir / "world", config)
    model_config, vision_config = write_model_config(out_dir / "model_config.json", tokenizer_dir, config)
    tower = out_dir / VISION_TOWER_DIR
    facts = pretrain_vision_tower(tower, vision_config, world_dir, tokenizer_dir, config)
    return Prepared(world_dir.resolve(), tokenizer_dir.resolve(), model_config.resolve(), tower.resolve(), facts)


def train_args(prepared: Prepared, output_dir: Path, config: DemoConfig, region_feature: bool = True) -> list[str]:
    """The `python -m ferret.train.train` command line of the demo run."""
    return [
        "--init_config", str(prepared.model_config),
        "--vision_tower", str(prepared.vision_tower),
        "--tokenizer_path", str(prepared.tokenizer_dir),
        "--data_path", str(prepared.world_dir / "train.json"),
        "--image_folder", str(prepared.world_dir),
        "--dataset_type", "toy",
        "--add_region_feature", str(region_feature),
        "--output_dir", str(output_dir),
        "--max_steps", str(config.max_steps),
        "--per_device_train_batch_size", str(config.batch_size),
        "--learning_rate", str(config.learning_rate),
        "--lr_scheduler_type", "cosine",
        "--warmup_ratio", str(config.warmup_ratio),
        "--weight_decay", str(config.weight_decay),
        "--max_grad_norm", "1.0",
        "--logging_steps", str(config.logging_steps),
        "--save_strategy", "no",
        "--report_to", "tensorboard",
        "--seed", str(config.seed),
        "--model_max_length", "512",
        "--dataloader_num_workers", "0",
        "--use_cpu", "True",
        "--resume_from_checkpoint", "no",
        "--disable_tqdm", "False",
    ]


def train(prepared: Prepared, run_dir: Path, config: DemoConfig, region_feature: bool = True) -> dict[str, Any]:
    """Trains through `ferret.train.train.main` and moves the final model to ``run_dir/checkpoint``.

    Returns training facts: steps, seconds, seconds per step, final loss.
    """
    from ferret.train.train import FINAL_DIR
    from ferret.train.train import main as train_main

    output_dir = run_dir / "train"
    if output_dir.exists():
        shutil.rmtree(output_dir)
    argv = train_args(prepared, output_dir, config, region_feature)
    logger.info("training: python -m ferret.train.train %s", " ".join(argv))
    start = time.perf_counter()
    code = train_main(argv)
    seconds = time.perf_counter() - start
    if code:
        raise RuntimeError(f"ferret.train.train exited with {code}")
    checkpoint = run_dir / CHECKPOINT_DIR
    if checkpoint.exists():
        shutil.rmtree(checkpoint)
    os.replace(output_dir / FINAL_DIR, checkpoint)
    history = training_history(output_dir)
    losses = [loss for _, loss in history]
    return {
        "steps": config.max_steps,
        "seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / config.max_steps, 4),
        "final_loss": losses[-1] if losses else None,
        "command": "python -m ferret.train.train " + " ".join(argv),
    }


def training_history(output_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) pairs from the trainer's ``trainer_state.json``."""
    state_file = output_dir / "trainer_state.json"
    if not state_file.is_file():
        return []
    state = json.loads(state_file.read_text())
    return [(int(e["step"]), float(e["loss"])) for e in state.get("log_history", []) if "loss" in e]


def evaluate(checkpoint: Path, world_dir: Path, run_dir: Path, config: DemoConfig,
             region_feature: bool = True) -> dict[str, Any]:
    """`python -m ferret.eval.toy infer` then `score` on the test split; returns the scorer's metrics."""
    from ferret.eval.common import metrics_path
    from ferret.eval.toy import main as toy_main

    answers = run_dir / ANSWERS_FILE
    infer = ["infer", "--model-path", str(checkpoint), "--annotation-file", str(world_dir / "test.json"),
             "--answers-file", str(answers), "--device", "cpu", "--batch-size", str(config.eval_batch_size),
             "--max-new-tokens", str(config.max_new_tokens), "--overwrite"]
    if not region_feature:
        infer.append("--no-region-feature")
    start = time.perf_counter()
    toy_main(infer)
    toy_main(["score", "--predictions", str(answers), "--annotation-file", str(world_dir / "test.json")])
    metrics = json.loads(metrics_path(answers).read_text())
    metrics["eval_seconds"] = round(time.perf_counter() - start, 1)
    return metrics


def headline(metrics: dict[str, Any]) -> dict[str, float | None]:
    summary = metrics["summary"]
    return {name: summary.get(name) for name in HEADLINE}


# ----------------------------------------------------------------------------------------------------------
# Figures


def plot_training_curve(histories: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    """Training loss vs step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for label, history in histories.items():
        if history:
            steps, losses = zip(*history)
            ax.plot(steps, losses, label=label, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_yscale("log")
    ax.set_title("Toy-world Ferret on CPU")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_grounding_examples(world_dir: Path, answers: Path, path: Path, count: int = 8, scale: int = 4) -> Path:
    """A grid of test ``ground`` questions: the predicted box (red) and the true box (green) on each image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from ferret.eval.common import read_jsonl
    from ferret.eval.toy import load_records, object_names
    from ferret.regions import Box, parse_regions
    from ferret.serve.draw import draw_regions

    records = [r for r in load_records(world_dir / "test.json") if r["task"] == "ground"][:count]
    predictions = {str(p["id"]): p for p in read_jsonl(answers)}
    columns = min(4, max(1, len(records)))
    rows = max(1, -(-len(records) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.9 * rows), dpi=110, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, record in zip(axes.flat, records):
        image = Image.open(world_dir / record["image"]).convert("RGB")
        width, height = image.size
        big = image.resize((width * scale, height * scale), Image.NEAREST)

        def scaled(box: Sequence[float]) -> Box:
            x1, y1, x2, y2 = box
            return Box(x1 * scale, y1 * scale, (x2 + 1) * scale - 1, (y2 + 1) * scale - 1)

        text = predictions.get(str(record["id"]), {}).get("text", "")
        found = [g for g in parse_regions(text, width, height) if isinstance(g.region, Box)]
        items, colors = [("true", scaled(record["box_x1y1x2y2"][1][0]))], [(40, 170, 60)]
        if found:
            b = found[0].region
            items.append(("predicted", scaled((b.x1, b.y1, b.x2, b.y2))))
            colors.append((220, 30, 30))
        ax.imshow(draw_regions(big, items, width=2, font_size=11, colors=colors))
        names = object_names(record["conversations"][0]["value"])
        title = f"the {names[0]}" if names else str(record["id"])
        ax.set_title(title + ("" if found else " (no box)"), fontsize=8)
    fig.suptitle("Grounding on the toy test split: predicted (red) vs true (green)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------
# The demo


def _display(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (shorter commands to copy)."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def _chat_command(checkpoint: Path, world_dir: Path) -> str:
    from ferret.eval.toy import load_records

    records = load_records(world_dir / "test.json")
    pick = next((r for r in records if r["task"] == "refer" and r["region_type"][0] == ["box"]), records[0])
    boxes = pick["box_x1y1x2y2"][0] or [pick["objects"][0]["box"]]
    region = ",".join(str(v) for v in boxes[0])
    return (f'python -m ferret.serve.cli --model-path {_display(checkpoint)} '
            f'--image-file {_display(world_dir / pick["image"])} '
            f'--query "What is <region0>?" --region box:{region}')


def _format(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:5.1f}"


def summary_table(runs: dict[str, dict[str, float | None]]) -> str:
    """Headline metrics (%) with one column per run."""
    names = list(runs)
    lines = ["metric".ljust(28) + "".join(n.rjust(14) for n in names)]
    for metric in HEADLINE:
        lines.append(metric.ljust(28) + "".join(_format(runs[n].get(metric)).rjust(14) for n in names))
    return "\n".join(lines)


def run_demo(out_dir: str | os.PathLike = "runs/demo", config: DemoConfig | None = None, *,
             figs_dir: str | os.PathLike = "figs", ablation: bool = False, **overrides: Any) -> dict[str, Any]:
    """Builds the world, trains, evaluates, draws; returns what ``metrics.json`` holds (plus ``ablation``).

    ``overrides`` replace fields of ``config`` (e.g. ``max_steps=5``).
    """
    config = dataclasses.replace(config or DemoConfig(), **overrides)
    out_dir, figs_dir = Path(out_dir), Path(figs_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    total_start = time.perf_counter()

    prepared = prepare(out_dir, config)
    world_dir = prepared.world_dir
    training = train(prepared, out_dir, config, region_feature=True)
    checkpoint = out_dir / CHECKPOINT_DIR
    scores = evaluate(checkpoint, world_dir, out_dir, config, region_feature=True)
    result: dict[str, Any] = {
        **headline(scores),
        "vision_tower": prepared.vision_tower_facts,
        "training": training,
        "eval_seconds": scores["eval_seconds"],
        "test_records": scores["alignment"]["evaluated"],
        "checkpoint": str(checkpoint),
        "config": dataclasses.asdict(config),
    }
    histories = {"region features on": training_history(out_dir / "train")}

    if ablation:
        off_dir = out_dir / "ablation_no_region_feature"
        off_training = train(prepared, off_dir, config, region_feature=False)
        off_scores = evaluate(off_dir / CHECKPOINT_DIR, world_dir, off_dir, config, region_feature=False)
        histories["region features off"] = training_history(off_dir / "train")
        comparison = {
            "region_feature_on": headline(scores),
            "region_feature_off": headline(off_scores),
            "training_on": training,
            "training_off": off_training,
            "note": "off = coordinates only (--add_region_feature False at training, --no-region-feature at eval)",
        }
        (out_dir / "ablation.json").write_text(json.dumps(comparison, indent=2) + "\n")
        result["ablation"] = {"on": comparison["region_feature_on"], "off": comparison["region_feature_off"]}

    plot_training_curve(histories, figs_dir / "toy_training_curve.png")
    plot_grounding_examples(world_dir, out_dir / ANSWERS_FILE, figs_dir / "toy_grounding_examples.png")
    result["total_seconds"] = round(time.perf_counter() - total_start, 1)
    result["chat_command"] = _chat_command(checkpoint, world_dir)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")

    runs = {"demo": headline(scores)}
    if ablation:
        runs = {"region fea ON": result["ablation"]["on"], "region fea OFF": result["ablation"]["off"]}
    print()
    print(summary_table(runs))
    tower = prepared.vision_tower_facts
    print(f"\nvision tower: {tower['steps']} steps in {tower['seconds']:.0f} s, names "
          f"{100 * tower['test_object_patch_accuracy']:.1f}% of object patches, box corners off by "
          f"{tower['test_box_error_px']:.1f} px on average")
    print(f"trained {training['steps']} steps in {training['seconds']:.0f} s "
          f"({training['seconds_per_step']:.3f} s/step); total {result['total_seconds']:.0f} s")
    print(f"metrics: {out_dir / 'metrics.json'}   figures: {figs_dir / 'toy_training_curve.png'}, "
          f"{figs_dir / 'toy_grounding_examples.png'}")
    print(f"chat with it:\n  {result['chat_command']}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(prog="python -m ferret.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--figs", default="figs", help="folder of the figures (default figs)")
    parser.add_argument("--ablation", action="store_true",
                        help="also train without region features (coordinates only) and compare")
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--num-train", type=int, default=defaults.num_train)
    parser.add_argument("--num-test", type=int, default=defaults.num_test)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: one per core)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_demo(args.out, figs_dir=args.figs, ablation=args.ablation, max_steps=args.max_steps,
             batch_size=args.batch_size, learning_rate=args.learning_rate, num_train=args.num_train,
             num_test=args.num_test, seed=args.seed, threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
