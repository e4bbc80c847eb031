"""GRIT-format training data: reading, checking, mixing, turning records into model inputs, and collation.

This module owns the GRIT record format (docs/compatibility.md §6.1) and all between a data file and a padded batch:

* ``DATASET_TYPES``: the original's loader tags (``vg_object`` ... ``cc3m_595k``) plus ``grit`` (any GRIT-format
  file with boxes) and ``toy`` (ferret/data/toy.py). A file's type is given explicitly (``dataset_types``, one per
  data path, e.g. from a ``--dataset_type`` flag) or, failing that, inferred from the FILE NAME with the original's
  substring rule (``infer_dataset_type``); directory names never take part (docs/compatibility.md §12.15).
* ``check_record``: the one function that decides whether a record is usable. ``GritDataset`` skips what it
  rejects, and ``python -m ferret.data.validate`` reports everything it finds (plus missing/unreadable images).
* ``mix_indices`` / ``mix``: ``data_multiple`` exactly as the original (floor(m) full copies + ceil(n * frac(m))
  picks with replacement) followed by one shuffle, all from numpy Generators seeded by ``seed`` alone, so every
  rank builds the same order (docs/compatibility.md §12.14).
* ``GritDataset``: lazy; records are held as one compact byte buffer per file (no per-record Python objects, so
  DataLoader workers share it copy-on-write), images are read in ``__getitem__``. Per human turn it picks point or
  box once (seeded by (seed, epoch, item)), samples points with ``point_input_sample`` (docs/compatibility.md §7.4),
  limits each region's feature mask by its segmentation (``within``), and hands everything to
  ``FerretProcessor.encode``. Bad records are logged, counted (``bad_records``) and replaced by the next good one.
* ``FerretCollator``: ``processor.pad(features, "right")``.

Record format (one JSON list per file, or JSON lines): ``image`` (relative to the image folder), ``image_w``,
``image_h``, ``conversations`` [{"from": "human"|"gpt", "value"}...], ``box_x1y1x2y2`` (per turn, a list of
[x1, y1, x2, y2] raw pixels, inclusive corners), optional ``masks`` (same nesting, COCO RLE dicts or null),
optional ``id``. ``<bbox_location{k}>`` in turn t refers to ``box_x1y1x2y2[t][k]``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from ferret.constants import IMAGE_TOKEN, POINT_SPAN, REGION_TOKEN
from ferret.processing import PLACEHOLDER, ROLE_OF, FerretProcessor
from ferret.regions import MAX_MASK_PIXELS, Box, FreeForm, Point, Region, check_rle, clamp_box

logger = logging.getLogger(__name__)

T = TypeVar("T")

POINT_INPUT_SAMPLES = ("segment_mask|uniform", "segment_mask|center", "segment_mask|gaussian", "gaussian", "center")
# segment_mask|center and segment_mask|gaussian look at no more than this many random mask pixels (as the original).
MAX_CANDIDATE_PIXELS = 1000
# Standard deviation of the centre jitter, as a fraction of the box width / height (the original's 0.15).
CENTER_JITTER = 0.15

# Why a record can be rejected. Errors make a record unusable; warnings are reported by the validator only.
REASONS: dict[str, str] = {
    "missing_file": "the data file does not exist",
    "bad_json": "the record (or file) is not valid JSON",
    "too_deep": "the record (or file) is JSON nested deeper than the reader allows",
    "not_a_list": "the file's top level is not a list of records",
    "not_a_record": "the record is not a JSON object",
    "unknown_dataset_type": "the file's dataset type could not be inferred from its name",
    "bad_image_field": "'image' is not a non-empty string",
    "missing_image": "the image file does not exist",
    "unreadable_image": "the image file cannot be decoded",
    "missing_image_size": "image_w / image_h missing or not positive integers",
    "image_too_large": "image_w x image_h is more pixels than a region mask may have",
    "image_size_mismatch": "the image's real size differs from image_w x image_h",
    "bad_conversations": "'conversations' is not a non-empty list of {from, value} turns",
    "turn_order": "turns do not alternate human/gpt starting with human",
    "missing_image_token": "the first human turn has no <image>",
    "misplaced_image_token": "<image> appears outside the first human turn (or there is no image)",
    "raw_region_token": "a turn contains a bare <region_fea> instead of a <bbox_location{k}> placeholder",
    "box_nesting": "box_x1y1x2y2 is not one list of boxes per turn",
    "bad_box": "a box is not 4 finite numbers",
    "degenerate_box": "a box has x2 < x1 or y2 < y1",
    "box_outside_image": "a box does not overlap the image",
    "placeholder_out_of_range": "a <bbox_location{k}> refers to a box the turn does not have",
    "region_without_image": "a human turn refers to a region (read as <region_fea> features) but there is no image",
    "mask_nesting": "masks does not have the nesting of box_x1y1x2y2",
    "bad_refer_as": "refer_as is not one entry per turn, each 'point', 'box', 'free_form' or null",
    "bad_rle": "a mask is not a decodable COCO RLE of the image's size",
    "empty_region": "a mask is empty or does not overlap its box",
    "encode_failed": "the processor rejected the record (e.g. the image would be truncated away)",
    "malformed_record": "a field has an unexpected JSON type",
    # warnings
    "box_overhang": "a box extends past the image border (it is clamped)",
    "unused_box": "a box no placeholder refers to",
    "unanswered_turn": "the conversation ends with a human turn",
}
REFER_FORMS = frozenset({"point", "box", "free_form"})
WARNING_REASONS = frozenset({"box_overhang", "unused_box", "unanswered_turn"})


# ----------------------------------------------------------------------------------------------------------
# Options and dataset types


@dataclass
class DataOptions:
    """How records become training samples; defaults are the Ferret recipe (docs/compatibility.md §9.2).

    Args:
        point_input_sample: how a human region given as a point is sampled (docs/compatibility.md §7.4):
            ``segment_mask|uniform``, ``segment_mask|center``, ``segment_mask|gaussian``, ``gaussian``, ``center``.
        refer_previous_point: within a human turn, equal boxes reuse one sampled point, and in the following gpt
            turn a box equal to one of them is written as that point.
        add_region_feature: human regions get ``<region_fea>`` plus a feature mask.
        no_coor: human regions are only ``<region_fea>`` and gpt boxes are dropped (needs add_region_feature).
        seed: seeds mixing/shuffling and the per-item point/box choices.
        max_consecutive_bad: ``__getitem__`` raises after this many bad records in a row.
        max_bad_fraction: if set, raise once more than this fraction of the records tried in this process were
            bad (checked after 200 tries).
    """

    point_input_sample: str = "segment_mask|center"
    refer_previous_point: bool = False
    add_region_feature: bool = True
    no_coor: bool = False
    seed: int = 0
    max_consecutive_bad: int = 50
    max_bad_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.point_input_sample not in POINT_INPUT_SAMPLES:
            raise ValueError(
                f"point_input_sample must be one of {POINT_INPUT_SAMPLES}, got {self.point_input_sample!r}"
            )
        if self.no_coor and not self.add_region_feature:
            raise ValueError("no_coor needs add_region_feature: without coordinates a region needs its <region_fea>")
        if self.max_consecutive_bad < 0:
            raise ValueError(f"max_consecutive_bad must be >= 0, got {self.max_consecutive_bad}")
        if self.max_bad_fraction is not None and not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")


@dataclass(frozen=True)
class DatasetType:
    """A loader tag of the original. ``file_pattern``: the file-name substring that selects it (None: only by
    name); ``default_multiple``: its copies when no data_multiple is given (git_instruction: 3)."""

    name: str
    location_instruction: bool
    file_pattern: str | None
    default_multiple: float = 1.0


# In the original's matching order (docs/compatibility.md §6.2), then this project's additions.
DATASET_TYPES: dict[str, DatasetType] = {
    t.name: t
    for t in (
        DatasetType("vg_object", True, "vg_object"),
        DatasetType("vg_yesno_object", True, "vg_yesno_object"),
        DatasetType("vg_attribute", True, "vg_attribute"),
        DatasetType("vg_relation", True, "vg_relation"),
        DatasetType("vg_region", True, "vg_region"),
        DatasetType("git_instruction", True, "git_instruction", default_multiple=3.0),
        DatasetType("llava_instruct", False, "llava_instruct"),
        DatasetType("grounded_llava_boxes", True, "grounded_llava_boxes"),
        DatasetType("refexp", True, "refexp"),
        DatasetType("flickr", True, "flickr"),
        DatasetType("objects365", True, "objects365"),
        DatasetType("cc3m_595k", False, "cc3m_595k"),
        DatasetType("grit", True, "grit"),
        DatasetType("toy", True, None),
    )
}


def infer_dataset_type(path: str) -> str:
    """The dataset type of a data file from its FILE NAME (not its directories), by the original's substring rule.

    Raises ValueError when no tag matches.
    """
    name = os.path.basename(os.fspath(path))
    for dtype in DATASET_TYPES.values():
        if dtype.file_pattern is not None and dtype.file_pattern in name:
            return dtype.name
    patterns = [t.file_pattern for t in DATASET_TYPES.values() if t.file_pattern]
    raise ValueError(
        f"cannot tell the dataset type of {path}: its file name {name!r} contains none of {patterns}; "
        f"give the type explicitly (dataset_types / --dataset_type, one of {list(DATASET_TYPES)})"
    )


def resolve_dataset_type(path: str, explicit: str | None = None) -> DatasetType:
    """The explicit type when given (None, "" or "auto" mean infer), else ``infer_dataset_type(path)``."""
    if explicit not in (None, "", "auto"):
        if explicit not in DATASET_TYPES:
            raise ValueError(f"unknown dataset type {explicit!r} for {path}; expected one of {list(DATASET_TYPES)}")
        return DATASET_TYPES[explicit]
    return DATASET_TYPES[infer_dataset_type(path)]


# ----------------------------------------------------------------------------------------------------------
# Reading files and images


class RecordError(ValueError):
    """A record cannot be used; ``reason`` is a key of REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def is_jsonl(path: str) -> bool:
    return os.fspath(path).endswith((".jsonl", ".ndjson"))


