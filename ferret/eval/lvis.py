"""LVIS referring object classification: a two-way choice about one region, scored by accuracy per region type.

The question is "Is the object {region} <region_fea> of the image a {A} or a {B}?", where one of A and B is
the region's LVIS class and the other a negative class. Records (the LVIS-referring jsonl) carry
``id, image_path, width, height, name, synonyms, neg_class, sample_point, bbox, bbox_norm,
free_shape_bbox_raw, free_shape_segment_mask``; predictions carry at least ``id, text, name, synonyms`` and,
when written by this project's inference, ``region_format`` ("point", "box" or "free_shape").

An answer is correct when, after negated clauses are removed, it mentions the class name or one of its
synonyms as whole words:

* Names are normalised as the original does: ``_`` becomes a space and ``"a (b)"`` gives the two names "a" and
  "b"; comparison is case-insensitive; a plural "s"/"es" is accepted ("dogs" mentions "dog").
* Whole words: "cat" is not found in "category", "book" not in "notebook", "bus" not in "busy".
* The longest class named wins: a mention of one of the two offered classes that lies inside a longer mention
  of the other is not a mention. Offered "sign" and "stop_sign", "It is a stop sign." names stop_sign only
  (the original, matching substrings, counted it for both); plurals and ``_`` vs space as above.
* Negation: a clause starting at a negation word (``not``, ``no``, ``never``, ``cannot``, ``neither``, ``nor``
  or an ``n't`` contraction) is removed up to the next ``, . ; : ! ?``, newline, "but", "instead" or "rather",
  so "It is not a cat, it is a dog" keeps "It is  it is a dog" and "No, it is not a dog" keeps nothing about
  a dog. Negation words are matched on word boundaries, so "north", "notebook" or "nothing" are left alone
  (the original's ``\\s+no[^,.]*[,.]`` deleted them up to the next comma).

Also reported: ``both_mentioned``, answers that (after negation removal) mention both the class and the negative
class, which the rule above counts as correct, as the original does.

Inference (``infer``) asks the question about each record's region given as ``--region-format``:

* ``point``: the ``sample_point`` (pixels); its feature mask is the 11x11 window around it, as the original.
* ``box``: ``bbox_norm`` (0..1 xyxy) times the image size; the feature mask is the box.
* ``free_shape``: the ``free_shape_bbox_raw`` box (pixels) in the text, and the box intersected with the
  ``free_shape_segment_mask`` as the feature mask. The original stores that mask as a dense 2-D list shaped
  [W, H] (first index = x); it is transposed to this project's [H, W]. A COCO RLE dict ``{"size": [h, w],
  "counts": ...}`` is accepted too (much smaller files).

With ``--no-coor`` the question holds only ``<region_fea>``. The true class comes first on even record indices
and second on odd ones, as the original. The answers carry the original's fields ``id, image_path, prompt, text,
name, synonyms, bbox, bbox_norm, width, height`` plus ``neg_class`` and ``region_format`` (the scorer reports
accuracy per region format).

Command lines::

    python -m ferret.eval.lvis infer --model-path checkpoints/ferret-7b --annotation-file data/lvis/lvis_eval.jsonl \\
        --image-folder data/coco/val2017 --region-format box --answers-file runs/lvis_box.jsonl
    python -m ferret.eval.lvis score --predictions runs/lvis_box.jsonl [--annotation-file lvis_eval.jsonl]
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections import defaultdict
from collections.abc import Iterable
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from ferret.eval.common import (
    PredictionStream,
    StreamAlignment,
    decode_segmentation,
    format_table,
    metrics_path,
    read_jsonl,
    write_json,
)
from ferret.eval.inference import Query, add_inference_arguments, infer_from_args
from ferret.flags import program_name
from ferret.regions import Box, FreeForm, Point, dense_wh_mask

logger = logging.getLogger(__name__)

__all__ = [
    "KEY_FIELDS",
    "REGION_FORMATS",
    "class_names",
    "free_shape_mask",
    "is_correct",
    "lvis_queries",
    "classify",
    "main",
    "mention_spans",
    "mentions",
    "remove_negations",
    "score_lvis",
]

KEY_FIELDS = ("id",)
REGION_FORMATS = ("point", "box", "free_shape")
QUESTION = "Is the object <region0> of the image a {first} or a {second}?"
_REQUIRED = {"point": ("sample_point",), "box": ("bbox_norm",), "free_shape": ("free_shape_segment_mask",)}

_NEGATION = r"(?:\b(?:not|no|never|cannot|neither|nor)\b|\b\w+n['’]t\b)"
_CLAUSE_END = r"(?=[,.;:!?\n]|\bbut\b|\binstead\b|\brather\b|$)"
_NEGATED_CLAUSE = re.compile(_NEGATION + r"[^,.;:!?\n]*?" + _CLAUSE_END, re.IGNORECASE)


def class_names(name: str, synonyms: Iterable[str] = ()) -> list[str]:
    """The lower-cased names a class may be called by (see the module docstring), without duplicates."""
    names: list[str] = []
    for raw in [name, *synonyms]:
        if not isinstance(raw, str):
            raise ValueError(f"class name or synonym must be a string, got {raw!r}")
        for part in re.split(r"[()]", raw):
            cleaned = " ".join(part.replace("_", " ").split()).lower()
            if cleaned and cleaned not in names:
                names.append(cleaned)
    return names


def remove_negations(text: str) -> str:
    """``text`` without its negated clauses (see the module docstring)."""
    return _NEGATED_CLAUSE.sub(" ", text)


def _name_pattern(name: str) -> re.Pattern[str]:
    words = [re.escape(word) for word in re.split(r"[\s\-]+", name) if word]
    return re.compile(r"(?<!\w)" + r"[\s\-]+".join(words) + r"(?:e?s)?(?!\w)", re.IGNORECASE)


def mention_spans(text: str, names: Iterable[str]) -> list[tuple[int, int]]:
    """Character spans where ``text`` names one of ``names`` as whole words (a plural s/es allowed)."""
    return sorted({m.span() for name in names if name.strip() for m in _name_pattern(name).finditer(text)})


def mentions(text: str, names: Iterable[str]) -> bool:
    """Whether ``text`` contains one of ``names`` as whole words (a plural s/es allowed), case-insensitively."""
    return bool(mention_spans(text, names))


def _outside_longer(spans: list[tuple[int, int]], others: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The spans that do not lie inside a longer span of ``others`` ("sign" inside "stop sign")."""
    return [(s, e) for s, e in spans
            if not any(s2 <= s and e <= e2 and (e2 - s2) > (e - s) for s2, e2 in others)]


