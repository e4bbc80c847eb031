"""RefCOCO / RefCOCO+ / RefCOCOg referring expression comprehension: Acc@0.5 of the predicted box.

Ground truth is MDETR's COCO-style JSON ``finetune_refcoco{,+,g}_{split}.json``: each entry of ``images``
carries ``id, file_name, caption, dataset_name, height, width`` and has exactly one ``[x, y, w, h]``
annotation in ``annotations``. Predictions are JSON lines with at least ``image_id`` and ``text`` (the model's
answer to "What is the location of {caption} in the image?").

Scoring (per ``dataset_name`` and split, threshold 0.5 by default):

* ``acc@0.5``              the FIRST box of the answer has IoU >= 0.5 with the ground truth (the headline number),
* ``acc@0.5_mean_box``     the coordinate-wise mean of all the answer's boxes does,
* ``acc@0.5_upper_bound``  any box of the answer does.

Differences from the original ``eval_refexp.py``: predictions are matched to
the ground truth by ``image_id`` rather than zipped by position after a sort, missing predictions are reported,
answers are read from the pixel ``regions`` this project's inference stores (``FerretProcessor.post_process``,
right in every ``image_aspect_ratio``) or, for the original's files, parsed with ``ferret.regions.parse_regions``,
so a point answer ``[x, y]`` is scored (as the zero-size
box, IoU 0) instead of crashing, and the metrics file goes next to the predictions (``common.metrics_path``).
An answer with no box is scored with the zero box (IoU 0) and stays in the denominator, as in the original.
IoU is the continuous DETR-style IoU of ``metrics``, with the image size of the ground truth.

Inference (``infer``) reads the same MDETR JSON and the COCO train2014 images, asks "What is the location of
{caption without commas} in the image?" for every image entry in id order (as the original's CocoDetection),
and writes the original's fields ``image_id, file_name, prompt, text, width, height`` (see
``ferret.eval.inference`` for batching, resuming and chunks).

Command lines::

    python -m ferret.eval.refexp infer --model-path checkpoints/ferret-7b \\
        --annotation-file data/annotations/finetune_refcoco_val.json --image-folder data/coco/train2014 \\
        --answers-file runs/refcoco_val.jsonl
    python -m ferret.eval.refexp score --predictions runs/refcoco_val.jsonl \\
        --annotation-file data/annotations/finetune_refcoco_val.json
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferret.eval.common import (
    PredictionStream,
    StreamAlignment,
    format_table,
    metrics_path,
    write_json,
)
from ferret.eval.inference import Query, add_inference_arguments, infer_from_args
from ferret.eval.metrics import ZERO_BOX, box_iou, box_iou_matrix, mean_box, xywh_to_xyxy
from ferret.flags import program_name

logger = logging.getLogger(__name__)

__all__ = ["KEY_FIELDS", "RefExpItem", "load_refexp_items", "main", "refexp_queries", "score_refexp",
           "split_from_filename"]

KEY_FIELDS = ("image_id",)
QUESTION = "What is the location of {caption} in the image?"

_FILE_NAME = re.compile(r"finetune_(refcoco\+?|refcocog)_(\w+?)\.json$")


@dataclass(frozen=True)
class RefExpItem:
    """One referring expression with its ground-truth box (``[x1, y1, x2, y2]`` pixels)."""

    image_id: Any
    dataset_name: str
    caption: str
    file_name: str
    width: int
    height: int
    box: tuple[float, float, float, float]


def load_refexp_items(annotations: dict[str, Any]) -> list[RefExpItem]:
    """The items of an MDETR RefExp JSON (already loaded), in file order.

    Each image must have exactly one annotation (matched by ``image_id``, whatever the order of the lists);
    otherwise ValueError names the image.
    """
    for field_name in ("images", "annotations"):
        if field_name not in annotations:
            raise ValueError(f"RefExp annotation JSON has no '{field_name}' list")
    boxes: dict[str, list[list[float]]] = defaultdict(list)
    for ann in annotations["annotations"]:
        boxes[str(ann["image_id"])].append(ann["bbox"])
    items = []
    for image in annotations["images"]:
        found = boxes.get(str(image["id"]), [])
        if len(found) != 1:
            raise ValueError(
                f"RefExp image id {image['id']} ({image.get('file_name')!r}) has {len(found)} annotations, "
                "expected exactly 1"
            )
        items.append(
            RefExpItem(
                image_id=image["id"],
                dataset_name=str(image.get("dataset_name", "refexp")),
                caption=image.get("caption", ""),
                file_name=image.get("file_name", ""),
                width=int(image["width"]),
                height=int(image["height"]),
                box=xywh_to_xyxy(found[0]),
            )
        )
    return items


def split_from_filename(path: str | Path) -> str | None:
    """``.../finetune_refcoco+_testA.json`` -> ``"testA"`` (None when the name does not follow the pattern)."""
    match = _FILE_NAME.search(Path(path).name)
    return match.group(2) if match else None


def score_refexp(
    annotations: dict[str, Any],
    predictions: list[dict[str, Any]],
    split: str | None = None,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Acc@``threshold`` for the first box, the mean box and the upper bound, per dataset_name (and split).

    Returns ``{"results": {"<dataset>[_<split>]": {...}}, "alignment": {...}, "threshold": ...}``; accuracies
    are fractions in [0, 1].
    """
    items = load_refexp_items(annotations)
    stream = PredictionStream.of(predictions)
    alignment = StreamAlignment(items, lambda item: str(item.image_id), "image")

    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    size_mismatch = 0
    for item, prediction in alignment.pairs(stream, lambda p: str(p["image_id"])):
        where = f"image_id {item.image_id}"
        found = stream.boxes(prediction, item.width, item.height, where)
        if found is None:
            continue
        recorded_size = (prediction.get("width"), prediction.get("height"))
        if None not in recorded_size and tuple(map(int, recorded_size)) != (item.width, item.height):
            size_mismatch += 1
        bucket = counts[item.dataset_name]
        bucket["n"] += 1
        if not found:
            bucket["no_box"] += 1
        bucket["point_answers"] += any(b.is_point for b in found)
        bucket["multi_box_answers"] += len(found) > 1
        boxes = [b.box for b in found] or [ZERO_BOX]
        ious = box_iou_matrix(boxes, [item.box])[:, 0]
        bucket["first"] += bool(ious[0] >= threshold)
        bucket["mean"] += box_iou(mean_box(boxes), item.box) >= threshold
        bucket["upper"] += bool(ious.max() >= threshold)
    if size_mismatch:
        logger.warning("%d predictions record an image size that differs from the annotation; used the annotation's",
                       size_mismatch)

    results = {}
    for dataset_name in sorted(counts):
        bucket = counts[dataset_name]
        n = bucket["n"]
        key = f"{dataset_name}_{split}" if split else dataset_name
        results[key] = {
            "dataset": dataset_name,
            "split": split,
            "n": n,
            f"acc@{threshold:g}": bucket["first"] / n,
            f"acc@{threshold:g}_mean_box": bucket["mean"] / n,
            f"acc@{threshold:g}_upper_bound": bucket["upper"] / n,
            "no_box": bucket["no_box"],
            "point_answers": bucket["point_answers"],
            "multi_box_answers": bucket["multi_box_answers"],
        }
    return {
        "benchmark": "refexp",
        "results": results,
        "alignment": alignment.report(),
        "predictions_read": stream.report(),
        "threshold": threshold,
        "iou": "continuous (DETR-style)",
    }