def parse_record(blob: bytes | str) -> Any:
    """One record's JSON text -> the record. RecordError ``bad_json``, or ``too_deep`` for nesting deeper than
    Python's JSON reader allows (it raises RecursionError, which must never reach the caller)."""
    try:
        return json.loads(blob)
    except RecursionError:
        pass  # raised below, outside the handler, so no RecursionError traceback is chained to it
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RecordError("bad_json", f"not valid JSON: {err}") from None
    raise RecordError("too_deep", "the JSON is nested deeper than Python's JSON reader allows "
                      f"(about {sys.getrecursionlimit()} levels)")


# A JSON string (escapes included) or one structural character; used to split a top-level array without parsing.
_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]')


def split_json_array(data: bytes) -> list[bytes]:
    """The elements of a top-level JSON array as raw bytes, found by scanning brackets and strings only.

    Used when the whole file cannot be parsed at once (an element nested too deeply for the JSON reader): each
    element is then parsed on its own, so one bad element is one bad record. ValueError when ``data`` is not an
    array with balanced brackets.
    """
    start = len(data) - len(data.lstrip())
    if data[start:start + 1] != b"[":
        raise ValueError("the top level is not a JSON list")
    elements: list[bytes] = []
    depth = 0
    element_start = start + 1
    for match in _JSON_TOKEN.finditer(data, start):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
        elif token in (b"]", b"}"):
            depth -= 1
            if depth == 0:
                last = data[element_start:match.start()].strip()
                if last or elements:
                    elements.append(last)
                if data[match.end():].strip():
                    raise ValueError("text follows the top-level list")
                return elements
        elif token == b"," and depth == 1:
            elements.append(data[element_start:match.start()].strip())
            element_start = match.end()
    raise ValueError("the top-level list is not closed")


