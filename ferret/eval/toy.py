"""The toy world's evaluation: referring, grounding, grounded description and yes/no on its test split.

Records are those ``ferret.data.toy`` writes (``{split}.json``, a JSON list; images relative to the world
folder). Each record is asked its own human question; ``<bbox_location{k}>`` in it is the k-th human region,
given as the record's ``region_type`` says, so every region type is measured on the same kind of scene:

* ``point``: the pixel of the shape nearest to its box centre (the recipe's ``segment_mask|center``, made
  deterministic); feature mask: the 11x11 window around it within the shape's mask;
* ``box``: the shape's box; feature mask: the box within the shape's mask (as the original's training);
* ``free_form``: the shape's mask itself (text: its box).

Metrics (``score_toy``), per task:

* ``refer`` and ``refer_choice``: accuracy overall and per region type. An answer is right when the
  colour+shape names it mentions (whole words, "red triangle", plural allowed) are exactly the target's
  name: "a red triangle" is right, "a red triangle or a blue star" and "a red circle" are wrong.
* ``ground``: Acc@0.5, the first box of the answer against the target's box. Both are inclusive pixel boxes,
  so IoU is computed on pixel areas (x2 + 1, y2 + 1); a point answer or no box counts as a miss.
* ``describe``: recall@0.5 of the scene's objects (an object is recalled when a box of the answer whose
  phrase names it has IoU >= 0.5 with it) and precision@0.5 of the answer's boxes.
* ``yesno``: accuracy, deciding yes/no from the answer as POPE does (``ferret.eval.pope.decide_yes_no``).

``summary`` flattens the headline numbers (fractions in [0, 1]; None for a task absent from the split).

Command lines::

    python -m ferret.eval.toy infer --model-path runs/toy/final --annotation-file data/toy/test.json \\
        --answers-file runs/toy_test.jsonl
    python -m ferret.eval.toy score --predictions runs/toy_test.jsonl --annotation-file data/toy/test.json
    python -m ferret.eval.toy evaluate --model-path runs/toy/final --annotation-file data/toy/test.json \\
        --answers-file runs/toy_test.jsonl            # both; metrics in runs/toy_test.metrics.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ferret.data.toy import COLOR_RGB, SHAPES
from ferret.eval.common import (
    PredictionStream,
    StreamAlignment,
    answer_boxes,
    decode_segmentation,
    format_table,
    metrics_path,
    write_json,
)
from ferret.eval.inference import GenerationConfig, Query, add_inference_arguments, infer_from_args, run_inference
from ferret.eval.metrics import box_iou
from ferret.eval.pope import decide_yes_no
from ferret.flags import program_name
from ferret.regions import Box, FreeForm, Point

logger = logging.getLogger(__name__)

__all__ = [
    "KEY_FIELDS",
    "evaluate_toy",
    "load_records",
    "main",
    "object_names",
    "score_toy",
    "toy_queries",
    "toy_region",
]

KEY_FIELDS = ("id",)
_NAME = re.compile(
    r"\b(" + "|".join(sorted(COLOR_RGB)) + r")\s+(" + "|".join(SHAPES) + r")(?:e?s)?\b", re.IGNORECASE
)


def load_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a toy split file (a JSON list)."""
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of toy records, got {type(records).__name__}")
    return records


# ----------------------------------------------------------------------------------------------------------
# Queries


