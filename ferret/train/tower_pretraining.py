"""Stage 0 of the toy world: pretraining its small CLIP-shaped vision tower, the stand-in for CLIP pretraining.

Ferret reads a FROZEN, pretrained CLIP. A frozen random tower is no stand-in for it: its patch features tell
colours apart but hardly shapes (a linear probe on them names the object under an object patch 30% of the time;
colour alone gives 25%), and a tiny LLM reading them learns colours but not shapes. So the demo (`ferret.demo`)
first trains the tower, on the world's training images only, to say under every patch (on the features Ferret
reads, the penultimate layer) which object names cover it (soft cross-entropy over background + every name), where
the patch is (its centre) and the box of the object covering most of it (L1, weighted ``box_weight``), and, with
``digit_weight`` > 0, that box's corners as the model will write them: the hundreds and tens digits of each 0..999
coordinate (cross-entropy over 10 digits, 8 of them per patch). A linear head reads them all and is thrown away.
Then the tower is frozen, as in Ferret.

The recipe in steps: `load_patch_targets` (images and dense per-patch targets of a split), `random_vision_tower`
(the starting tower, its position table a fixed 2-D sin-cos table), `train_tower` (the loop), `score_tower` (the
test split), and `pretrain_vision_tower`, which runs them and saves the tower.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ferret.model.vision import CLIPVisionTower

logger = logging.getLogger(__name__)


@dataclass
class TowerPretrainingConfig:
    """The stage-0 recipe (the demo's defaults: 1,000 steps of 64 images, AdamW 5e-3 one-cycle).

    Args:
        steps: optimiser steps.
        batch_size: images per step, drawn with replacement from the training split.
        learning_rate: peak learning rate of the one-cycle schedule (5% warm-up, at least 2 steps).
        box_weight: weight of the patch-centre and box L1 losses beside the name cross-entropy.
        digit_weight: weight of the box-digit cross-entropy (0: no digit targets).
        seed: seeds the tower's initialisation, the head and the batches.
        bf16: run the forward pass under bf16 autocast (weights stay fp32).
    """

    steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 5e-3
    box_weight: float = 0.5
    digit_weight: float = 0.0
    seed: int = 0
    bf16: bool = False

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TowerPretrainingConfig.{name} must be a positive integer, got {value!r}")
        if self.steps < 3:
            raise ValueError(
                f"TowerPretrainingConfig.steps must be at least 3 (a warm-up and a decay), got {self.steps}")

    @property
    def warmup_fraction(self) -> float:
        """5% of the steps, but at least 2 steps (at most half): OneCycleLR divides by (warm-up steps - 1), so
        e.g. 20 steps at 5% would fail."""
        return min(0.5, max(0.05, 2 / self.steps))


@dataclass
class PatchTargets:
    """One split as the tower sees it: pixels [B, 3, S, S], name shares [B, N, 1 + names] (background first),
    boxes [B, N, 4] (the box of the object covering most of each patch, as fractions of the image) and digits
    [B, N, 8] (that box's x1, y1, x2, y2 on the 0..999 grid: hundreds and tens digit of each)."""

    pixels: "torch.Tensor"
    shares: "torch.Tensor"
    boxes: "torch.Tensor"
    digits: "torch.Tensor"

DIGITS = 8  # hundreds and tens of x1, y1, x2, y2


def box_digits(boxes, width: int, height: int):
    """[N, 4] boxes (x1, y1, x2 + 1, y2 + 1) as fractions of a ``width`` x ``height`` image -> [N, 8] int64: the
    hundreds and tens digits of the box's grid values (``ferret.regions.to_grid`` of the inclusive corners), the
    numbers the model writes for it. All-zero boxes (background) give zeros."""
    import numpy as np

    from ferret.regions import to_grid

    out = np.zeros((len(boxes), DIGITS), dtype=np.int64)
    seen: dict[tuple, list[int]] = {}
    for i, box in enumerate(np.asarray(boxes, dtype=np.float64)):
        key = tuple(box.tolist())
        if key not in seen:
            pixels = (round(box[0] * width), round(box[1] * height), round(box[2] * width) - 1,
                      round(box[3] * height) - 1)
            grid = [to_grid(max(v, 0), size) for v, size in zip(pixels, (width, height, width, height))]
            seen[key] = [d for g in grid for d in (g // 100, g // 10 % 10)]
        out[i] = seen[key]
    return out


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


def random_vision_tower(vision_config: dict, seed: int) -> "CLIPVisionTower":
    """A randomly initialised CLIP-shaped tower whose position embedding is a fixed 2-D sin-cos table.

    CLIP's random init gives the position embedding the same small scale (std 0.02) as the patch weights, so after
    the pre-LayerNorm a patch feature says almost nothing about WHERE the patch is (a linear probe recovers the
    patch column/row with R^2 ~0.1-0.3). A unit-scale sin-cos table makes position plain from the start
    (R^2 > 0.98); `train_tower` keeps it fixed.
    """
    import torch

    from ferret.model.vision import CLIPVisionTower

    torch.manual_seed(seed)
    tower = CLIPVisionTower.from_config(vision_config)
    side = vision_config["image_size"] // vision_config["patch_size"]
    tower.set_position_table(sincos_position_table(side, tower.hidden_size))
    return tower


def load_patch_targets(records_file: Path, image_root: Path, processor, names: Sequence[str],
                       patch: int) -> PatchTargets:
    """Every record of a toy split -> its preprocessed image and dense per-patch targets (see `PatchTargets`;
    ``patch``: the tower's patch size in pixels of the model input)."""
    import numpy as np
    import torch
    from PIL import Image

    from ferret.data.toy import patch_targets
    from ferret.eval.toy import load_records

    side = processor.image_size
    pixels, shares, boxes, digits = [], [], [], []
    for record in load_records(records_file):
        image = Image.open(image_root / record["image"]).convert("RGB")
        pixels.append(processor.preprocess_image(image))
        record_shares, record_boxes = patch_targets(record, np.asarray(image), names, side, patch)
        shares.append(torch.from_numpy(record_shares))
        boxes.append(torch.from_numpy(record_boxes))
        digits.append(torch.from_numpy(box_digits(record_boxes, image.width, image.height)))
    return PatchTargets(torch.stack(pixels), torch.stack(shares), torch.stack(boxes), torch.stack(digits))


def _patch_centres(grid: int) -> "torch.Tensor":
    """[grid * grid, 2]: each patch's centre (x, y) as fractions of the image, row-major."""
    import torch

    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return (torch.stack([xs, ys], dim=-1).reshape(grid * grid, 2).float() + 0.5) / grid


def train_tower(tower: "CLIPVisionTower", head: "torch.nn.Linear", data: PatchTargets, classes: int,
                config: TowerPretrainingConfig) -> None:
    """The loop: ``config.steps`` AdamW steps on random batches of ``data``; the tower's position table stays
    fixed. ``head`` maps a feature to ``classes`` name logits + a patch centre (2) + a box (4) + box digits
    (8 x 10 logits)."""
    import torch
    from tqdm.auto import tqdm

    tower.unfreeze(fixed_positions=True)
    centres = _patch_centres(tower.num_patches_per_side)
    params = [p for p in tower.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.learning_rate,
                                                   total_steps=config.steps, pct_start=config.warmup_fraction)
    generator = torch.Generator().manual_seed(config.seed)

    def loss_of(pixels, shares, boxes, digits):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            out = head(tower.features(pixels)).float()
        foreground = shares.argmax(-1) > 0
        name_loss = -(shares * out[..., :classes].log_softmax(-1)).sum(-1).mean()
        place_loss = (out[..., classes:classes + 2] - centres).abs().mean()
        loss = name_loss + config.box_weight * place_loss
        if foreground.any():
            box_loss = (out[..., classes + 2:classes + 6][foreground] - boxes[foreground]).abs().mean()
            loss = loss + config.box_weight * box_loss
            if config.digit_weight:
                logits = out[..., classes + 6:][foreground].reshape(-1, 10)
                digit_loss = torch.nn.functional.cross_entropy(logits, digits[foreground].reshape(-1))
                loss = loss + config.digit_weight * digit_loss
        return loss

    bar = tqdm(range(config.steps), desc="vision tower", unit="step")
    for _ in bar:
        index = torch.randint(len(data.pixels), (config.batch_size,), generator=generator)
        loss = loss_of(data.pixels[index], data.shares[index], data.boxes[index], data.digits[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    tower.requires_grad_(False)


def score_tower(tower: "CLIPVisionTower", head: "torch.nn.Linear", data: PatchTargets,
                classes: int) -> dict[str, float]:
    """On ``data``: the share of patches (and of object patches) whose majority name the head gets right, and the
    mean error of the box corners in pixels."""
    import torch

    with torch.no_grad():
        out = torch.cat([head(tower.features(chunk)) for chunk in data.pixels.split(256)])
    truth, guess = data.shares.argmax(-1), out[..., :classes].argmax(-1)
    foreground = truth > 0
    side = tower.config.image_size
    box_error = (out[..., classes + 2:classes + 6][foreground] - data.boxes[foreground]).abs().mean().item() * side
    digits = out[..., classes + 6:][foreground].reshape(-1, DIGITS, 10).argmax(-1)
    return {
        "test_patch_accuracy": round((guess == truth).float().mean().item(), 4),
        "test_object_patch_accuracy": round((guess[foreground] == truth[foreground]).float().mean().item(), 4),
        "test_box_error_px": round(box_error, 2),
        "test_box_digit_accuracy": round((digits == data.digits[foreground]).float().mean().item(), 4),
    }


def pretrain_vision_tower(path: Path, vision_config: dict, world_dir: Path, tokenizer_dir: Path,
                          names: Sequence[str], config: TowerPretrainingConfig) -> dict[str, Any]:
    """Stage 0 on the toy world in ``world_dir`` (``names``: its object names); writes the tower to ``path`` (a
    CLIPVisionModel folder). Returns what was measured: steps, seconds and `score_tower` on the test split."""
    import torch
    from transformers import AutoTokenizer

    from ferret.processing import FerretProcessor

    side, patch = vision_config["image_size"], vision_config["patch_size"]
    grid = side // patch
    processor = FerretProcessor(AutoTokenizer.from_pretrained(str(tokenizer_dir)), image_size=side,
                                num_image_tokens=grid * grid)
    start = time.perf_counter()
    train = load_patch_targets(world_dir / "train.json", world_dir, processor, names, patch)
    tower = random_vision_tower(vision_config, config.seed)
    classes = 1 + len(names)
    head = torch.nn.Linear(tower.hidden_size, classes + 2 + 4 + DIGITS * 10)
    train_tower(tower, head, train, classes, config)
    seconds = time.perf_counter() - start

    test = load_patch_targets(world_dir / "test.json", world_dir, processor, names, patch)
    facts = {"steps": config.steps, "seconds": round(seconds, 1), **score_tower(tower, head, test, classes)}
    tower.save_pretrained(str(path))
    logger.info("vision tower: %s", facts)
    return facts