def read_record_blobs(path: str) -> list[bytes]:
    """The records of a data file as JSON texts (one per record), for ``parse_record``: the lines of a ``.jsonl``
    file (blank lines skipped), the elements of a JSON list file.

    A JSON list is parsed once to check it (and re-serialised per record); when it holds something nested too
    deeply for that, its elements are split out without parsing, so only the deep ones fail (in
    ``parse_record``). Raises RecordError (``bad_json``, ``not_a_list``) naming the file when it is not valid
    JSON or not a list.
    """
    path = os.fspath(path)
    if is_jsonl(path):
        with open(path, "rb") as f:
            return [b for b in (line.strip() for line in f) if b]
    with open(path, "rb") as f:
        data = f.read()
    try:
        records = json.loads(data)
        if isinstance(records, list):
            return [json.dumps(r, separators=(",", ":")).encode("utf-8") for r in records]
    except RecursionError:
        try:
            return split_json_array(data)
        except ValueError as err:
            raise RecordError("bad_json", f"{path}: nested too deeply to parse, and {err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RecordError("bad_json", f"{path}: not valid JSON ({err})") from None
    raise RecordError("not_a_list", f"{path}: the top level is a {type(records).__name__}, expected a JSON list "
                      "of records")


def load_records(path: str) -> list[Any]:
    """Records of a data file: a JSON list, or JSON lines (``.jsonl``; blank lines skipped).

    Raises ValueError naming the file (and line or record) when something is not valid JSON or the top level is
    not a list.
    """
    path = os.fspath(path)
    records = []
    if is_jsonl(path):
        with open(path, "rb") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        records.append(parse_record(line))
                    except RecordError as err:
                        raise RecordError(err.reason, f"{path} line {number}: {err}") from None
        return records
    for index, blob in enumerate(read_record_blobs(path)):
        try:
            records.append(parse_record(blob))
        except RecordError as err:
            raise RecordError(err.reason, f"{path} record {index}: {err}") from None
    return records


def image_path(image_folder: str, image: str) -> str:
    """Where a record's image lives (``image`` may be absolute)."""
    return os.path.join(image_folder, image)


def read_image(path: str) -> Image.Image:
    """The image at ``path``, fully decoded, as RGB. RecordError ``missing_image`` / ``unreadable_image``."""
    if not os.path.isfile(path):
        raise RecordError("missing_image", f"image file {path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise RecordError("unreadable_image", f"image file {path} cannot be read: {err}") from err


# ----------------------------------------------------------------------------------------------------------
# Checking a record


@dataclass
class Problem:
    """One thing wrong with a record. ``severity`` is "error" (record unusable) or "warning"."""

    reason: str
    message: str
    turn: int | None = None

    @property
    def severity(self) -> str:
        return "warning" if self.reason in WARNING_REASONS else "error"


@dataclass
class CheckedRecord:
    """A record as ``check_record`` read it: turns, per-turn boxes (pixels, as given) and decoded masks
    (bool [H, W] or None per box), and the problems found."""

    turns: list[dict] = field(default_factory=list)
    boxes: list[list[Box]] = field(default_factory=list)
    masks: list[list[np.ndarray | None]] = field(default_factory=list)
    refer_as: list[str | None] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def raise_if_bad(self, where: str = "") -> None:
        errors = self.errors
        if errors:
            raise RecordError(errors[0].reason, where + "; ".join(f"[{p.reason}] {p.message}" for p in errors))


def decode_rle(rle: Any, width: int | None, height: int | None, decode: bool = True) -> np.ndarray | None:
    """A COCO RLE dict -> bool mask [H, W]; ValueError when it is malformed or not ``height`` x ``width``.

    Its size is compared with the image's (when known) and with MAX_MASK_PIXELS, and its runs are checked,
    before anything is decoded (``regions.check_rle``). ``decode=False`` only checks (returns None).
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"expected an RLE dict with 'size' and 'counts', got {type(rle).__name__}")
    image_size = (width, height) if width is not None and height is not None else None
    if not decode:
        check_rle(rle, image_size=image_size, max_pixels=MAX_MASK_PIXELS)
        return None
    return FreeForm.from_rle(rle, image_size=image_size, max_pixels=MAX_MASK_PIXELS).mask


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _declared_size(record: dict) -> tuple[int, int] | None:
    w, h = record.get("image_w"), record.get("image_h")
    if isinstance(w, int) and isinstance(h, int) and not isinstance(w, bool) and not isinstance(h, bool) \
            and w > 0 and h > 0:
        return w, h
    return None


@dataclass
class _ImageFacts:
    """What the checks of a record's regions need to know about its image."""

    has_image: bool
    width: int | None
    height: int | None
    size_known: bool  # width/height are known and small enough to build masks at


def check_record(
    record: Any, dataset_type: DatasetType | str, image_size: tuple[int, int] | None = None,
    region_feature: bool = True, masks: str = "decode",
) -> CheckedRecord:
    """Reads a GRIT record and lists every problem with it (see REASONS). The one place that decides whether a
    record is usable: ``GritDataset`` skips what it rejects, ``ferret.data.validate`` reports it.

    Args:
        record: the parsed JSON record.
        dataset_type: its type (records without ``location_instruction`` have no boxes).
        image_size: the real (W, H) of its image when it was read; compared with image_w / image_h.
        region_feature: human regions will be read as ``<region_fea>`` features (DataOptions.add_region_feature),
            which needs an image.
        masks: ``"decode"`` the RLE masks; ``"check"`` them without decoding (sizes and runs); ``"skip"`` them
            (cheap structure checks only, e.g. for length estimates). The masks of the result are None unless
            decoded.

    Returns:
        CheckedRecord with the turns, boxes, decoded masks and problems. Boxes and masks are only filled when
        the nesting is right; use ``raise_if_bad`` to reject a record with errors.
    """
    dtype = DATASET_TYPES[dataset_type] if isinstance(dataset_type, str) else dataset_type
    out = CheckedRecord()
    if not isinstance(record, dict):
        out.problems.append(Problem("not_a_record", f"the record is a {type(record).__name__}, expected an object"))
        return out
    image = _check_image_fields(record, dtype, image_size, out.problems)
    texts = _check_conversations(record, image.has_image, out)
    if texts is None:
        return out
    _check_refer_as(record, out)
    usable, box_nesting_ok = _check_boxes(record, dtype, image, out)
    _check_placeholders(texts, dtype, image.has_image, region_feature, out)
    _check_masks(record, dtype, masks, image, usable, box_nesting_ok, out)
    return out


def _check_image_fields(record: dict, dtype: DatasetType, image_size: tuple[int, int] | None,
                        problems: list[Problem]) -> _ImageFacts:
    """The ``image`` field, and image_w / image_h against the limit and the real image size."""
    has_image = "image" in record and record["image"] is not None
    if has_image and not (isinstance(record["image"], str) and record["image"]):
        problems.append(Problem("bad_image_field", f"'image' must be a non-empty string, got {record['image']!r}"))
    declared = _declared_size(record)
    size_given = record.get("image_w") is not None or record.get("image_h") is not None
    if declared is None and (dtype.location_instruction or size_given):
        problems.append(Problem("missing_image_size", "image_w and image_h must be positive integers, got "
                                f"{record.get('image_w')!r} x {record.get('image_h')!r}"))
    too_large = declared is not None and declared[0] * declared[1] > MAX_MASK_PIXELS
    if too_large:
        # Region masks are built at the image's size: refuse before anything that size is allocated.
        problems.append(Problem("image_too_large", f"image_w x image_h = {declared[0]}x{declared[1]} is "
                                f"{declared[0] * declared[1]} pixels, more than the limit of {MAX_MASK_PIXELS}"))
        declared = None
    if image_size is not None and declared is not None and tuple(image_size) != declared:
        problems.append(Problem("image_size_mismatch", f"the image is {image_size[0]}x{image_size[1]} but the record "
                                f"says image_w x image_h = {declared[0]}x{declared[1]}"))
    width, height = declared or (tuple(image_size) if image_size is not None else (None, None))
    return _ImageFacts(has_image, width, height, size_known=width is not None and not too_large)


def _check_conversations(record: dict, has_image: bool, out: CheckedRecord) -> list[str] | None:
    """Turns alternate human/gpt and end with an answer; the image token only in the first human turn (and
    there when the record has an image); no bare region token. Returns the turns' texts, or None when the
    conversation cannot be read at all (the rest of the record is not checked then)."""
    problems = out.problems
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        problems.append(Problem("bad_conversations", "'conversations' must be a non-empty list of turns"))
        return None
    texts: list[str] = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            problems.append(Problem("bad_conversations", f"turn {t} must be an object with a string 'value'", t))
            return None
        texts.append(turn["value"])
        role = ROLE_OF.get(str(turn.get("from", "")).lower())
        if role != t % 2:
            expected = "human" if t % 2 == 0 else "gpt"
            problems.append(Problem("turn_order", f"turn {t} is from {turn.get('from')!r}, expected {expected!r} "
                                    "(turns alternate human/gpt starting with human)", t))
    out.turns = turns
    if len(turns) % 2 == 1 and not any(p.reason == "turn_order" for p in problems):
        problems.append(Problem("unanswered_turn", f"the last turn ({len(turns) - 1}) is a human turn with no answer",
                                len(turns) - 1))
    for t, text in enumerate(texts):
        if IMAGE_TOKEN in text and (t > 0 or not has_image):
            where = "there is no image" if not has_image else "only the first human turn may hold it"
            problems.append(Problem("misplaced_image_token", f"turn {t} contains {IMAGE_TOKEN} but {where}", t))
        if REGION_TOKEN in text:
            problems.append(Problem("raw_region_token", f"turn {t} contains a bare {REGION_TOKEN}; regions are "
                                    "written as <bbox_location{k}> placeholders", t))
    if has_image and IMAGE_TOKEN not in texts[0]:
        problems.append(Problem("missing_image_token", f"the first human turn has no {IMAGE_TOKEN}", 0))
    return texts


def _check_refer_as(record: dict, out: CheckedRecord) -> None:
    """How each human turn refers to its regions (written by `ferret data build`; optional)."""
    n = len(out.turns)
    refer_as = record.get("refer_as")
    out.refer_as = [None] * n
    if refer_as is None:
        return
    if not isinstance(refer_as, list) or len(refer_as) != n or any(
            form is not None and form not in REFER_FORMS for form in refer_as):
        out.problems.append(Problem("bad_refer_as", f"refer_as must hold one entry per turn ({n}), each one of "
                                    f"{sorted(REFER_FORMS)} or null, got {str(refer_as)[:80]}"))
    else:
        out.refer_as = list(refer_as)


def _check_boxes(record: dict, dtype: DatasetType, image: _ImageFacts,
                 out: CheckedRecord) -> tuple[list[list[bool]], bool]:
    """Fills ``out.boxes`` (one list per turn) from ``box_x1y1x2y2``; returns per box whether its mask may be
    compared with it (a well-formed box inside the image), and whether the per-turn nesting was right."""
    problems = out.problems
    n = len(out.turns)
    out.boxes = [[] for _ in range(n)]
    out.masks = [[] for _ in range(n)]
    raw_boxes = record.get("box_x1y1x2y2") if dtype.location_instruction else None
    box_nesting_ok = True
    if raw_boxes is not None:
        if not isinstance(raw_boxes, list) or len(raw_boxes) != n:
            got = f"{len(raw_boxes)} entries" if isinstance(raw_boxes, list) else type(raw_boxes).__name__
            problems.append(Problem("box_nesting", f"box_x1y1x2y2 must hold one list per turn ({n}), got {got}"))
            box_nesting_ok = False
            raw_boxes = None
    usable: list[list[bool]] = [[] for _ in range(n)]
    for t in range(n):
        turn_boxes = raw_boxes[t] if raw_boxes is not None else None
        if turn_boxes is None:
            continue
        if not isinstance(turn_boxes, list):
            problems.append(Problem("box_nesting", f"box_x1y1x2y2[{t}] must be a list of boxes, got "
                                    f"{type(turn_boxes).__name__}", t))
            box_nesting_ok = False
            continue
        for k, raw in enumerate(turn_boxes):
            box, ok = _check_box(raw, t, k, image, problems)
            out.boxes[t].append(box)
            usable[t].append(ok)
    return usable, box_nesting_ok


def _check_box(raw: Any, t: int, k: int, image: _ImageFacts, problems: list[Problem]) -> tuple[Box, bool]:
    """Box ``k`` of turn ``t`` -> (the box, or an empty one when unreadable; whether it is usable)."""
    if not (isinstance(raw, (list, tuple)) and len(raw) == 4 and all(_is_number(v) for v in raw)):
        problems.append(Problem("bad_box", f"box {k} of turn {t} must be 4 finite numbers, got {raw!r}", t))
        return Box(0, 0, 0, 0), False
    x1, y1, x2, y2 = (float(v) for v in raw)
    box = Box(x1, y1, x2, y2)
    width, height = image.width, image.height
    if x2 < x1 or y2 < y1:
        problems.append(Problem("degenerate_box", f"box {k} of turn {t} {list(raw)} has x2 < x1 or y2 < y1", t))
        return box, False
    if image.size_known:
        if x2 < 0 or y2 < 0 or x1 > width - 1 or y1 > height - 1:
            problems.append(Problem("box_outside_image", f"box {k} of turn {t} {list(raw)} lies outside the "
                                    f"{width}x{height} image", t))
            return box, False
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            problems.append(Problem("box_overhang", f"box {k} of turn {t} {list(raw)} extends past the "
                                    f"{width}x{height} image (clamped)", t))
    return box, True


def _check_placeholders(texts: list[str], dtype: DatasetType, has_image: bool, region_feature: bool,
                        out: CheckedRecord) -> None:
    """Every ``<bbox_location{k}>`` names a box of its turn, every box is named, and regions read as features
    have an image to read them from."""
    problems = out.problems
    for t, text in enumerate(texts):
        used = set()
        for match in PLACEHOLDER.finditer(text):
            k = int(match.group(1))
            if t % 2 == 0 and region_feature and not has_image and k < len(out.boxes[t]) and k not in used:
                problems.append(Problem("region_without_image", f"turn {t}: {match.group(0)} is read as "
                                        f"{REGION_TOKEN} features of the image, but the record has no image", t))
            used.add(k)
            if k >= len(out.boxes[t]):
                have = f"{len(out.boxes[t])} box(es)" if dtype.location_instruction else \
                    f"no boxes (dataset type {dtype.name!r} has none)"
                problems.append(Problem("placeholder_out_of_range", f"turn {t}: {match.group(0)} refers to box {k} but "
                                        f"the turn has {have}", t))
        unused = [k for k in range(len(out.boxes[t])) if k not in used]
        if unused:
            problems.append(Problem("unused_box", f"turn {t}: box(es) {unused} are not referred to by any "
                                    "placeholder", t))


def _check_masks(record: dict, dtype: DatasetType, masks: str, image: _ImageFacts, usable: list[list[bool]],
                 box_nesting_ok: bool, out: CheckedRecord) -> None:
    """Fills ``out.masks`` (one per box, or None): the ``masks`` field nests like the boxes, each RLE is sound
    (decoded when ``masks == "decode"``), not empty, and overlaps its box."""
    if masks not in ("decode", "check", "skip"):
        raise ValueError(f"masks must be 'decode', 'check' or 'skip', got {masks!r}")
    problems = out.problems
    n = len(out.turns)
    raw_masks = record.get("masks") if dtype.location_instruction and masks != "skip" else None
    if raw_masks is not None and box_nesting_ok:
        if not isinstance(raw_masks, list) or len(raw_masks) != n:
            got = f"{len(raw_masks)} entries" if isinstance(raw_masks, list) else type(raw_masks).__name__
            problems.append(Problem("mask_nesting", f"masks must hold one list per turn ({n}), got {got}"))
            raw_masks = None
    for t in range(n):
        turn_masks = raw_masks[t] if raw_masks is not None else None
        if turn_masks is not None and (not isinstance(turn_masks, list) or len(turn_masks) != len(out.boxes[t])):
            got = f"{len(turn_masks)} mask(s)" if isinstance(turn_masks, list) else type(turn_masks).__name__
            problems.append(Problem("mask_nesting", f"masks[{t}] must hold one mask per box ({len(out.boxes[t])}), "
                                    f"got {got}", t))
            turn_masks = None
        for k, box in enumerate(out.boxes[t]):
            rle = turn_masks[k] if turn_masks is not None else None
            mask = _check_mask(rle, box, t, k, usable[t][k], image, decode=masks == "decode", problems=problems)
            out.masks[t].append(mask)


def _check_mask(rle: Any, box: Box, t: int, k: int, usable: bool, image: _ImageFacts, decode: bool,
                problems: list[Problem]) -> np.ndarray | None:
    """Mask ``k`` of turn ``t`` -> bool [H, W] when decoded and sound, else None (problems appended)."""
    if rle is None:
        return None
    width, height = (image.width, image.height) if image.size_known else (None, None)
    try:
        mask = decode_rle(rle, width, height, decode=decode)
    except ValueError as err:
        problems.append(Problem("bad_rle", f"mask {k} of turn {t}: {err}", t))
        return None
    if mask is None:
        return None
    if not mask.any():
        problems.append(Problem("empty_region", f"mask {k} of turn {t} is empty", t))
        return None
    if usable and image.size_known:
        c = clamp_box(box, image.width, image.height)
        if not mask[int(c.y1): int(c.y2) + 1, int(c.x1): int(c.x2) + 1].any():
            problems.append(Problem("empty_region", f"mask {k} of turn {t} does not overlap its box "
                                    f"{[box.x1, box.y1, box.x2, box.y2]}", t))
            return None
    return mask


# ----------------------------------------------------------------------------------------------------------
# Point sampling (docs/compatibility.md §7.4)


def jittered_center(box: Box, rng: np.random.Generator, tries: int = 16) -> Point:
    """The box centre moved by Gaussian noise (std CENTER_JITTER x box w / h), redrawn until it lies in the box;
    the exact centre if ``tries`` draws all fall outside."""
    cx, cy = (box.x1 + box.x2) / 2, (box.y1 + box.y2) / 2
    jitter = rng.normal(size=(tries, 2)) * (CENTER_JITTER * np.array([box.x2 - box.x1, box.y2 - box.y1]))
    xs, ys = cx + jitter[:, 0], cy + jitter[:, 1]
    inside = np.flatnonzero((xs >= box.x1) & (xs <= box.x2) & (ys >= box.y1) & (ys <= box.y2))
    if inside.size == 0:
        return Point(cx, cy)
    return Point(float(xs[inside[0]]), float(ys[inside[0]]))


def sample_point(box: Box, mask: np.ndarray | None, mode: str, rng: np.random.Generator) -> Point:
    """A point for a region given as ``box`` (clamped to the image) with an optional segmentation ``mask``
    (bool [H, W]), by ``mode`` (one of POINT_INPUT_SAMPLES):

    * ``center``: the exact box centre; ``gaussian``: the jittered centre (mask ignored);
    * ``segment_mask|uniform``: a uniform random pixel of mask ∩ box;
    * ``segment_mask|center``: of up to MAX_CANDIDATE_PIXELS random pixels of mask ∩ box, the one nearest the centre;
    * ``segment_mask|gaussian``: the same, nearest a jittered centre;
    * ``segment_mask|*`` without a mask (or with mask ∩ box empty): the jittered centre.

    Mask pixels are returned as integer coordinates (x = column, y = row).
    """
    if mode not in POINT_INPUT_SAMPLES:
        raise ValueError(f"point_input_sample must be one of {POINT_INPUT_SAMPLES}, got {mode!r}")
    if mode == "center":
        return Point((box.x1 + box.x2) / 2, (box.y1 + box.y2) / 2)
    if mode == "gaussian" or mask is None:
        return jittered_center(box, rng)
    x0, y0 = int(box.x1), int(box.y1)
    rows, cols = np.nonzero(mask[y0: int(box.y2) + 1, x0: int(box.x2) + 1])
    if rows.size == 0:
        return jittered_center(box, rng)
    if mode == "segment_mask|uniform":
        k = int(rng.integers(rows.size))
        return Point(float(cols[k] + x0), float(rows[k] + y0))
    if rows.size > MAX_CANDIDATE_PIXELS:
        pick = rng.choice(rows.size, size=MAX_CANDIDATE_PIXELS, replace=False)
        rows, cols = rows[pick], cols[pick]
    target = Point((box.x1 + box.x2) / 2, (box.y1 + box.y2) / 2) if mode == "segment_mask|center" \
        else jittered_center(box, rng)
    distance = (cols + x0 - target.x) ** 2 + (rows + y0 - target.y) ** 2
    k = int(np.argmin(distance))
    return Point(float(cols[k] + x0), float(rows[k] + y0))


# ----------------------------------------------------------------------------------------------------------
# Mixing


def mix_indices(
    sizes: Sequence[int],
    data_multiple: Sequence[float] | None = None,
    seed: int = 0,
    dataset_types: Sequence[str] | None = None,
) -> np.ndarray:
    """The mixed, shuffled order of several datasets as int64 [N, 2] rows of (dataset index, item index).

    Dataset i of size n contributes floor(m) full copies plus ceil(n * frac(m)) items drawn with replacement
    (m = data_multiple[i]); with ``data_multiple=None`` m is the type's default (git_instruction 3, others 1), or 1
    when no types are given. Then the whole list is shuffled once. Every draw comes from a numpy Generator seeded
    by ``seed`` (and the dataset index), so the result depends on nothing else.
    """
    if data_multiple is None:
        multiples = [DATASET_TYPES[t].default_multiple if t is not None else 1.0 for t in dataset_types] \
            if dataset_types is not None else [1.0] * len(sizes)
    else:
        multiples = [float(m) for m in data_multiple]
    if len(multiples) != len(sizes):
        raise ValueError(f"got {len(multiples)} data_multiple value(s) for {len(sizes)} dataset(s)")
    parts = []
    for i, (n, m) in enumerate(zip(sizes, multiples)):
        if not math.isfinite(m) or m < 0:
            raise ValueError(f"data_multiple[{i}] must be a finite number >= 0, got {m}")
        copies = math.floor(m)
        # round() keeps float noise (e.g. 0.2 * 5 = 1.0000000000000002) from adding a pick.
        picks = math.ceil(round(n * (m - copies), 6)) if n else 0
        rng = np.random.default_rng([seed, 0, i])
        items = np.concatenate([np.tile(np.arange(n, dtype=np.int64), copies),
                                rng.integers(0, n, size=picks, dtype=np.int64) if picks else np.zeros(0, np.int64)])
        parts.append(np.stack([np.full(items.size, i, dtype=np.int64), items], axis=1))
    order = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
    return order[np.random.default_rng([seed, 1]).permutation(len(order))]


def mix(
    datasets: Sequence[Sequence[T]],
    data_multiple: Sequence[float] | None = None,
    seed: int = 0,
    dataset_types: Sequence[str] | None = None,
) -> list[T]:
    """The items of ``datasets`` mixed by ``data_multiple`` and shuffled once (see ``mix_indices``)."""
    order = mix_indices([len(d) for d in datasets], data_multiple, seed, dataset_types)
    return [datasets[d][k] for d, k in order.tolist()]


# ----------------------------------------------------------------------------------------------------------
# The dataset


class _RecordFile:
    """The records of one data file as one byte buffer (JSON per record) plus offsets; records parse on access."""

    def __init__(self, path: str, image_folder: str, dtype: DatasetType):
        self.path, self.image_folder, self.dtype = path, image_folder, dtype
        # Records stay unparsed until used: a corrupt or too deeply nested one is one bad record, not a dead run.
        blobs = read_record_blobs(path)
        self.offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in blobs], out=self.offsets[1:])
        self.data = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def record(self, k: int) -> Any:
        return parse_record(self.data[self.offsets[k]: self.offsets[k + 1]].tobytes())