def toy_region(box: Sequence[int], rle: dict | None, region_type: str, where: str = "",
               size: tuple[int, int] | None = None) -> tuple[Box | Point | FreeForm, np.ndarray | None]:
    """(region, within) for one human region of a toy record (see the module docstring). With the image
    ``size`` (W, H), the mask's declared size is checked against it before the mask is decoded."""
    if rle is None:
        mask = None
    elif size is not None:
        mask = decode_segmentation(rle, size[0], size[1], where)
    else:
        mask = FreeForm.from_rle(rle).mask
    if region_type == "box":
        return Box(*(float(v) for v in box)), mask
    if region_type == "free_form":
        if mask is None:
            raise ValueError(f"{where}: a free_form region needs the record's mask")
        return FreeForm(mask), None
    if region_type == "point":
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        if mask is None:  # nothing to choose from: the box centre
            return Point(cx, cy), None
        ys, xs = np.nonzero(mask)
        if xs.size == 0:
            raise ValueError(f"{where}: the region's mask is empty")
        nearest = int(np.argmin((xs - cx) ** 2 + (ys - cy) ** 2))
        return Point(float(xs[nearest]), float(ys[nearest])), mask
    raise ValueError(f"{where}: unknown region type {region_type!r}; expected point, box or free_form")


def toy_queries(records: Sequence[dict[str, Any]], image_folder: str | os.PathLike) -> list[Query]:
    """One query per record: its human question with its regions given as its region types say."""
    queries = []
    for index, record in enumerate(records):
        where = f"toy record #{index} (id={record.get('id')})"
        for field_name in ("id", "task", "image", "conversations", "box_x1y1x2y2"):
            if field_name not in record:
                raise ValueError(f"{where} has no '{field_name}'")
        question = record["conversations"][0]["value"].replace("<image>", "").strip()
        boxes = record["box_x1y1x2y2"][0]
        masks = (record.get("masks") or [[]])[0]
        types = (record.get("region_type") or [[]])[0]
        regions, within = [], []
        size = (int(record["image_w"]), int(record["image_h"])) if "image_w" in record and "image_h" in record \
            else None
        for k, box in enumerate(boxes):
            kind = types[k] if k < len(types) else "box"
            region, inside = toy_region(box, masks[k] if k < len(masks) else None, kind, f"{where} region {k}", size)
            regions.append(region)
            within.append(inside)
        queries.append(Query(
            image=Path(image_folder) / record["image"],
            prompt=question,
            output={"id": record["id"], "task": record["task"], "region_type": types[0] if types else None,
                    "image": record["image"], "prompt": None, "text": None, "width": None, "height": None},
            regions=regions,
            within=within,
            where=where,
        ))
    return queries


# ----------------------------------------------------------------------------------------------------------
# Scoring


def object_names(text: str) -> list[str]:
    """The colour+shape names a text mentions, in order, lower-cased and singular ("red triangle")."""
    return [f"{m.group(1).lower()} {m.group(2).lower()}" for m in _NAME.finditer(text)]


