"""What every source reader shares: build options, annotated regions, question/answer pairs, seeded draws, and
the assembly of several question/answer pairs about one image into one GRIT record.

A reader turns the annotations of one image into ``QA`` items: one human question and one gpt answer whose texts
hold ``<bbox_location{k}>`` placeholders; ``k`` indexes the QA's own ``question_regions`` (human turn) or
``answer_regions`` (gpt turn). Because placeholders count per turn, packing QAs into a multi-turn record needs no
renumbering: ``pack`` concatenates turns and draws, for every human turn, how its regions are referred to.

Referring forms. A human turn refers to its regions as a ``point``, a ``box`` or a ``free_form`` shape, drawn with
the seed from ``BuildOptions.refer_forms``. The record keeps the draw in ``refer_as`` (one entry per turn, null for
gpt turns). ``free_form`` turns carry their regions' segmentation as COCO RLE in ``masks`` (a box region with a
mask gives the shape's feature mask); ``point`` turns carry it too when it exists, so that the loaders'
``segment_mask|*`` point sampling lands on the object; ``box`` turns carry none. Points themselves are never
written: the loaders sample them (``--point_input_sample``). A ``free_form`` draw on a region without a usable
segmentation (empty, or not overlapping its box) falls back to ``box`` and is counted; regions without any
segmentation are drawn among point and box only.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ferret.constants import IMAGE_TOKEN
from ferret.regions import FreeForm

REFER_FORMS = ("point", "box", "free_form")


class BuildError(ValueError):
    """An input cannot be read as the format it was given as; the message names the file and what is wrong."""


@dataclass
class BuildOptions:
    """How annotations become records. Defaults are what ``ferret data build`` uses.

    Args:
        seed: every random draw (templates, order, referring forms, negatives) comes from ``random.Random`` seeded
            with (seed, task kind, image id), so a record depends on its image alone, not on the order of files.
        refer_forms: relative weights of point / box / free_form for human turns.
        negative_share: the fraction of questions (per image and task kind) that ask about something absent.
        qa_per_record: at most this many question/answer pairs are packed into one record.
        records_per_image: at most this many records per image and task kind (0: as many as the QAs fill).
        max_instances: a grounding question whose answer would list more boxes than this is skipped.
        yesno_negative_share: the share of "no" answers in the yes/no existence set (vg_yesno_object).
        canonical: use the first template of every list and keep annotation order (for reading and for tests);
            referring forms and negatives are still drawn with the seed.
    """

    seed: int = 0
    refer_forms: dict[str, float] = field(default_factory=lambda: {"point": 1.0, "box": 1.0, "free_form": 1.0})
    negative_share: float = 0.2
    qa_per_record: int = 6
    records_per_image: int = 0
    max_instances: int = 8
    yesno_negative_share: float = 0.5
    canonical: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.refer_forms) - set(REFER_FORMS)
        if unknown:
            raise ValueError(f"refer_forms: unknown form(s) {sorted(unknown)}; expected {list(REFER_FORMS)}")
        if any(w < 0 for w in self.refer_forms.values()) or sum(self.refer_forms.values()) <= 0:
            raise ValueError(f"refer_forms weights must be >= 0 with a positive sum, got {self.refer_forms}")
        for name in ("negative_share", "yesno_negative_share"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.qa_per_record < 1:
            raise ValueError(f"qa_per_record must be >= 1, got {self.qa_per_record}")
        if self.records_per_image < 0 or self.max_instances < 1:
            raise ValueError("records_per_image must be >= 0 and max_instances >= 1")


def parse_refer_forms(text: str) -> dict[str, float]:
    """``"point=1,box=1,free_form=1"`` -> weights; a ValueError names the bad item."""
    weights: dict[str, float] = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in REFER_FORMS or not value:
            raise ValueError(f"--refer-forms item {item!r}: expected FORM=WEIGHT with FORM in {list(REFER_FORMS)}")
        try:
            weights[name] = float(value)
        except ValueError as err:
            raise ValueError(f"--refer-forms item {item!r}: {value!r} is not a number") from err
    return weights


@dataclass
class Target:
    """An annotated region: a box (x1, y1, x2, y2) in pixels, corners inclusive, inside the image, and optionally
    its segmentation as given by the source (COCO polygons, or an RLE dict)."""

    box: tuple[float, float, float, float]
    segmentation: Any = None


@dataclass
class QA:
    """One question (human turn) and its answer (gpt turn) about an image."""

    question: str
    answer: str
    question_regions: list[Target] = field(default_factory=list)
    answer_regions: list[Target] = field(default_factory=list)
    negative: bool = False


class Draws:
    """The seeded choices for one image and task kind."""

    def __init__(self, options: BuildOptions, kind: str, image_key: Any):
        self.options = options
        self.rng = random.Random(f"{options.seed}/{kind}/{image_key}")

    def pick(self, choices):
        return choices[0] if self.options.canonical else self.rng.choice(choices)

    def shuffle(self, items: list) -> list:
        if not self.options.canonical:
            self.rng.shuffle(items)
        return items

    def form(self, free_form: bool = True) -> str | None:
        """A referring form by the weights; ``free_form=False`` (no segmentation to draw it) leaves it out, and
        None means that only free_form has weight but cannot be drawn."""
        forms = [f for f in REFER_FORMS if self.options.refer_forms.get(f, 0) > 0 and (free_form or f != "free_form")]
        if not forms:
            return None
        weights = [self.options.refer_forms[f] for f in forms]
        return forms[0] if len(forms) == 1 else self.rng.choices(forms, weights)[0]

    def direction(self) -> str:
        """"refer" or "ground" for an annotation that makes one question; alternating in canonical mode."""
        if self.options.canonical:
            self._turns = getattr(self, "_turns", -1) + 1
            return ("refer", "ground")[self._turns % 2]
        return self.rng.choice(("refer", "ground"))

    def count(self, expected: float) -> int:
        """``expected`` rounded up or down at random so that its mean is ``expected``."""
        whole = int(expected)
        return whole + (self.rng.random() < expected - whole)

    def sample(self, population: list, k: int) -> list:
        return self.rng.sample(population, min(k, len(population)))


def negatives_for(positives: int, share: float, draws: Draws) -> int:
    """How many negative questions go with ``positives`` positive ones so that they make ``share`` of all."""
    return draws.count(positives * share / (1 - share)) if share > 0 and positives > 0 else 0


# ----------------------------------------------------------------------------------------------------------
# Boxes and masks


def box_from_xywh(x: float, y: float, w: float, h: float, width: int, height: int) -> tuple | None:
    """A source box [x, y, w, h] as (x1, y1, x2, y2) clamped to the image; None when it is smaller than a pixel or
    does not overlap the image."""
    return box_from_corners(x, y, x + w, y + h, width, height)


def box_from_corners(x1: float, y1: float, x2: float, y2: float, width: int, height: int) -> tuple | None:
    """Corners (x1 <= x2, y1 <= y2) clamped to [0, width - 1] x [0, height - 1]; None when narrower or lower than
    one pixel, not numbers, or outside the image. (Inlined rather than ``regions.clamp_box``: this runs once per
    annotation, millions of times, and the checks here already cover what clamp_box validates.)"""
    try:
        x1, y1, x2, y2 = float(x1), float(y1), float(x2), float(y2)
    except (TypeError, ValueError):
        return None
    if not (x2 - x1 >= 1 and y2 - y1 >= 1) or x2 < 0 or y2 < 0 or x1 > width - 1 or y1 > height - 1 \
            or max(abs(x1), abs(y1), abs(x2), abs(y2)) == float("inf"):
        return None  # also rejects NaN: every comparison with NaN is False
    return (_compact(max(x1, 0.0)), _compact(max(y1, 0.0)), _compact(min(x2, width - 1.0)),
            _compact(min(y2, height - 1.0)))


def _compact(v: float) -> float | int:
    v = round(v, 2)
    return int(v) if v.is_integer() else v


def segmentation_rle(segmentation: Any, box: tuple, width: int, height: int) -> dict | None:
    """The source segmentation (COCO polygons, or an RLE dict with str or list counts) as a compressed COCO RLE
    of the ``width`` x ``height`` image, through ferret.regions; None when it is empty, unreadable or does not
    overlap ``box``."""
    if not segmentation:
        return None
    try:
        if isinstance(segmentation, dict):
            mask = FreeForm.from_rle(segmentation).mask
            if mask.shape != (height, width):
                return None
        else:
            mask = None
            for polygon in segmentation:
                if not isinstance(polygon, (list, tuple)) or len(polygon) < 6:
                    continue
                vertices = list(zip(polygon[0::2], polygon[1::2]))
                try:
                    part = FreeForm.from_polygon(vertices, width, height).mask
                except ValueError:
                    continue
                mask = part if mask is None else (mask | part)
            if mask is None:
                return None
    except (ValueError, TypeError):
        return None
    x1, y1, x2, y2 = (int(v) for v in box)
    if not mask[y1:y2 + 1, x1:x2 + 1].any():
        return None
    return FreeForm(mask).to_rle()


# ----------------------------------------------------------------------------------------------------------
# Records


@dataclass
class ImageRef:
    """Where a record's image is: ``path`` relative to the source's image folder, and its size."""

    path: str
    width: int
    height: int


def pack(qas: list[QA], image: ImageRef, kind: str, key: Any, draws: Draws, stats: Counter) -> list[dict]:
    """Several QAs about one image -> GRIT records of up to ``qa_per_record`` pairs each.

    Counts into ``stats``: ``qa`` and ``negative_qa`` packed, ``form:<f>`` per human turn, ``free_form_fallback``
    when a free_form draw had no usable segmentation, ``qa_beyond_records_per_image`` for QAs over the cap.
    """
    options = draws.options
    size = options.qa_per_record
    groups = [qas[i:i + size] for i in range(0, len(qas), size)]
    if options.records_per_image and len(groups) > options.records_per_image:
        stats["qa_beyond_records_per_image"] += sum(len(g) for g in groups[options.records_per_image:])
        groups = groups[:options.records_per_image]
    records = []
    for n, group in enumerate(groups):
        turns, boxes, masks, refer_as = [], [], [], []
        any_mask = False
        for qa in group:
            question = qa.question if turns else f"{IMAGE_TOKEN}\n{qa.question}"
            segmented = all(t.segmentation for t in qa.question_regions)
            form = draws.form(free_form=segmented) if qa.question_regions else None
            if qa.question_regions and form is None:
                form = "box"
                stats["free_form_fallback"] += 1
            turn_masks: list[dict | None] = [None] * len(qa.question_regions)
            if form in ("free_form", "point"):
                turn_masks = [segmentation_rle(t.segmentation, t.box, image.width, image.height)
                              for t in qa.question_regions]
                if form == "free_form" and not all(turn_masks):
                    form, turn_masks = "box", [None] * len(qa.question_regions)
                    stats["free_form_fallback"] += 1
            if form is not None:
                stats[f"form:{form}"] += 1
            any_mask = any_mask or any(m is not None for m in turn_masks)
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": qa.answer}]
            boxes += [[list(t.box) for t in qa.question_regions], [list(t.box) for t in qa.answer_regions]]
            masks += [turn_masks, [None] * len(qa.answer_regions)]
            refer_as += [form, None]
            stats["qa"] += 1
            stats["negative_qa"] += qa.negative
        record = {"id": f"{kind}/{key}/{n}", "image": image.path, "image_w": image.width, "image_h": image.height,
                  "conversations": turns, "box_x1y1x2y2": boxes}
        if any_mask:
            record["masks"] = masks
        record["refer_as"] = refer_as
        records.append(record)
    return records