@dataclass
class Example:
    """A record ready for ``FerretProcessor.encode``: turns, per-turn regions (pixels) and per-turn ``within``."""

    where: str
    record: dict
    image: Image.Image | None
    turns: list[dict]
    regions: list[list[Region]]
    within: list[list[Any] | None]


def _broadcast(values: Sequence[T] | None, n: int, name: str) -> list[T | None]:
    if values is None:
        return [None] * n
    values = list(values)
    if len(values) == 1 and n > 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"got {len(values)} {name} for {n} data path(s); give one per data path (or a single one)")
    return values


class GritDataset(torch.utils.data.Dataset):
    """GRIT-format records from several files, mixed, as ``FerretProcessor.encode`` outputs.

    Args:
        data_paths: JSON list (or ``.jsonl``) files of GRIT records.
        image_folders: the folder each file's ``image`` paths are relative to, one per file (a single folder is
            used for all; None or "" = the data file's own folder).
        processor: the FerretProcessor of the model.
        options: DataOptions.
        data_multiple: per file, how many times its records appear (see ``mix_indices``); None = the original's
            defaults (git_instruction x3).
        dataset_types: per file, an explicit type from DATASET_TYPES (None/""/"auto" = infer from the file name).

    ``dataset[i]`` is ``{input_ids [L], labels [L], images [3, S, S] | None, region_masks [bool [H, W]...],
    image_size (W, H)}``. A bad record is logged, counted in ``bad_records`` / ``bad_by_reason`` (skip events
    of this process only: DataLoader workers count their own), named in ``bad_seen`` ((file, record index) ->
    reason, each record once) and in ``last_skipped`` (the records the latest ``dataset[i]`` skipped), and
    replaced by the next good item (i+1, i+2, ...).
    """

    def __init__(
        self,
        data_paths: list[str],
        image_folders: list[str],
        processor: FerretProcessor,
        options: DataOptions,
        data_multiple: list[float] | None = None,
        dataset_types: list[str] | None = None,
    ):
        if not data_paths:
            raise ValueError("GritDataset needs at least one data path")
        n = len(data_paths)
        folders = _broadcast(image_folders, n, "image folders")
        types = _broadcast(dataset_types, n, "dataset types")
        self.processor = processor
        self.options = options
        self.files: list[_RecordFile] = []
        for path, folder, explicit in zip(data_paths, folders, types):
            path = os.fspath(path)
            folder = os.fspath(folder) if folder else os.path.dirname(os.path.abspath(path))
            self.files.append(_RecordFile(path, folder, resolve_dataset_type(path, explicit)))
        self.order = mix_indices([len(f) for f in self.files], data_multiple, options.seed,
                                 [f.dtype.name for f in self.files])
        if len(self.order) == 0:
            raise ValueError(f"no records to train on in {list(data_paths)} (with data_multiple {data_multiple})")
        self.epoch = 0
        self.bad_records = 0
        self.tried = 0
        self.bad_by_reason: dict[str, int] = {}
        self.bad_seen: dict[tuple[str, int], str] = {}
        self.last_skipped: list[tuple[str, int, str]] = []
        self.last_task: str | None = None  # the "task" field of the record the latest ``dataset[i]`` returned
        for f in self.files:
            logger.info("%s: %d records, type %s, images in %s", f.path, len(f), f.dtype.name, f.image_folder)
        logger.info("mixed %d items from %d file(s) (seed %d)", len(self.order), n, options.seed)

    def __len__(self) -> int:
        return len(self.order)

    @property
    def lengths(self) -> list[int]:
        """Estimated token length of every item (image positions + ~1 token per 4 characters of text + ~18 per
        region), read from the records alone (no image is opened, no mask read). A record ``check_record``
        rejects (masks aside) gets 0: ``dataset[i]`` replaces it anyway. Used for length-grouped batches (``--group_by_length``);
        computed once."""
        if getattr(self, "_lengths", None) is None:
            per_file = [[self._estimate_length(f, k) for k in range(len(f))] for f in self.files]
            self._lengths = [per_file[int(d)][int(k)] for d, k in self.order]
        return self._lengths

    def _estimate_length(self, file: _RecordFile, k: int) -> int:
        try:
            record = file.record(k)
            checked = check_record(record, file.dtype, None, self.options.add_region_feature, masks="skip")
        except (RecordError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
            return 0
        if checked.errors:
            return 0
        chars = sum(len(turn["value"]) for turn in checked.turns)
        boxes = sum(len(b) for b in checked.boxes)
        image = self.processor.num_image_tokens if record.get("image") is not None else 0
        return image + chars // 4 + 18 * boxes

    def set_epoch(self, epoch: int) -> None:
        """Re-draw the point/box choices and sampled points (they are seeded by (seed, epoch, item))."""
        self.epoch = int(epoch)

    def source(self, i: int) -> tuple[str, int]:
        """(data file, record index in it) of item ``i``."""
        d, k = self.order[i]
        return self.files[d].path, int(k)

    # -- building one item
    def example(self, i: int) -> Example:
        """Item ``i`` as turns + regions + within, before tokenization. Raises RecordError when it is bad."""
        d, k = (int(v) for v in self.order[i])
        file = self.files[d]
        where = f"{file.path} record {k}: "
        try:
            record = file.record(k)
            image = None
            if isinstance(record, dict) and isinstance(record.get("image"), str) and record["image"]:
                image = read_image(image_path(file.image_folder, record["image"]))
            checked = check_record(record, file.dtype, image.size if image is not None else None,
                                   self.options.add_region_feature)
            checked.raise_if_bad()
            regions, within = self._regions(checked, image.size if image is not None else _declared_size(record), i)
        except RecordError as err:
            raise RecordError(err.reason, where + str(err)) from err
        except (TypeError, KeyError, IndexError, AttributeError, RecursionError) as err:
            raise RecordError("malformed_record", f"{where}{type(err).__name__}: {err}") from err
        return Example(where, record, image, checked.turns, regions, within)

    def _regions(self, checked: CheckedRecord, size: tuple[int, int] | None, i: int):
        rng = np.random.default_rng([self.options.seed, self.epoch, i])
        mode = self.options.point_input_sample
        reuse = self.options.refer_previous_point
        regions: list[list[Region]] = []
        within: list[list[Any] | None] = []
        points: dict[Box, Point] = {}
        for t, boxes in enumerate(checked.boxes):
            if t % 2 == 1:  # gpt: boxes, or the point the human turn used for the same box
                regions.append([points.get(b, b) if reuse else b for b in boxes])
                within.append(None)
                continue
            points = {}
            coin = bool(rng.integers(2))  # once per human turn, covering all its regions
            form = checked.refer_as[t] if t < len(checked.refer_as) else None
            # a record built with a drawn form keeps it; a free-form region is its box limited by its mask
            as_point = coin if form is None else form == "point"
            turn_regions: list[Region] = []
            turn_within: list[Any] = []
            for box, mask in zip(boxes, checked.masks[t]):
                if not as_point:
                    turn_regions.append(box)
                    turn_within.append(mask)
                    continue
                if reuse and box in points:
                    point = points[box]
                else:
                    point = sample_point(clamp_box(box, *size), mask, mode, rng)
                    if reuse:
                        points[box] = point
                turn_regions.append(point)
                turn_within.append(mask if mask is not None and _window_hits(point, mask) else box)
            regions.append(turn_regions)
            within.append(turn_within)
        return regions, within

    def encode(self, example: Example) -> dict[str, Any]:
        """``FerretProcessor.encode`` of an example; RecordError ``encode_failed`` when the processor rejects it."""
        try:
            encoded = self.processor.encode(
                example.turns, example.image, regions=example.regions, within=example.within,
                image_size=None if example.image is not None else (_declared_size(example.record) or (1, 1)),
                region_feature=self.options.add_region_feature, no_coor=self.options.no_coor, where=example.where,
            )
        except (ValueError, TypeError) as err:
            raise RecordError("encode_failed", str(err)) from err
        encoded.pop("turn_texts")  # the batch holds tensors only
        return encoded

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"item {i} out of range for a dataset of {n}")
        i %= n
        last: RecordError | None = None
        self.last_skipped = []
        for step in range(self.options.max_consecutive_bad + 1):
            j = (i + step) % n
            self.tried += 1
            try:
                example = self.example(j)
                encoded = self.encode(example)
                task = example.record.get("task")
                self.last_task = task if isinstance(task, str) else None
                return encoded
            except RecordError as err:
                last = err
                self._count_bad(j, err)
        raise RuntimeError(
            f"{self.options.max_consecutive_bad + 1} records in a row are bad (items {i}..{j}, last: {last}); "
            "check the data with `python -m ferret.data.validate`"
        )

    def _count_bad(self, j: int, err: RecordError) -> None:
        self.bad_records += 1
        self.bad_by_reason[err.reason] = self.bad_by_reason.get(err.reason, 0) + 1
        path, k = self.source(j)
        self.bad_seen.setdefault((path, k), err.reason)
        self.last_skipped.append((path, k, err.reason))
        logger.warning("skipping item %d [%s]: %s (%d bad record(s) so far in this process)",
                       j, err.reason, err, self.bad_records)
        limit = self.options.max_bad_fraction
        if limit is not None and self.tried >= 200 and self.bad_records > limit * self.tried:
            raise RuntimeError(f"{self.bad_records} of {self.tried} records tried were bad, more than "
                               f"max_bad_fraction={limit}; by reason: {self.bad_by_reason}")


def _window_hits(point: Point, mask: np.ndarray) -> bool:
    """Whether the point's feature window (± POINT_SPAN px) touches the mask (else its box limits it)."""
    x, y = int(point.x), int(point.y)
    return bool(mask[max(y - POINT_SPAN, 0): y + POINT_SPAN + 1, max(x - POINT_SPAN, 0): x + POINT_SPAN + 1].any())


class FerretCollator:
    """Pads GritDataset items into a batch: input_ids, labels, attention_mask [B, L], images [B_img, 3, S, S],
    region_masks (per-sample lists of bool [H, W])."""

    def __init__(self, processor: FerretProcessor):
        self.processor = processor

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return self.processor.pad(features, padding_side="right")


__all__ = [
    "DataOptions", "DatasetType", "DATASET_TYPES", "POINT_INPUT_SAMPLES", "REASONS", "WARNING_REASONS",
    "infer_dataset_type", "resolve_dataset_type", "load_records", "read_record_blobs", "parse_record",
    "split_json_array", "is_jsonl", "read_image", "image_path", "RecordError",
    "Problem", "CheckedRecord", "check_record", "decode_rle", "sample_point", "jittered_center",
    "mix_indices", "mix", "Example", "GritDataset", "FerretCollator",
]
