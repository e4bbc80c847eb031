"""The toy world: a seeded synthetic dataset of coloured shapes in GRIT format, and a tokenizer for it.

`make demo` trains a tiny Ferret (about a million parameters, two CPU cores, ~15 minutes) on this world, so
the world is small on purpose: 112x112 images (8x8 patches for a patch-14 ViT) holding 1-3 flat-coloured
shapes drawn from 4 colours x 4 shapes (each colour+shape at most once per image, so every name is
unambiguous), five fixed question templates, and answers of a few words.

Files written by `make_world(out_dir, ...)`:

    out_dir/images/{split}_{i:05d}.png     one RGB image per record
    out_dir/{train,val,test}.json          a JSON list of records, one record per line
    out_dir/world.json                     the generator's settings (seed, sizes, WorldConfig)

Each record is a GRIT record (docs/compatibility.md §6.1) with one human/gpt turn pair:

    id, image (relative to out_dir), image_w, image_h, task,
    conversations  [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]
    box_x1y1x2y2   per turn, a list of [x1, y1, x2, y2] in raw pixels, inclusive corners
    masks          per turn, one COCO RLE dict {"size": [h, w], "counts": str} per box
    region_type    per turn, one of "point" | "box" | "free_form" per box; the eval uses it to force how a
                   human region is given (training loaders pick point or box themselves); gpt boxes are "box"
    objects        every shape in the image in drawing order: {"name", "color", "shape", "box"}
    choices        (refer_choice only) the two names offered, in the order asked

Regions appear in the text as `<bbox_location{k}>`, k indexing that turn's boxes; the data loader renders
them as coordinates (plus `<region_fea>` in human turns).

Masks and boxes describe the VISIBLE pixels of a shape: shapes drawn later cover earlier ones, a shape's
mask is exactly the pixels painted in its colour in the PNG (no anti-aliasing), and its box is the tight
inclusive bounding box of that mask. Overlaps are allowed but every shape keeps at least
`WorldConfig.min_visible_fraction` of its own area visible.

Question types (`task`), with their fixed templates; the wording of the last four follows the evaluation
prompts of docs/compatibility.md §10.2 (LVIS, RefCOCO, POPE) so the eval code can run on this world unchanged:

    refer         "What is <bbox_location0>?"                               -> "a red triangle"
    refer_choice  "Is the object <bbox_location0> of the image a red triangle or a blue star?"
                                                                            -> "a red triangle"
    ground        "What is the location of the red triangle in the image?"  -> "a red triangle <bbox_location0>"
    describe      "Describe the image."  -> "a red triangle <bbox_location0>, a blue circle <bbox_location1> and
                                             a green star <bbox_location2>"  (left to right by x1, then y1)
    yesno         "Is there a green star in the image?"                     -> "Yes" | "No"  (50/50 per split)

Each split mixes the tasks in `WorldConfig.task_weights` proportions exactly (largest-remainder rounding),
in a seeded random order. Record i of a split depends only on (seed, split, i, its task), so changing
`num_train` leaves val and test unchanged as long as their sizes stay the same.

`world_corpus(records)` lists the texts the model will read or write, and `train_toy_tokenizer` trains a
small LLaMA-style SentencePiece tokenizer on them (plus the ferret_v1 system prompt words).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ferret.conversation import FERRET_SYSTEM
from ferret.flags import program_name
from ferret.regions import PLACEHOLDER, Box, FreeForm, Point, region_to_text

logger = logging.getLogger(__name__)

# Fill colours (RGB). Saturated and far from the light background so a tiny ViT separates them easily.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
TASKS: tuple[str, ...] = ("refer", "refer_choice", "ground", "describe", "yesno")
REGION_TYPES: tuple[str, ...] = ("point", "box", "free_form")
SPLITS: tuple[str, ...] = ("train", "val", "test")

# The fixed templates. "{name}" is "<colour> <shape>", e.g. "red triangle".
REFER_QUESTION = "What is <bbox_location0>?"
REFER_CHOICE_QUESTION = "Is the object <bbox_location0> of the image a {first} or a {second}?"
GROUND_QUESTION = "What is the location of the {name} in the image?"
DESCRIBE_QUESTION = "Describe the image."
YESNO_QUESTION = "Is there a {name} in the image?"
OBJECT_ANSWER = "a {name}"
GROUNDED_OBJECT = "a {name} <bbox_location{k}>"
YES, NO = "Yes", "No"

# Role words of the ferret_v1 template; with its system prompt they are in every prompt, so the tokenizer is
# trained on them too and a prompt costs few tokens.
ROLE_TEXTS: tuple[str, ...] = ("USER:", "ASSISTANT:")

_SPLIT_INDEX = {name: i for i, name in enumerate(SPLITS)}


@dataclass
class WorldConfig:
    """How scenes are drawn and which questions are asked; defaults are the `make demo` world.

    Sizes are fractions of the image side so the same world scales to other image sizes.
    """

    colors: tuple[str, ...] = ("red", "green", "blue", "yellow")
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "star")
    min_objects: int = 1
    max_objects: int = 3
    # Side of a shape's square footprint, as a fraction of the image side (112 px -> 22..40 px).
    min_size_fraction: float = 0.2
    max_size_fraction: float = 0.36
    # Every shape keeps at least this fraction of its own pixels visible after later shapes are drawn.
    min_visible_fraction: float = 0.7
    # Background: a plain light grey whose level is drawn from this range, plus uniform per-pixel noise of
    # +-background_noise levels (0 = plain; noise makes the PNGs ~10x larger).
    background_levels: tuple[int, int] = (205, 245)
    background_noise: int = 0
    task_weights: dict[str, float] = field(
        default_factory=lambda: {"refer": 0.25, "refer_choice": 0.1, "ground": 0.25, "describe": 0.2, "yesno": 0.2}
    )

    def __post_init__(self) -> None:
        self.colors = tuple(self.colors)
        self.shapes = tuple(self.shapes)
        self.background_levels = tuple(self.background_levels)
        unknown_colors = [c for c in self.colors if c not in COLOR_RGB]
        if unknown_colors:
            raise ValueError(f"unknown colours {unknown_colors}; expected names from {sorted(COLOR_RGB)}")
        unknown_shapes = [s for s in self.shapes if s not in SHAPES]
        if unknown_shapes:
            raise ValueError(f"unknown shapes {unknown_shapes}; expected names from {list(SHAPES)}")
        if len(set(self.colors)) != len(self.colors) or len(set(self.shapes)) != len(self.shapes):
            raise ValueError(f"colours {self.colors} and shapes {self.shapes} must not repeat")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if len(self.colors) * len(self.shapes) <= self.max_objects:
            raise ValueError(
                f"{len(self.colors)} colours x {len(self.shapes)} shapes leave no absent object for negatives "
                f"when an image holds {self.max_objects}; add colours or shapes"
            )
        if not 0 < self.min_size_fraction <= self.max_size_fraction < 1:
            raise ValueError(
                f"need 0 < min_size_fraction <= max_size_fraction < 1, got "
                f"{self.min_size_fraction}, {self.max_size_fraction}"
            )
        if not 0 < self.min_visible_fraction <= 1:
            raise ValueError(f"min_visible_fraction must be in (0, 1], got {self.min_visible_fraction}")
        unknown_tasks = [t for t in self.task_weights if t not in TASKS]
        if unknown_tasks or any(w < 0 for w in self.task_weights.values()) or sum(self.task_weights.values()) <= 0:
            raise ValueError(
                f"task_weights {self.task_weights} must give non-negative weights (not all zero) to tasks of {TASKS}"
            )

    @property
    def names(self) -> list[str]:
        """Every object name of this world, "<colour> <shape>"."""
        return [f"{c} {s}" for c in self.colors for s in self.shapes]


@dataclass(frozen=True)
class ToyObject:
    """One drawn shape. `mask` is bool [H, W] of its visible pixels; `box` their tight inclusive bbox."""

    color: str
    shape: str
    box: tuple[int, int, int, int]
    mask: np.ndarray = field(repr=False, compare=False)

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


# ----------------------------------------------------------------------------------------------------------
# Drawing


def shape_mask(shape: str, x0: int, y0: int, side: int, image_size: int) -> np.ndarray:
    """Pixels of `shape` drawn in the square footprint [x0, x0+side-1] x [y0, y0+side-1].

    Returns bool [image_size, image_size] (row = y). Drawn without anti-aliasing, so the mask is exact.
    """
    canvas = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(canvas)
    x1, y1 = x0 + side - 1, y0 + side - 1
    cx, cy = x0 + (side - 1) / 2, y0 + (side - 1) / 2
    if shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=255)
    elif shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)
    elif shape == "cross":
        arm = max(1, round(side / 3))
        lo = x0 + (side - arm) // 2
        draw.rectangle([lo, y0, lo + arm - 1, y1], fill=255)
        lo = y0 + (side - arm) // 2
        draw.rectangle([x0, lo, x1, lo + arm - 1], fill=255)
    elif shape == "star":
        outer = (side - 1) / 2
        inner = 0.45 * outer
        # A five-pointed star spans outer * (1 + cos 36°) vertically; centre that span in the footprint.
        span = outer * (1 + math.cos(math.pi / 5))
        sy = y0 + outer + ((side - 1) - span) / 2
        points = []
        for k in range(10):
            radius = outer if k % 2 == 0 else inner
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), sy + radius * math.sin(angle)))
        draw.polygon(points, fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return np.asarray(canvas) > 0


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def _same_color_too_close(picked: Sequence[tuple[str, str]], footprints: Sequence[tuple[int, int, int]]) -> bool:
    """True when two shapes of one colour would touch: they would read as one blob, so keep a 2 px gap."""
    gap = 2
    for i in range(len(picked)):
        for j in range(i + 1, len(picked)):
            if picked[i][0] != picked[j][0]:
                continue
            (xi, yi, si), (xj, yj, sj) = footprints[i], footprints[j]
            apart_x = xi + si - 1 + gap < xj or xj + sj - 1 + gap < xi
            apart_y = yi + si - 1 + gap < yj or yj + sj - 1 + gap < yi
            if not (apart_x or apart_y):
                return True
    return False


def render_scene(
    rng: np.random.Generator, image_size: int, config: WorldConfig, max_attempts: int = 1000
) -> tuple[np.ndarray, list[ToyObject]]:
    """Draw one image of 1..max_objects distinct coloured shapes.

    Returns (image uint8 [S, S, 3], objects in drawing order). Placements are redrawn until every shape keeps
    `min_visible_fraction` of its pixels visible and shapes of one colour do not touch.
    """
    side_lo = max(4, round(config.min_size_fraction * image_size))
    side_hi = max(side_lo, round(config.max_size_fraction * image_size))
    names = [(c, s) for c in config.colors for s in config.shapes]
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    picked = [names[j] for j in rng.choice(len(names), size=count, replace=False)]
    for _ in range(max_attempts):
        footprints = []
        for _ in picked:
            side = int(rng.integers(side_lo, side_hi + 1))
            x0 = int(rng.integers(0, image_size - side + 1))
            y0 = int(rng.integers(0, image_size - side + 1))
            footprints.append((x0, y0, side))
        if _same_color_too_close(picked, footprints):
            continue
        full_masks = [shape_mask(shape, *fp, image_size) for (_color, shape), fp in zip(picked, footprints)]
        owner = np.full((image_size, image_size), -1, dtype=np.int64)
        for k, full in enumerate(full_masks):
            owner[full] = k
        visible = [owner == k for k in range(count)]
        if all(v.sum() >= config.min_visible_fraction * f.sum() for v, f in zip(visible, full_masks)):
            break
    else:
        raise RuntimeError(
            f"could not place {count} shapes in a {image_size}px image with min_visible_fraction="
            f"{config.min_visible_fraction} after {max_attempts} attempts; use smaller shapes or fewer objects"
        )

    level = int(rng.integers(config.background_levels[0], config.background_levels[1] + 1))
    image = np.full((image_size, image_size, 3), level, dtype=np.int16)
    if config.background_noise > 0:
        noise = rng.integers(-config.background_noise, config.background_noise + 1, size=image.shape)
        image = image + noise
    image = np.clip(image, 0, 255).astype(np.uint8)
    objects = []
    for (color, shape), vis in zip(picked, visible):
        image[vis] = COLOR_RGB[color]
        objects.append(ToyObject(color=color, shape=shape, box=_tight_box(vis), mask=vis))
    return image, objects


# ----------------------------------------------------------------------------------------------------------
# Questions and records


def _allocate(counts_total: int, config: WorldConfig, rng: np.random.Generator) -> list[tuple[str, object]]:
    """Per record (task, variant), tasks in exact proportion, variants balanced within a task, order shuffled.

    Variant: the human region's type for refer and refer_choice, answer-is-yes for yesno, None otherwise.
    """
    weights = {t: config.task_weights.get(t, 0.0) for t in TASKS}
    total = sum(weights.values())
    exact = {t: counts_total * w / total for t, w in weights.items()}
    counts = {t: math.floor(v) for t, v in exact.items()}
    leftover = counts_total - sum(counts.values())
    for t in sorted(TASKS, key=lambda t: (-(exact[t] - counts[t]), TASKS.index(t)))[:leftover]:
        counts[t] += 1
    plan: list[tuple[str, object]] = []
    for task in TASKS:
        for j in range(counts[task]):
            if task in ("refer", "refer_choice"):
                plan.append((task, REGION_TYPES[j % len(REGION_TYPES)]))
            elif task == "yesno":
                plan.append((task, j % 2 == 0))
            else:
                plan.append((task, None))
    order = rng.permutation(len(plan))
    return [plan[k] for k in order]


def _question_and_answer(
    task: str, variant: object, objects: list[ToyObject], config: WorldConfig, rng: np.random.Generator
) -> tuple[str, str, list[ToyObject], list[ToyObject], dict]:
    """(question, answer, human-turn objects, gpt-turn objects, extra record fields) for one record."""
    if task == "refer":
        target = objects[int(rng.integers(len(objects)))]
        return REFER_QUESTION, OBJECT_ANSWER.format(name=target.name), [target], [], {}
    if task == "refer_choice":
        target = objects[int(rng.integers(len(objects)))]
        others = [n for n in config.names if n != target.name]
        distractor = others[int(rng.integers(len(others)))]
        choices = [target.name, distractor] if rng.integers(2) == 0 else [distractor, target.name]
        question = REFER_CHOICE_QUESTION.format(first=choices[0], second=choices[1])
        return question, OBJECT_ANSWER.format(name=target.name), [target], [], {"choices": choices}
    if task == "ground":
        target = objects[int(rng.integers(len(objects)))]
        answer = GROUNDED_OBJECT.format(name=target.name, k=0)
        return GROUND_QUESTION.format(name=target.name), answer, [], [target], {}
    if task == "describe":
        ordered = sorted(objects, key=lambda o: (o.box[0], o.box[1]))
        parts = [GROUNDED_OBJECT.format(name=o.name, k=k) for k, o in enumerate(ordered)]
        answer = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return DESCRIBE_QUESTION, answer, [], ordered, {}
    if task == "yesno":
        present = [o.name for o in objects]
        pool = present if variant else [n for n in config.names if n not in present]
        name = pool[int(rng.integers(len(pool)))]
        return YESNO_QUESTION.format(name=name), YES if variant else NO, [], [], {}
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def make_record(
    split: str,
    index: int,
    task: str,
    variant: object,
    image_size: int,
    config: WorldConfig,
    seed: int,
) -> tuple[dict, np.ndarray]:
    """Build record `index` of `split`; returns (record, image uint8 [S, S, 3]). Deterministic in its arguments."""
    rng = np.random.default_rng([seed, _SPLIT_INDEX[split], index])
    image, objects = render_scene(rng, image_size, config)
    question, answer, human_objects, gpt_objects, extra = _question_and_answer(task, variant, objects, config, rng)
    human_types = [variant] * len(human_objects) if task in ("refer", "refer_choice") else []
    name = f"{split}_{index:05d}"
    record = {
        "id": name,
        "task": task,
        "image": f"images/{name}.png",
        "image_w": image_size,
        "image_h": image_size,
        "conversations": [
            {"from": "human", "value": "<image>\n" + question},
            {"from": "gpt", "value": answer},
        ],
        "box_x1y1x2y2": [[list(o.box) for o in human_objects], [list(o.box) for o in gpt_objects]],
        "masks": [[FreeForm(o.mask).to_rle() for o in human_objects], [FreeForm(o.mask).to_rle() for o in gpt_objects]],
        "region_type": [human_types, ["box"] * len(gpt_objects)],
        "objects": [{"name": o.name, "color": o.color, "shape": o.shape, "box": list(o.box)} for o in objects],
        **extra,
    }
    return record, image


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def write_records(path: Path, records: Sequence[dict]) -> None:
    """Write a JSON list with one record per line (valid JSON, and greppable)."""
    body = ",\n".join(json.dumps(r, separators=(", ", ": ")) for r in records)
    path.write_text("[\n" + body + "\n]\n" if records else "[]\n", encoding="utf-8")


def make_world(
    out_dir: str | Path,
    num_train: int = 10000,
    num_val: int = 200,
    num_test: int = 500,
    image_size: int = 112,
    seed: int = 0,
    config: WorldConfig | None = None,
) -> dict[str, list[dict]]:
    """Generate the toy world under `out_dir` (see the module docstring) and return the records per split."""
    config = config or WorldConfig()
    if image_size < 32:
        raise ValueError(f"image_size {image_size} is too small to draw recognisable shapes; use >= 32")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    sizes = {"train": num_train, "val": num_val, "test": num_test}
    result: dict[str, list[dict]] = {}
    for split, count in sizes.items():
        if count < 0:
            raise ValueError(f"num_{split} must be >= 0, got {count}")
        plan = _allocate(count, config, np.random.default_rng([seed, _SPLIT_INDEX[split], 1 << 30]))
        records = []
        for index, (task, variant) in enumerate(plan):
            record, image = make_record(split, index, task, variant, image_size, config, seed)
            (out_dir / record["image"]).write_bytes(_png_bytes(image))
            records.append(record)
        write_records(out_dir / f"{split}.json", records)
        result[split] = records
        logger.info("wrote %d %s records to %s", count, split, out_dir / f"{split}.json")
    settings = {"seed": seed, "image_size": image_size, "sizes": sizes, "config": dataclasses.asdict(config)}
    (out_dir / "world.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return result


def pixel_owners(record: dict, image: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Which object each pixel of a toy image shows: int64 [H, W], 0 = background, 1 + names.index(name).

    Read back from the PNG: an object's visible pixels are exactly the pixels of its colour inside its box (two
    shapes of one colour never touch, so their boxes do not overlap).
    """
    height, width = image.shape[:2]
    if (record.get("image_w"), record.get("image_h")) != (width, height):
        raise ValueError(f"record {record.get('id')!r}: image is {width}x{height}, the record says "
                         f"{record.get('image_w')}x{record.get('image_h')}")
    owners = np.zeros((height, width), dtype=np.int64)
    for obj in record["objects"]:
        if obj["name"] not in names:
            raise ValueError(f"record {record.get('id')!r}: object {obj['name']!r} is not one of {list(names)}")
        x1, y1, x2, y2 = obj["box"]
        inside = (image[y1:y2 + 1, x1:x2 + 1] == np.asarray(COLOR_RGB[obj["color"]], dtype=image.dtype)).all(-1)
        owners[y1:y2 + 1, x1:x2 + 1][inside] = 1 + list(names).index(obj["name"])
    return owners


