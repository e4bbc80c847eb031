"""Synthetic models and batches shared by the benchmarks in scripts/bench/ (not a benchmark itself).

Owns: the named benchmark configurations (``small``, ``7b``, ``13b``) with a randomly initialised CLIP-shaped tower
(no download), the length distribution of synthetic samples, Ferret-shaped token sequences (image positions, text,
``<region_fea>`` tokens, supervised answers) and random region masks (boxes, points, free-form polygons) built with
ferret/regions.py exactly as the processor builds them.

The sequences imitate what FerretProcessor.encode writes for a GRIT-style referring conversation:

    [BOS] system + "USER:"  | IMAGE x num_image_tokens | question with R x "[x1, y1, x2, y2] <region_fea>" |
    "ASSISTANT:" answer "</s>"  (labels = the answer only)

Token ids are random (the benchmarks measure speed, not text). Lengths are synthetic: a log-normal around a median
text length, not measured on GRIT. For the serving benchmarks it also makes a tiny saved checkpoint, random images
and an RLE bomb (a mask region that declares 10^12 pixels in a few hundred bytes).

The benchmarks import the installed ``ferret`` package (``pip install -e .``, or ``PYTHONPATH`` pointing at the
repository) and load this file by its path, next to theirs: it is not a package module.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ferret import regions as R  # noqa: E402
from ferret.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from ferret.model.configs import ferret_7b, ferret_13b, small  # noqa: E402
from ferret.model.configuration import FerretConfig  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CONFIG_NAMES = ("small", "7b", "13b")

# CLIP ViT-L/14-336 (the released tower), built with random weights so nothing is downloaded.
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
SYSTEM_TOKENS = 36  # "A chat between a curious human and an artificial intelligence assistant. ..." + "USER:"
TOKENS_PER_REGION = 18  # " [123, 456, 789, 999] <region_fea>" with LLaMA's digit-by-digit numbers
ASSISTANT_TOKENS = 4  # " ASSISTANT:"
SPECIAL_IDS = 3  # 0 pad/unk, 1 BOS, 2 EOS are never drawn as text


def add_model_arguments(parser) -> None:
    """The model-shape options common to the benchmarks."""
    parser.add_argument("--config", choices=CONFIG_NAMES, default="small",
                        help="named shape: small (CPU-sized), 7b or 13b (released shapes; use --device cuda)")
    parser.add_argument("--layers", type=int, help="override the number of decoder layers")
    parser.add_argument("--hidden", type=int, help="override the decoder width (small only)")
    parser.add_argument("--vision-layers", type=int, help="override the number of CLIP layers")
    parser.add_argument("--attn", choices=["sdpa", "eager", "flash_attention_2"], default="sdpa")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--seed", type=int, default=0)


def setup(args, what: str) -> tuple[torch.device, torch.dtype, FerretConfig]:
    """Threads, device, dtype and model config from the options of `add_model_arguments` plus ``--threads`` and
    ``--quick`` (which means one thread unless told otherwise); refuses a 7B/13B decoder on CPU."""
    if args.quick and not args.threads:
        args.threads = 1  # on a shared CPU, one thread avoids OpenMP threads waiting on each other
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    config = bench_config(args.config, args.layers, args.hidden, args.vision_layers)
    refuse_large_on_cpu(config, device, what)
    return device, dtype, config


def bench_config(name: str, layers: int | None = None, hidden: int | None = None,
                 vision_layers: int | None = None) -> FerretConfig:
    """A named configuration with a random-weight CLIP tower described by ``vision_config``.

    small: LLaMA h256 x 4 layers, 32001 tokens; a CLIP-shaped ViT h64 x 2 layers on 112 px (64 image tokens);
    sampler 128 points, anchors (32, 8), neighbours (8, 8). 7b / 13b: the released shapes (CLIP ViT-L/14-336,
    576 image tokens, sampler 512 points, (128, 32) anchors, (24, 24) neighbours).
    """
    if name == "small":
        width = hidden or 256
        config = small(32001, hidden=width, layers=layers or 4, heads=max(1, width // 64), vision_hidden=64,
                       vision_layers=vision_layers or 2, image_size=112, patch_size=14, num_init_point=128,
                       num_sub_point=(32, 8), num_neighbor=(8, 8), max_position_embeddings=4096)
        config.intermediate_size = int(width * 8 / 3) // 64 * 64 or width * 4  # LLaMA's ~8/3 ratio
        return config
    if hidden is not None:
        raise ValueError(f"--hidden only applies to --config small, not {name}")
    vision = dict(CLIP_L_336, num_hidden_layers=vision_layers or CLIP_L_336["num_hidden_layers"])
    make = ferret_7b if name == "7b" else ferret_13b
    overrides = dict(mm_vision_tower=None, vision_config=vision, image_size=336, mm_hidden_size=1024)
    if layers is not None:
        overrides["num_hidden_layers"] = layers
    return make(**overrides)


def build_bench_model(config: FerretConfig, device: torch.device, dtype: torch.dtype, attn: str, seed: int = 0):
    """Random model (and tower) in ``dtype`` on ``device``; initialised on the device to spare host memory."""
    from ferret.model.modeling import FerretLlamaForCausalLM

    config._attn_implementation = attn
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = FerretLlamaForCausalLM(config)
            model.load_vision_tower()
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype)


def llm_is_large(config: FerretConfig) -> bool:
    return config.hidden_size >= 2048 and config.num_hidden_layers > 4


def refuse_large_on_cpu(config: FerretConfig, device: torch.device, what: str) -> None:
    if device.type == "cpu" and llm_is_large(config):
        raise SystemExit(
            f"{what}: a {config.num_hidden_layers}-layer h{config.hidden_size} model on CPU would take hours; "
            "use --device cuda, or --layers 1 --vision-layers 1 to check the 7B shapes on CPU"
        )


# --------------------------------------------------------------------------------------------------------------
# Lengths
# --------------------------------------------------------------------------------------------------------------


def text_lengths(count: int, median: int, spread: float, minimum: int, maximum: int,
                 rng: np.random.Generator) -> np.ndarray:
    """``count`` text lengths (tokens besides the image), log-normal around ``median`` with sigma ``spread``,
    clipped to [minimum, maximum]. spread 0 gives every sample the median."""
    if spread <= 0:
        return np.full(count, int(np.clip(median, minimum, maximum)))
    lengths = np.exp(rng.normal(math.log(median), spread, size=count))
    return np.clip(np.round(lengths), minimum, maximum).astype(int)


def padding_waste(lengths: np.ndarray, batch: int) -> float:
    """Share of padded positions when consecutive groups of ``batch`` samples are right-padded to their longest."""
    n = len(lengths) // batch * batch
    groups = lengths[:n].reshape(-1, batch)
    return 1.0 - groups.sum() / (groups.max(1) * batch).sum()


def packing_waste(lengths: np.ndarray, row_length: int) -> float:
    """Share of empty positions when samples are packed first-fit-decreasing into rows of ``row_length``."""
    rows: list[int] = []
    for length in sorted(lengths.tolist(), reverse=True):
        for i, used in enumerate(rows):
            if used + length <= row_length:
                rows[i] += length
                break
        else:
            rows.append(length)
    return 1.0 - sum(rows) / (len(rows) * row_length)


# --------------------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------------------


def random_region_masks(count: int, width: int, height: int, rng: np.random.Generator) -> list[torch.Tensor]:
    """``count`` feature masks bool [height, width]: ~60% boxes, ~20% points, ~20% free-form polygons."""
    masks = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.6:
            w, h = rng.uniform(0.05, 0.6) * width, rng.uniform(0.05, 0.6) * height
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            region = R.Box(x, y, x + w, y + h)
        elif kind < 0.8:
            region = R.Point(rng.uniform(0, width - 1), rng.uniform(0, height - 1))
        else:
            cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
            radius = rng.uniform(0.05, 0.25) * min(width, height)
            angles = np.sort(rng.uniform(0, 2 * math.pi, size=int(rng.integers(5, 10))))
            polygon = [(cx + radius * rng.uniform(0.5, 1.0) * math.cos(a),
                        cy + radius * rng.uniform(0.5, 1.0) * math.sin(a)) for a in angles]
            region = R.FreeForm.from_polygon(polygon, width, height)
        masks.append(torch.from_numpy(R.region_mask(region, width, height)))
    return masks


@dataclass
class SampleSpec:
    text_tokens: int  # tokens besides the image positions
    regions: int
    image_width: int
    image_height: int


def min_text_tokens(regions: int) -> int:
    return SYSTEM_TOKENS + regions * TOKENS_PER_REGION + ASSISTANT_TOKENS + 8


def sample_specs(count: int, config: FerretConfig, median_text: int, spread: float, regions: int,
                 max_length: int, rng: np.random.Generator) -> list[SampleSpec]:
    """Per-sample lengths (log-normal), image sizes (320..640 px a side) and region counts."""
    lo = min_text_tokens(regions)
    hi = max_length - config.num_image_tokens
    if hi < lo:
        raise ValueError(f"max length {max_length} leaves no room for {regions} regions after the image")
    lengths = text_lengths(count, max(median_text, lo), spread, lo, hi, rng)
    sizes = rng.integers(320, 641, size=(count, 2))
    return [SampleSpec(int(n), regions, int(w), int(h)) for n, (w, h) in zip(lengths, sizes, strict=True)]


def make_sample(spec: SampleSpec, config: FerretConfig, rng: np.random.Generator) -> dict:
    """One encoded sample: input_ids [L], labels [L], images [3, S, S], region_masks (list of bool [H, W])."""
    vocab = config.vocab_size - 1  # the last id is <region_fea>
    region_token = config.im_region_fea_token
    question = spec.text_tokens - SYSTEM_TOKENS - ASSISTANT_TOKENS
    answer = max(2, min(question * 3 // 5, question - spec.regions * TOKENS_PER_REGION))
    question -= answer
    text = rng.integers(SPECIAL_IDS, vocab, size=spec.text_tokens)
    text[text == region_token] = SPECIAL_IDS
    ids = [1, *text[: SYSTEM_TOKENS - 1].tolist(), *([IMAGE_TOKEN_INDEX] * config.num_image_tokens)]
    q = text[SYSTEM_TOKENS - 1 : SYSTEM_TOKENS - 1 + question].tolist()
    # Each region: its coordinates in text, then <region_fea>, spread through the question.
    for k in range(spec.regions):
        q[min(len(q) - 1, (k + 1) * TOKENS_PER_REGION - 1)] = region_token
    ids += q + text[SYSTEM_TOKENS - 1 + question : SYSTEM_TOKENS - 1 + question + ASSISTANT_TOKENS].tolist()
    answer_ids = text[len(ids) - config.num_image_tokens :].tolist()
    answer_ids[-1] = 2  # </s>
    ids += answer_ids
    labels = [IGNORE_INDEX] * (len(ids) - len(answer_ids)) + answer_ids
    size = config.image_size
    image = torch.from_numpy(rng.standard_normal((3, size, size), dtype=np.float32))
    masks = random_region_masks(spec.regions, spec.image_width, spec.image_height, rng)
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "images": image, "region_masks": masks}


def collate(samples: list[dict], padding_side: str = "right", pad_id: int = 0) -> dict:
    """Pads like FerretProcessor.pad: input_ids/labels/attention_mask [B, L], images [B, 3, S, S], masks per sample."""
    length = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(samples), length), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        span = slice(length - n, length) if padding_side == "left" else slice(0, n)
        ids[i, span], labels[i, span], attention[i, span] = s["input_ids"], s["labels"], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attention,
            "images": torch.stack([s["images"] for s in samples]),
            "region_masks": [list(s["region_masks"]) for s in samples]}


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Moves a batch like the Trainer does (masks included, so the sampler's point sampling runs on the device)."""
    out = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "labels", "attention_mask")}
    out["images"] = batch["images"].to(device=device, dtype=dtype)
    out["region_masks"] = [[m.to(device) for m in masks] for masks in batch["region_masks"]]
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- serving inputs