def classify(text: str, name: str, synonyms: Iterable[str] = (), negative: str | None = None) -> tuple[bool, bool]:
    """(correct, both mentioned) for an answer: after negated clauses are removed, the longest class named wins.

    A mention of one class that lies inside a longer mention of the other is not a mention: offered "sign"
    and "stop_sign", "It is a stop sign." names stop_sign only.
    """
    kept = remove_negations(text)
    true_spans = mention_spans(kept, class_names(name, synonyms))
    negative_spans = mention_spans(kept, class_names(negative)) if negative else []
    true_left = _outside_longer(true_spans, negative_spans)
    negative_left = _outside_longer(negative_spans, true_spans)
    return bool(true_left), bool(true_left and negative_left)


def is_correct(text: str, name: str, synonyms: Iterable[str] = (), negative: str | None = None) -> bool:
    """The LVIS rule: the answer, without negated clauses, names the class (the longest class named wins)."""
    return classify(text, name, synonyms, negative)[0]


def score_lvis(
    predictions: list[dict[str, Any]],
    annotations: list[dict[str, Any]] | None = None,
    region_format: str | None = None,
) -> dict[str, Any]:
    """Accuracy overall ("all") and per region type.

    With ``annotations`` (the LVIS-referring records), predictions are matched to them by ``id`` and the class
    names are taken from the annotation; missing predictions are reported. The region type of a prediction is
    its ``region_format`` field, else ``region_format``, else "unknown".
    """
    stream = PredictionStream.of(predictions)
    alignment = None
    if annotations is not None:
        alignment = StreamAlignment(annotations, lambda r: str(r["id"]), "LVIS record")
        pairs: Iterable[tuple[dict[str, Any], dict[str, Any]]] = alignment.pairs(stream, lambda p: str(p["id"]))
    else:
        pairs = ((prediction, prediction) for prediction in stream)

    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for record, prediction in pairs:
        where = f"LVIS id={record.get('id')}"
        missing = [f for f in ("name", "synonyms") if f not in record]
        if missing:
            if annotations is not None:
                raise ValueError(f"LVIS record id={record.get('id')} has no '{missing[0]}'")
            stream.reject("no_class_name", where)
            continue
        if not isinstance(prediction.get("text"), str):
            stream.reject("no_text", where)
            continue
        negative = record.get("neg_class") or prediction.get("neg_class")
        correct, both = classify(prediction["text"], record["name"], record["synonyms"], negative)
        kind = prediction.get("region_format") or record.get("region_format") or region_format or "unknown"
        for bucket_name in ("all", kind):
            bucket = counts[bucket_name]
            bucket["n"] += 1
            bucket["correct"] += correct
            bucket["both_mentioned"] += both

    results = {}
    for kind in sorted(counts, key=lambda k: (k != "all", k)):
        bucket = counts[kind]
        results[kind] = {
            "n": bucket["n"],
            "accuracy": bucket["correct"] / bucket["n"],
            "correct": bucket["correct"],
            "both_mentioned": bucket["both_mentioned"],
        }
    metrics: dict[str, Any] = {"benchmark": "lvis_referring", "results": results,
                               "predictions_read": stream.report()}
    if alignment is not None:
        metrics["alignment"] = alignment.report()
    return metrics