def patch_targets(record: dict, image: np.ndarray, names: Sequence[str], size: int,
                  patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense per-patch targets of one toy image as a model sees it (resized to `size`, cut in `patch` squares).

    Returns ``(shares, boxes)``, patches in row-major order (G = size // patch):

    * ``shares`` float32 [G*G, 1 + len(names)]: the fraction of the patch's pixels showing the background
      (column 0) or each object name (column 1 + names.index(name)); rows sum to 1;
    * ``boxes`` float32 [G*G, 4]: the box (x1, y1, x2 + 1, y2 + 1) / image side of the object covering most of
      the patch, zeros where the background does.
    """
    if size % patch:
        raise ValueError(f"size {size} is not a multiple of patch {patch}")
    owners = pixel_owners(record, image, names)
    height, width = owners.shape
    if owners.shape != (size, size):
        owners = np.asarray(Image.fromarray(owners.astype(np.int32)).resize((size, size), Image.NEAREST))
    grid = size // patch
    one_hot = np.eye(1 + len(names), dtype=np.float32)[owners]
    shares = one_hot.reshape(grid, patch, grid, patch, -1).mean(axis=(1, 3)).reshape(grid * grid, -1)
    scale = np.asarray([width, height, width, height], dtype=np.float32)
    object_boxes = np.zeros((1 + len(names), 4), dtype=np.float32)
    for obj in record["objects"]:
        x1, y1, x2, y2 = obj["box"]
        object_boxes[1 + list(names).index(obj["name"])] = np.asarray([x1, y1, x2 + 1, y2 + 1]) / scale
    return shares, object_boxes[shares.argmax(axis=1)]


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


def world_corpus(records: Iterable[dict]) -> list[str]:
    """Every text a model reads or writes on these records, with regions rendered as coordinates.

    Human regions appear once as a point and once as a box (the loader picks either), gpt regions as boxes;
    `<image>` and `<region_fea>` are left out because they become special tokens, not SentencePiece text.
    """
    texts = []
    for record in records:
        width, height = record["image_w"], record["image_h"]
        for turn, message in enumerate(record["conversations"]):
            value = message["value"].replace("<image>\n", "").replace("<image>", "")
            boxes = record["box_x1y1x2y2"][turn]

            def render(as_point: bool, boxes=boxes, value=value) -> str:
                def one(match: re.Match) -> str:
                    x1, y1, x2, y2 = boxes[int(match.group(1))]
                    region = Point((x1 + x2) / 2, (y1 + y2) / 2) if as_point else Box(x1, y1, x2, y2)
                    return region_to_text(region, width, height)

                return PLACEHOLDER.sub(one, value)

            texts.append(render(as_point=False))
            if message["from"] == "human" and boxes:
                texts.append(render(as_point=True))
    return texts


def train_toy_tokenizer(out_dir: str | Path, texts: Sequence[str], vocab_size: int = 512) -> Path:
    """Train a LLaMA-style SentencePiece BPE tokenizer on `texts` plus the ferret_v1 prompt words.

    Like LLaMA's: byte fallback, digits split one per token (so every 0..999 coordinate tokenizes), identity
    normalisation, a dummy prefix, unk=0, bos=1, eos=2 and no pad. Writes `tokenizer.model` (raw
    SentencePiece) plus the `transformers` files (`tokenizer.json`, `tokenizer_config.json`) so that
    `LlamaTokenizer.from_pretrained(out_dir)` and `AutoTokenizer.from_pretrained(out_dir)` load it with BOS
    added. Returns out_dir. `<region_fea>` is not in the vocabulary: the model code adds it.
    """
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The prompt words appear in every training sample; weight them like a tenth of the data so BPE keeps
    # them whole.
    prompt_lines = [FERRET_SYSTEM.strip(), " ".join(ROLE_TEXTS)] * max(1, len(texts) // 10)
    corpus = [t for t in texts if t] + prompt_lines
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            allow_whitespace_only_pieces=True,
            character_coverage=1.0,
            shuffle_input_sentence=False,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as error:
        raise ValueError(
            f"SentencePiece could not build a {vocab_size}-piece vocabulary from {len(corpus)} texts: {error}"
        ) from error
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())

    from transformers import LlamaTokenizer

    tokenizer = LlamaTokenizer.from_pretrained(str(out_dir), add_bos_token=True, add_eos_token=False)
    if len(tokenizer) != vocab_size:
        raise RuntimeError(f"transformers loaded {len(tokenizer)} tokens from {out_dir}, expected {vocab_size}")
    tokenizer.save_pretrained(str(out_dir))
    # save_pretrained records how this copy was loaded; those flags are not properties of the tokenizer.
    config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only"):
        tokenizer_config.pop(key, None)
    config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    logger.info("trained a %d-piece tokenizer on %d texts into %s", vocab_size, len(corpus), out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=program_name("ferret.data.toy"),
        description="Generate the toy shapes world (GRIT-format train/val/test JSON + PNG images) and, "
        "optionally, a small LLaMA-style SentencePiece tokenizer trained on its texts.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--num-train", type=int, default=10000, help="training records (default 10000)")
    parser.add_argument("--num-val", type=int, default=200, help="validation records (default 200)")
    parser.add_argument("--num-test", type=int, default=500, help="test records (default 500)")
    parser.add_argument("--image-size", type=int, default=112, help="square image side in pixels (default 112)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--max-objects", type=int, default=WorldConfig.max_objects, help="shapes per image, at most (default 3)"
    )
    parser.add_argument("--noise", type=int, default=0, help="background noise amplitude in grey levels (default 0)")
    parser.add_argument(
        "--tokenizer",
        action="store_true",
        help="also train a tokenizer on the training texts into OUT/tokenizer",
    )
    parser.add_argument("--vocab-size", type=int, default=512, help="tokenizer vocabulary size (default 512)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    config = WorldConfig(max_objects=args.max_objects, background_noise=args.noise)
    splits = make_world(args.out, args.num_train, args.num_val, args.num_test, args.image_size, args.seed, config)
    for split, records in splits.items():
        counts = {t: sum(r["task"] == t for r in records) for t in TASKS}
        print(f"{split}: {len(records)} records {counts}")
    if args.tokenizer:
        folder = train_toy_tokenizer(args.out / "tokenizer", world_corpus(splits["train"]), args.vocab_size)
        print(f"tokenizer: {folder}")


if __name__ == "__main__":
    main()