def _by_id(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Image entries in id order (torchvision's CocoDetection order, which the original iterates)."""
    try:
        return sorted(entries, key=lambda entry: entry["id"])
    except TypeError:  # mixed id types
        return sorted(entries, key=lambda entry: str(entry["id"]))


def refexp_queries(annotations: dict[str, Any], image_folder: str | Path) -> list[Query]:
    """One query per image entry of an MDETR RefExp JSON, in id order (see the module docstring)."""
    if "images" not in annotations:
        raise ValueError("RefExp annotation JSON has no 'images' list")
    queries = []
    for entry in _by_id(annotations["images"]):
        for field_name in ("id", "file_name", "caption"):
            if field_name not in entry:
                raise ValueError(f"RefExp image entry {entry.get('id', '?')} has no '{field_name}'")
        caption = entry["caption"].replace(",", "").strip()
        queries.append(Query(
            image=Path(image_folder) / entry["file_name"],
            prompt=QUESTION.format(caption=caption),
            output={"image_id": entry["id"], "file_name": entry["file_name"], "prompt": None, "text": None,
                    "width": None, "height": None},
            where=f"RefExp image id {entry['id']} ({entry['file_name']})",
        ))
    return queries


def _print_results(metrics: dict[str, Any]) -> None:
    t = f"{metrics['threshold']:g}"
    rows = [
        [key, r["n"], 100 * r[f"acc@{t}"], 100 * r[f"acc@{t}_mean_box"], 100 * r[f"acc@{t}_upper_bound"], r["no_box"]]
        for key, r in metrics["results"].items()
    ]
    print(format_table(["dataset", "n", f"Acc@{t} (%)", "mean box (%)", "upper bound (%)", "no box"], rows))
    a = metrics["alignment"]
    print(f"evaluated {a['evaluated']}, missing {a['missing']}, unexpected {a['unexpected']}, "
          f"duplicates {a['duplicates']}; unparseable {metrics['predictions_read']['unparseable']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=program_name("ferret.eval.refexp"), description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    infer = sub.add_parser("infer", help="answer every referring expression with a model")
    infer.add_argument("--annotation-file", "--data_path", dest="annotation_file", required=True,
                       help="MDETR finetune_refcoco*_{split}.json")
    add_inference_arguments(infer)
    score = sub.add_parser("score", help="compute Acc@0.5 from a prediction file or folder")
    score.add_argument("--predictions", required=True, help="a .jsonl file or a folder of {k}_of_{n}.jsonl chunks")
    score.add_argument("--annotation-file", required=True, help="MDETR finetune_refcoco*_{split}.json")
    score.add_argument("--split", default=None, help="split name for the report (default: from the file name)")
    score.add_argument("--iou-threshold", type=float, default=0.5)
    score.add_argument("--output", default=None, help="metrics JSON (default: <predictions>.metrics.json beside it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    with open(args.annotation_file, encoding="utf-8") as f:
        annotations = json.load(f)
    if args.command == "infer":
        infer_from_args(args, refexp_queries(annotations, args.image_folder), KEY_FIELDS)
        return 0
    split = args.split or split_from_filename(args.annotation_file)
    metrics = score_refexp(annotations, PredictionStream(args.predictions), split, args.iou_threshold)
    metrics["predictions"] = str(args.predictions)
    metrics["annotation_file"] = str(args.annotation_file)
    out = write_json(metrics, args.output or metrics_path(args.predictions))
    _print_results(metrics)
    print(f"metrics written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