def save_tiny_checkpoint(folder: Path, corpus: list[str]) -> str:
    """A tiny random Ferret (56 px images, 16 image tokens, context 512) with a toy tokenizer trained on
    ``corpus``, saved into ``folder`` as a checkpoint the servers load; returns its path."""
    from transformers import AutoTokenizer

    from ferret.data.toy import train_toy_tokenizer
    from ferret.model.configs import build_model
    from ferret.processing import FerretProcessor

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(train_toy_tokenizer(folder / "tokenizer", corpus, vocab_size=320))
    processor = FerretProcessor(tokenizer, image_size=56, num_image_tokens=16, model_max_length=512)
    config = small(len(processor.tokenizer), region_token=processor.region_token_id)
    build_model(config).eval().save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    return str(folder / "model")


def random_image(width: int = 64, height: int = 48, seed: int = 0):
    """An RGB PIL image of uniform random pixels."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def rle_bomb_region(side: int = 1_000_000, runs: int = 250) -> dict:
    """A well-formed mask region whose COCO RLE declares ``side`` x ``side`` pixels (10^12 by default) in a few
    hundred bytes: ``runs`` equal runs that sum to side^2, compressed by pycocotools without decoding anything."""
    from pycocotools import mask as mask_utils

    total = side * side
    if total % runs or total // runs >= 2**32:
        raise ValueError(f"{runs} equal runs of 32-bit length cannot cover {side} x {side} pixels")
    rle = mask_utils.frPyObjects({"counts": [total // runs] * runs, "size": [side, side]}, side, side)
    return {"type": "mask", "rle": {"size": [side, side], "counts": rle["counts"].decode("ascii")}}