# ----------------------------------------------------------------------------------------------------------
# Inference


def free_shape_mask(value: Any, width: int, height: int, where: str = "") -> np.ndarray:
    """A record's free-form mask as bool [H, W]: a dense 2-D list shaped [W, H] (the original's layout) or a COCO
    RLE dict. ValueError (naming ``where``) for any other shape."""
    if isinstance(value, dict):
        return decode_segmentation(value, width, height, f"{where}: free_shape_segment_mask")
    try:
        return dense_wh_mask(value, width, height)
    except ValueError as err:
        raise ValueError(f"{where}: free_shape_segment_mask must be a 2-D list shaped [W, H] = [{width}, {height}] "
                         f"(first index = x) or an RLE dict: {err}") from None


def _lvis_region(record: dict[str, Any], region_format: str, where: str, image: Image.Image):
    width, height = int(record["width"]), int(record["height"])
    if image.size != (width, height):
        raise ValueError(f"{where}: the image is {image.size[0]}x{image.size[1]} but the record says "
                         f"{width}x{height}")
    if region_format == "point":
        x, y = record["sample_point"][:2]
        return [Point(float(x), float(y))], None
    if region_format == "box":
        x1, y1, x2, y2 = (float(v) for v in record["bbox_norm"][:4])
        return [Box(x1 * width, y1 * height, x2 * width, y2 * height)], None
    mask = free_shape_mask(record["free_shape_segment_mask"], width, height, where)
    raw = record.get("free_shape_bbox_raw")
    if raw is None:
        return [FreeForm(mask)], None
    return [Box(*(float(v) for v in raw[:4]))], [mask]


def lvis_queries(records: list[dict[str, Any]], image_folder: str | Path, region_format: str) -> list[Query]:
    """One query per LVIS-referring record, in file order (see the module docstring)."""
    if region_format not in REGION_FORMATS:
        raise ValueError(f"region format {region_format!r} is not one of {REGION_FORMATS}")
    queries = []
    for index, record in enumerate(records):
        where = f"LVIS record #{index} (id={record.get('id')})"
        for field_name in ("id", "image_path", "width", "height", "name", "neg_class", *_REQUIRED[region_format]):
            if field_name not in record:
                raise ValueError(f"{where} has no '{field_name}' (needed for --region-format {region_format})")
        first, second = record["name"], record["neg_class"]
        if index % 2 == 1:  # the true class comes second on odd indices
            first, second = second, first
        image_path = Path(image_folder) / PurePosixPath(str(record["image_path"]).replace("\\", "/")).name
        queries.append(Query(
            image=image_path,
            prompt=QUESTION.format(first=first, second=second),
            output={"id": record["id"], "image_path": str(image_path), "prompt": None, "text": None,
                    "name": record["name"], "synonyms": record.get("synonyms", []), "bbox": record.get("bbox"),
                    "bbox_norm": record.get("bbox_norm"), "width": record["width"], "height": record["height"],
                    "neg_class": record["neg_class"], "region_format": region_format},
            regions=partial(_lvis_region, record, region_format, where),
            where=where,
        ))
    return queries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=program_name("ferret.eval.lvis"), description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    infer = sub.add_parser("infer", help="classify every referred region with a model")
    infer.add_argument("--annotation-file", "--data_path", dest="annotation_file", required=True,
                       help="LVIS-referring jsonl")
    infer.add_argument("--region-format", "--region_format", dest="region_format", default="point",
                       choices=REGION_FORMATS, help="how the region is given (default point, as the original)")
    infer.add_argument("--no-coor", "--no_coor", dest="no_coor", action="store_true",
                       help="no coordinates in the question, only <region_fea>")
    add_inference_arguments(infer)
    score = sub.add_parser("score", help="compute accuracy from a prediction file or folder")
    score.add_argument("--predictions", required=True, help="a .jsonl file or a folder of {k}_of_{n}.jsonl chunks")
    score.add_argument("--annotation-file", default=None, help="LVIS-referring jsonl, to match by id (optional)")
    score.add_argument("--region-format", default=None,
                       help="region type for predictions without a region_format field (point, box, free_shape)")
    score.add_argument("--output", default=None, help="metrics JSON (default: <predictions>.metrics.json beside it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "infer":
        queries = lvis_queries(read_jsonl(args.annotation_file), args.image_folder, args.region_format)
        infer_from_args(args, queries, KEY_FIELDS, no_coor=args.no_coor)
        return 0
    annotations = read_jsonl(args.annotation_file) if args.annotation_file else None
    metrics = score_lvis(PredictionStream(args.predictions), annotations, args.region_format)
    metrics["predictions"] = str(args.predictions)
    out = write_json(metrics, args.output or metrics_path(args.predictions))
    rows = [[k, r["n"], 100 * r["accuracy"], r["both_mentioned"]] for k, r in metrics["results"].items()]
    print(format_table(["region type", "n", "accuracy (%)", "both mentioned"], rows))
    print(f"metrics written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