def pixel_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two inclusive pixel boxes, on pixel areas."""
    return box_iou([a[0], a[1], a[2] + 1, a[3] + 1], [b[0], b[1], b[2] + 1, b[3] + 1])


def _answer_boxes(prediction: dict[str, Any], width: int,
                  height: int) -> list[tuple[str, tuple[float, float, float, float] | None]]:
    """(phrase, inclusive pixel box or None for a point) of each region of the answer (``common.answer_boxes``)."""
    return [(b.phrase, None if b.is_point else b.box) for b in answer_boxes(prediction, width, height)]


def _ratio(hits: int, n: int) -> float | None:
    return hits / n if n else None


def score_toy(records: Sequence[dict[str, Any]], predictions: PredictionStream | Sequence[dict[str, Any]],
              threshold: float = 0.5) -> dict[str, Any]:
    """Metrics of ``predictions`` (answers-file lines with ``id`` and ``text``) on the toy ``records``."""
    stream = PredictionStream.of(predictions)
    alignment = StreamAlignment(records, lambda r: str(r["id"]), "toy record")
    refer: dict[str, dict[str, list[int]]] = {"refer": defaultdict(lambda: [0, 0]),
                                              "refer_choice": defaultdict(lambda: [0, 0])}
    ground = {"n": 0, "hits": 0, "no_box": 0}
    describe = {"records": 0, "objects": 0, "recalled": 0, "boxes": 0, "correct_boxes": 0}
    yesno = {"n": 0, "correct": 0, "yes": 0}
    unknown_tasks: dict[str, int] = defaultdict(int)
    for record, prediction in alignment.pairs(stream, lambda p: str(p["id"])):
        if not isinstance(prediction.get("text"), str):
            stream.reject("no_text", f"toy record {record['id']}")
            continue
        text = prediction["text"]
        truth = record["conversations"][1]["value"]
        task = record["task"]
        width, height = int(record["image_w"]), int(record["image_h"])
        try:
            found = _answer_boxes(prediction, width, height)
        except ValueError as exc:
            stream.reject("bad_regions", f"toy record {record['id']}", str(exc))
            continue
        if task in refer:
            target = object_names(truth)
            named = set(object_names(text))
            correct = bool(target) and named == {target[0]}
            kind = (record.get("region_type") or [[]])[0]
            for bucket in ("all", kind[0] if kind else "unknown"):
                refer[task][bucket][0] += 1
                refer[task][bucket][1] += correct
        elif task == "ground":
            target_box = record["box_x1y1x2y2"][1][0]
            boxes = found
            ground["n"] += 1
            if not boxes or boxes[0][1] is None:
                ground["no_box"] += not boxes
            else:
                ground["hits"] += pixel_iou(boxes[0][1], target_box) >= threshold
        elif task == "describe":
            objects = record["objects"]
            boxes = [(set(object_names(phrase)), box) for phrase, box in found]
            describe["records"] += 1
            describe["objects"] += len(objects)
            describe["boxes"] += len(boxes)

            def matches(names: set[str], box, obj: dict[str, Any]) -> bool:
                return box is not None and obj["name"] in names and pixel_iou(box, obj["box"]) >= threshold

            describe["recalled"] += sum(any(matches(n, b, obj) for n, b in boxes) for obj in objects)
            describe["correct_boxes"] += sum(any(matches(n, b, obj) for obj in objects) for n, b in boxes)
        elif task == "yesno":
            decided = decide_yes_no(text)
            yesno["n"] += 1
            yesno["correct"] += decided == truth.strip().lower()
            yesno["yes"] += decided == "yes"
        else:
            unknown_tasks[task] += 1
    if unknown_tasks:
        logger.warning("records of unknown tasks were not scored: %s", dict(unknown_tasks))

    results: dict[str, Any] = {}
    for task, buckets in refer.items():
        results[task] = {
            kind: {"n": n, "accuracy": _ratio(hits, n)}
            for kind, (n, hits) in sorted(buckets.items(), key=lambda item: (item[0] != "all", item[0]))
        }
    t = f"{threshold:g}"
    results["ground"] = {"n": ground["n"], f"acc@{t}": _ratio(ground["hits"], ground["n"]),
                         "no_box": ground["no_box"]}
    results["describe"] = {
        "records": describe["records"], "objects": describe["objects"], "boxes": describe["boxes"],
        f"recall@{t}": _ratio(describe["recalled"], describe["objects"]),
        f"precision@{t}": _ratio(describe["correct_boxes"], describe["boxes"]),
    }
    results["yesno"] = {"n": yesno["n"], "accuracy": _ratio(yesno["correct"], yesno["n"]),
                        "yes_ratio": _ratio(yesno["yes"], yesno["n"])}

    def refer_accuracy(task: str, kind: str) -> float | None:
        return results[task].get(kind, {}).get("accuracy")

    summary = {
        "refer_accuracy": refer_accuracy("refer", "all"),
        **{f"refer_{kind}_accuracy": refer_accuracy("refer", kind) for kind in ("point", "box", "free_form")},
        "refer_choice_accuracy": refer_accuracy("refer_choice", "all"),
        f"ground_acc@{t}": results["ground"][f"acc@{t}"],
        f"describe_recall@{t}": results["describe"][f"recall@{t}"],
        "yesno_accuracy": results["yesno"]["accuracy"],
    }
    return {"benchmark": "toy", "results": results, "summary": summary, "alignment": alignment.report(),
            "predictions_read": stream.report(),
            "threshold": threshold}


# ----------------------------------------------------------------------------------------------------------
# In-process evaluation (training scripts, `make demo`)


def evaluate_toy(model, processor, records: Sequence[dict[str, Any]], image_folder: str | os.PathLike,
                 answers_file: str | os.PathLike, batch_size: int = 8, max_new_tokens: int = 128,
                 overwrite: bool = True, progress: bool = False) -> dict[str, Any]:
    """Answer ``records`` with an already loaded model, write ``answers_file`` and its metrics beside it;
    returns the metrics."""
    was_training = model.training
    model.eval()
    try:
        run_inference(model, processor, toy_queries(records, image_folder), answers_file, KEY_FIELDS,
                      batch_size=batch_size, generation=GenerationConfig(max_new_tokens=max_new_tokens),
                      overwrite=overwrite, progress=progress)
    finally:
        model.train(was_training)
    metrics = score_toy(records, PredictionStream(answers_file))
    metrics["predictions"] = str(answers_file)
    write_json(metrics, metrics_path(answers_file))
    return metrics


# ----------------------------------------------------------------------------------------------------------
# Command line


def _print_metrics(metrics: dict[str, Any]) -> None:
    rows = [[name, "-" if value is None else 100 * value] for name, value in metrics["summary"].items()]
    print(format_table(["metric", "%"], rows))
    a = metrics["alignment"]
    print(f"evaluated {a['evaluated']}, missing {a['missing']}, unexpected {a['unexpected']}")


def _score(predictions: str, annotation_file: str, output: str | None, threshold: float,
           only_if_complete: bool = False) -> dict[str, Any] | None:
    metrics = score_toy(load_records(annotation_file), PredictionStream(predictions), threshold)
    if only_if_complete and not metrics["alignment"]["complete"]:
        print(f"{metrics['alignment']['missing']} records have no answer yet (other chunks still running); "
              f"score with `python -m ferret.eval.toy score --predictions {predictions} ...` when all are done")
        return None
    metrics["predictions"] = str(predictions)
    metrics["annotation_file"] = str(annotation_file)
    out = write_json(metrics, output or metrics_path(predictions))
    _print_metrics(metrics)
    print(f"metrics written to {out}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=program_name("ferret.eval.toy"), description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "infer": sub.add_parser("infer", help="answer every record of a toy split with a model"),
        "evaluate": sub.add_parser("evaluate", help="infer, then score"),
    }
    for command in commands.values():
        command.add_argument("--annotation-file", required=True, help="the world's {split}.json (e.g. test.json)")
        command.add_argument("--image-folder", default=None,
                             help="folder the records' image paths are relative to (default: the file's folder)")
        add_inference_arguments(command, images=False)
    commands["evaluate"].add_argument("--output", default=None, help="metrics JSON (default: beside the answers)")
    commands["evaluate"].add_argument("--iou-threshold", type=float, default=0.5)
    score = sub.add_parser("score", help="compute the toy metrics from a prediction file or folder")
    score.add_argument("--predictions", required=True, help="a .jsonl file or a folder of {k}_of_{n}.jsonl chunks")
    score.add_argument("--annotation-file", required=True, help="the world's {split}.json")
    score.add_argument("--iou-threshold", type=float, default=0.5)
    score.add_argument("--output", default=None, help="metrics JSON (default: <predictions>.metrics.json beside it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "score":
        _score(args.predictions, args.annotation_file, args.output, args.iou_threshold)
        return 0
    folder = args.image_folder or Path(args.annotation_file).parent
    report = infer_from_args(args, toy_queries(load_records(args.annotation_file), folder), KEY_FIELDS)
    if args.command == "evaluate":
        # With several chunks (or torchrun ranks) the last one to finish writes the metrics.
        chunked = report.path != Path(args.answers_file)
        _score(args.answers_file, args.annotation_file, args.output, args.iou_threshold, only_if_complete=chunked)
    return 0


if __name__ == "__main__":
    sys.exit(main())
