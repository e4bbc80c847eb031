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

The name-swap probe (``infer`` runs it after the answers; ``--probe-images 0`` turns it off) measures whether the
model reads the object named in the question. On the first ``--probe-images`` images of the split it asks, greedy:

* ``ground``: the grounding question for every object of each image holding two or more (differently named)
  objects. ``probe_ground_reads_name``: the fraction of these answers whose first box matches the named object
  (IoU >= 0.5) better than every other object of the image. A model that ignores the name answers all questions
  about an image alike, so it gets at most one per image: ``results.probe.ground.ignoring_name_at_most``
  (``answer_names_it`` beside it: how often the answer's first phrase names the object asked about).
  ``probe_ground_same_box``: the fraction of pairs of names asked about one image answered with the same box
  (IoU >= 0.9 between the two answers' first boxes): 1 for a model that ignores the name, 0 for one that reads it.
* ``yesno``: "Is there a {name} ...?" about one image with a present name and an absent one.
  ``probe_yesno_consistent``: the fraction of pairs answered Yes and No, as they should.
* ``probe_name_token_tv``: per pair of questions above (same image, names swapped), the total-variation
  distance between the model's next-token distributions at the first answer token where the two right answers
  differ (their common prefix given, teacher-forced: "a red" before the shape of "a red circle" vs "a red star",
  the first token for Yes vs No); the mean over pairs. 0: swapping the name changes nothing there; 1: the two
  distributions share nothing.

Its answers go beside the answers file, ``<name>.probe.jsonl``, each pair's distance on its first question's line
(``name_swap_tv``); ``score`` adds the probe's numbers when that file is there.

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
import time
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from ferret.constants import IGNORE_INDEX
from ferret.data.toy import COLOR_RGB, GROUND_QUESTION, NO, OBJECT_ANSWER, SHAPES, YES, YESNO_QUESTION
from ferret.decoding import DecodingSettings
from ferret.eval.common import (
    PredictionStream,
    StreamAlignment,
    answer_boxes,
    decode_segmentation,
    format_table,
    metrics_path,
    read_jsonl,
    write_json,
)
from ferret.eval.inference import (
    GenerationConfig,
    Query,
    add_inference_arguments,
    generation_from_args,
    infer_from_args,
    load_model,
    resolve_shard,
    run_inference,
)
from ferret.eval.metrics import box_iou
from ferret.eval.pope import decide_yes_no
from ferret.flags import program_name
from ferret.regions import Box, FreeForm, Point

logger = logging.getLogger(__name__)

__all__ = [
    "KEY_FIELDS",
    "PROBE_IMAGES",
    "NameSwapProbe",
    "answer_token_logits",
    "evaluate_toy",
    "load_records",
    "main",
    "name_swap_tv",
    "object_names",
    "probe_path",
    "probe_queries",
    "probe_reads",
    "run_probe",
    "score_probe",
    "score_toy",
    "total_variation",
    "toy_queries",
    "toy_region",
]

KEY_FIELDS = ("id",)
PROBE_IMAGES = 32  # images per part of the name-swap probe (ground, yesno): a few seconds on one CPU thread
SAME_BOX_IOU = 0.9  # two answers' boxes this close are the same box
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
              threshold: float = 0.5, probe: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Metrics of ``predictions`` (answers-file lines with ``id`` and ``text``) on the toy ``records``; with the
    name-swap ``probe``'s answer lines, its numbers too (``results["probe"]``, ``probe_*`` in the summary)."""
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
    if probe is not None:
        probed = score_probe(records, probe, threshold)
        results["probe"] = probed["results"]
        summary.update(probed["summary"])
    return {"benchmark": "toy", "results": results, "summary": summary, "alignment": alignment.report(),
            "predictions_read": stream.report(),
            "threshold": threshold}


# ----------------------------------------------------------------------------------------------------------
# The name-swap probe (see the module docstring)


@dataclass
class NameSwapProbe:
    """The probe's questions: ``queries``, the right answer to each (``answers``, up to the name: the probe only
    reads the distributions before the first token where two answers differ) and the ``pairs`` of queries
    (indices) that ask about one image with two different names."""

    queries: list[Query] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    pairs: list[tuple[int, int]] = field(default_factory=list)


def probe_path(answers_file: str | os.PathLike) -> Path:
    """Where the probe's answers go: beside the answers file, as ``<name>.probe.jsonl``."""
    path = Path(answers_file)
    return path.with_name(path.name.removesuffix(".jsonl") + ".probe.jsonl")


def _probe_objects(record: dict[str, Any], where: str) -> list[dict[str, Any]]:
    objects = record.get("objects")
    if not isinstance(objects, list):
        raise ValueError(f"{where} has no 'objects' list; the name-swap probe needs every object's name and box")
    for k, obj in enumerate(objects):
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or len(obj.get("box") or ()) != 4:
            raise ValueError(f"{where} object {k}: expected {{'name': str, 'box': [x1, y1, x2, y2]}}, got {obj!r}")
    return objects


def probe_queries(records: Sequence[dict[str, Any]], image_folder: str | os.PathLike,
                  max_images: int = PROBE_IMAGES) -> NameSwapProbe:
    """The name-swap probe's questions on the first ``max_images`` records (in file order) of each part:

    * ground: records whose image holds two or more objects, all differently named; one grounding question
      per object, each pair of them a probe pair;
    * yesno: records with an object and a name of the split absent from their image; "Is there ...?" about
      one present and one absent name (picked from the record id, so the same on every run), a pair.
    """
    if max_images < 0:
        raise ValueError(f"max_images must be >= 0, got {max_images}")
    probe = NameSwapProbe()
    all_names = sorted({obj["name"] for r in records if isinstance(r.get("objects"), list)
                        for obj in r["objects"] if isinstance(obj, dict) and isinstance(obj.get("name"), str)})

    def ask(record: dict[str, Any], part: str, name: str, question: str, answer: str) -> int:
        probe.queries.append(Query(
            image=Path(image_folder) / record["image"],
            prompt=question.format(name=name),
            output={"id": f"{record['id']}/{part}/{name}", "record": record["id"], "probe": part, "name": name,
                    "image": record["image"], "prompt": None, "text": None, "width": None, "height": None},
            where=f"name-swap probe of toy record {record['id']}",
        ))
        probe.answers.append(answer)
        return len(probe.queries) - 1

    grounded = asked = 0
    for index, record in enumerate(records):
        if grounded >= max_images and asked >= max_images:
            break
        where = f"toy record #{index} (id={record.get('id')})"
        for field_name in ("id", "image"):
            if field_name not in record:
                raise ValueError(f"{where} has no '{field_name}'")
        names = [obj["name"] for obj in _probe_objects(record, where)]
        if grounded < max_images and len(names) >= 2 and len(set(names)) == len(names):
            asked_here = [ask(record, "ground", n, GROUND_QUESTION, OBJECT_ANSWER.format(name=n)) for n in names]
            probe.pairs.extend(combinations(asked_here, 2))
            grounded += 1
        absent = [n for n in all_names if n not in names]
        if asked < max_images and names and absent:
            pick = zlib.crc32(str(record["id"]).encode("utf-8"))
            probe.pairs.append((ask(record, "yesno", names[pick % len(names)], YESNO_QUESTION, YES),
                                ask(record, "yesno", absent[pick % len(absent)], YESNO_QUESTION, NO)))
            asked += 1
    return probe


def total_variation(logits_a, logits_b):
    """Total-variation distance between the softmax distributions of two logit (or log-probability) rows:
    [M, V], [M, V] -> [M], in [0, 1]."""
    import torch

    p = torch.softmax(logits_a.float(), dim=-1)
    q = torch.softmax(logits_b.float(), dim=-1)
    return 0.5 * (p - q).abs().sum(dim=-1)


def _answered(processor, probe: NameSwapProbe, k: int, image=None, region_feature: bool = True) -> dict[str, Any]:
    """Question ``k`` of ``probe`` with its right answer, encoded as a training sample (its labels mark the
    answer's tokens); without ``image``, the text alone."""
    query = probe.queries[k]
    turns = [{"from": "human", "value": query.prompt}, {"from": "gpt", "value": probe.answers[k]}]
    sample = processor.encode(turns, image, image_size=None if image is not None else (1, 1),
                              region_feature=region_feature, where=f"{query.where}: ")
    if not (sample["labels"] != IGNORE_INDEX).any():
        raise ValueError(f"{query.where}: the answer {probe.answers[k]!r} has no supervised token (was the prompt "
                         "truncated?)")
    return sample


def probe_reads(processor, probe: NameSwapProbe) -> list[tuple[int, int]]:
    """Where each pair of ``probe`` is compared: (question, answer token) for its first then its second question,
    the token being the first at which the two right answers differ (``a red circle`` vs ``a red star``: 2)."""
    answers = []
    for k in range(len(probe.queries)):
        sample = _answered(processor, probe, k)
        answers.append(sample["input_ids"][sample["labels"] != IGNORE_INDEX])
    reads = []
    for a, b in probe.pairs:
        n = min(len(answers[a]), len(answers[b]))
        differ = (answers[a][:n] != answers[b][:n]).nonzero().flatten()
        if not len(differ):
            raise ValueError(f"{probe.queries[a].where}: the answers of {probe.queries[a].output['id']!r} and "
                             f"{probe.queries[b].output['id']!r} do not differ in a token both have")
        reads += [(a, int(differ[0])), (b, int(differ[0]))]
    return reads


def answer_token_logits(model, processor, probe: NameSwapProbe, reads: Sequence[tuple[int, int]],
                        batch_size: int = 8, region_feature: bool = True):
    """The model's logits for answer token ``d`` of question ``k`` (its right answer's first ``d`` tokens given),
    per (k, d) of ``reads``: [len(reads), V], float32 on the CPU.

    Each question needed is encoded once with its image and answer (``processor.encode``, as in training) and run
    through the model's forward in right-padded batches; the logits are read only at the positions asked for.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    needed: dict[int, set[int]] = defaultdict(set)
    for k, d in reads:
        needed[k].add(d)
    found: dict[tuple[int, int], torch.Tensor] = {}
    order = sorted(needed)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        samples = [_answered(processor, probe, k, probe.queries[k].load_image(), region_feature) for k in batch]
        rows, columns, keys = [], [], []
        for row, (k, sample) in enumerate(zip(batch, samples)):
            positions = (sample["labels"] != IGNORE_INDEX).nonzero().flatten()
            for d in sorted(needed[k]):
                if d >= len(positions):
                    raise ValueError(f"{probe.queries[k].where}: answer token {d} asked for, the answer has "
                                     f"{len(positions)}")
                rows.append(row)
                columns.append(int(positions[d]) - 1)  # the logits before answer token d predict it
                keys.append((k, d))
        inputs = processor.pad(samples, padding_side="right")
        inputs.pop("labels")
        with torch.inference_mode():
            logits = model(**processor.model_inputs(inputs, model)).logits
        picked = logits[torch.tensor(rows, device=logits.device), torch.tensor(columns, device=logits.device)]
        found.update(zip(keys, picked.float().cpu()))
    if not reads:
        return torch.empty(0, 0)
    return torch.stack([found[(k, d)] for k, d in reads])


def name_swap_tv(model, processor, probe: NameSwapProbe, batch_size: int = 8,
                 region_feature: bool = True) -> list[float]:
    """Per pair of ``probe``: the total-variation distance between the model's next-token distributions at the
    first answer token where the pair's right answers differ (``probe_reads``), each question given its own
    answer's tokens before it (``answer_token_logits``)."""
    if not probe.pairs:
        return []
    logits = answer_token_logits(model, processor, probe, probe_reads(processor, probe), batch_size, region_feature)
    return total_variation(logits[0::2], logits[1::2]).tolist()


def run_probe(model, processor, records: Sequence[dict[str, Any]], image_folder: str | os.PathLike,
              answers_file: str | os.PathLike, max_images: int = PROBE_IMAGES, batch_size: int = 8,
              generation: DecodingSettings | None = None, region_feature: bool = True,
              progress: bool = False) -> Path:
    """Ask the name-swap probe's questions (``probe_queries``) with an already loaded model and write their answers
    to ``probe_path(answers_file)``, each pair's ``name_swap_tv`` on its first question's line; returns that path."""
    start = time.perf_counter()
    probe = probe_queries(records, image_folder, max_images)
    distances = name_swap_tv(model, processor, probe, batch_size, region_feature)
    for (a, b), value in zip(probe.pairs, distances):
        probe.queries[a].output.setdefault("name_swap_tv", {})[probe.queries[b].output["id"]] = value
    path = probe_path(answers_file)
    run_inference(model, processor, probe.queries, path, KEY_FIELDS, batch_size=batch_size,
                  generation=generation or GenerationConfig(), region_feature=region_feature, overwrite=True,
                  progress=progress)
    logger.info("name-swap probe: %d questions, %d pairs in %.1f s -> %s", len(probe.queries), len(probe.pairs),
                time.perf_counter() - start, path)
    return path


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _probe_line(line: dict[str, Any], n: int, by_id: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], list[float]]:
    """(its toy record, its pair distances) of probe answer line ``n``, checked."""
    where = f"probe answer #{n} (id={line.get('id')!r})"
    record = by_id.get(str(line.get("record")))
    if record is None:
        raise ValueError(f"{where}: no toy record {line.get('record')!r} in the annotation file")
    part, name = line.get("probe"), line.get("name")
    if part not in ("ground", "yesno") or not isinstance(name, str) or not isinstance(line.get("text"), str):
        raise ValueError(f"{where}: expected 'probe' (ground or yesno), 'name' and 'text'")
    names = [obj["name"] for obj in _probe_objects(record, f"toy record {record['id']}")]
    if part == "ground" and name not in names:
        raise ValueError(f"{where}: {name!r} is not an object of toy record {record['id']} ({names})")
    tv = line.get("name_swap_tv") or {}
    if not isinstance(tv, dict) or not all(isinstance(v, (int, float)) and 0 <= v <= 1 + 1e-6 for v in tv.values()):
        raise ValueError(f"{where}: 'name_swap_tv' must map question ids to distances in [0, 1], got {tv!r}")
    return record, [float(v) for v in tv.values()]


def _score_ground_probe(asked: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]], threshold: float,
                        distances: list[float]) -> dict[str, Any]:
    """The ground part of the probe from {record id: [(record, answer line)]}."""
    reads = questions = names_it = same_box = pairs = 0
    for lines in asked.values():
        boxes = []
        for record, line in lines:
            objects = record["objects"]
            found = _answer_boxes(line, int(record["image_w"]), int(record["image_h"]))
            box = found[0][1] if found else None
            ious = [pixel_iou(box, obj["box"]) for obj in objects] if box is not None else []
            named = [obj["name"] for obj in objects].index(line["name"])
            questions += 1
            reads += bool(ious) and ious[named] >= threshold and all(
                iou < ious[named] for k, iou in enumerate(ious) if k != named)
            names_it += object_names(line["text"])[:1] == [line["name"]]
            boxes.append(box)
        for a, b in combinations(boxes, 2):
            pairs += 1
            same_box += a is not None and b is not None and pixel_iou(a, b) >= SAME_BOX_IOU
    return {"images": len(asked), "questions": questions, "pairs": pairs,
            f"reads_name@{threshold:g}": _ratio(reads, questions),
            "ignoring_name_at_most": _ratio(len(asked), questions),
            "answer_names_it": _ratio(names_it, questions), "same_box": _ratio(same_box, pairs),
            "name_token_tv": _mean(distances)}


def score_probe(records: Sequence[dict[str, Any]], answers: Sequence[dict[str, Any]],
                threshold: float = 0.5) -> dict[str, Any]:
    """The probe's numbers from its answer lines (``run_probe``): ``{"results": {...}, "summary": {...}}``."""
    by_id = {str(r.get("id")): r for r in records}
    ground: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = defaultdict(list)
    yesno: dict[str, dict[bool, str | None]] = defaultdict(dict)  # record id -> {name present: yes/no/None}
    distances: dict[str, list[float]] = {"ground": [], "yesno": []}
    for n, line in enumerate(answers):
        record, tv = _probe_line(line, n, by_id)
        distances[line["probe"]] += tv
        if line["probe"] == "ground":
            ground[str(record["id"])].append((record, line))
        else:
            present = line["name"] in {obj["name"] for obj in record["objects"]}
            yesno[str(record["id"])][present] = decide_yes_no(line["text"])
    pairs = [asked for asked in yesno.values() if len(asked) == 2]
    results = {
        "ground": _score_ground_probe(ground, threshold, distances["ground"]),
        "yesno": {"pairs": len(pairs),
                  "consistent": _ratio(sum(a[True] == "yes" and a[False] == "no" for a in pairs), len(pairs)),
                  "same_answer": _ratio(sum(a[True] == a[False] for a in pairs), len(pairs)),
                  "name_token_tv": _mean(distances["yesno"])},
        "name_token_tv": _mean(distances["ground"] + distances["yesno"]),
        "tv_pairs": len(distances["ground"]) + len(distances["yesno"]),
    }
    summary = {
        "probe_ground_reads_name": results["ground"][f"reads_name@{threshold:g}"],
        "probe_ground_same_box": results["ground"]["same_box"],
        "probe_yesno_consistent": results["yesno"]["consistent"],
        "probe_name_token_tv": results["name_token_tv"],
    }
    return {"results": results, "summary": summary}


# ----------------------------------------------------------------------------------------------------------
# In-process evaluation (training scripts, `make demo`)


def evaluate_toy(model, processor, records: Sequence[dict[str, Any]], image_folder: str | os.PathLike,
                 answers_file: str | os.PathLike, batch_size: int = 8, max_new_tokens: int = 128,
                 overwrite: bool = True, progress: bool = False,
                 probe_images: int = PROBE_IMAGES) -> dict[str, Any]:
    """Answer ``records`` with an already loaded model, write ``answers_file`` and its metrics beside it;
    returns the metrics. ``probe_images`` > 0 also runs the name-swap probe (``run_probe``)."""
    was_training = model.training
    model.eval()
    generation = GenerationConfig(max_new_tokens=max_new_tokens)
    probe = None
    try:
        run_inference(model, processor, toy_queries(records, image_folder), answers_file, KEY_FIELDS,
                      batch_size=batch_size, generation=generation, overwrite=overwrite, progress=progress)
        if probe_images > 0:
            probe = read_jsonl(run_probe(model, processor, records, image_folder, answers_file, probe_images,
                                         batch_size, generation))
    finally:
        model.train(was_training)
    metrics = score_toy(records, PredictionStream(answers_file), probe=probe)
    metrics["predictions"] = str(answers_file)
    write_json(metrics, metrics_path(answers_file))
    return metrics


# ----------------------------------------------------------------------------------------------------------
# Command line


def probe_legend(results: dict[str, Any]) -> str:
    """What the probe's numbers mean, in a few lines under the metrics table."""
    ground = results["ground"]
    bound = ground["ignoring_name_at_most"]
    return "\n".join([
        f"name-swap probe (does the model read the name in the question?) on {ground['images']} images x every "
        f"object, and {results['yesno']['pairs']} yes/no pairs:",
        "  probe_ground_reads_name: the answer's box fits the named object best (IoU >= 0.5); a model ignoring "
        "the name gets at most " + ("-" if bound is None else f"{100 * bound:.1f}%"),
        "  probe_ground_same_box: two names asked about one image, the same box answered for both",
        "  probe_yesno_consistent: Yes to a name in the image and No to one absent from it",
        "  probe_name_token_tv: how much swapping the name moves the next-token distribution where the right "
        "answers differ (0 not at all, 100% completely)",
    ])


def _print_metrics(metrics: dict[str, Any]) -> None:
    rows = [[name, "-" if value is None else 100 * value] for name, value in metrics["summary"].items()]
    print(format_table(["metric", "%"], rows))
    if "probe" in metrics["results"]:
        print(probe_legend(metrics["results"]["probe"]))
    a = metrics["alignment"]
    print(f"evaluated {a['evaluated']}, missing {a['missing']}, unexpected {a['unexpected']}")


def _score(predictions: str, annotation_file: str, output: str | None, threshold: float,
           only_if_complete: bool = False) -> dict[str, Any] | None:
    probe_file = probe_path(predictions)
    probe = read_jsonl(probe_file) if Path(predictions).is_file() and probe_file.is_file() else None
    metrics = score_toy(load_records(annotation_file), PredictionStream(predictions), threshold, probe)
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
        command.add_argument("--probe-images", type=int, default=PROBE_IMAGES,
                             help=f"images per part of the name-swap probe (default {PROBE_IMAGES}; 0: no probe); "
                                  "its answers go to <answers>.probe.jsonl")
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
    records = load_records(args.annotation_file)
    if args.probe_images < 0:
        parser.error(f"--probe-images must be >= 0, got {args.probe_images}")
    probing = args.probe_images > 0 and resolve_shard(args.num_chunks, args.chunk_idx).num_chunks == 1
    loaded = None
    if probing:  # the model is loaded once, for the answers and the probe
        loaded = load_model(args.model_path, args.model_base, args.device, args.dtype, args.load_8bit,
                            args.load_4bit, conv_template=args.conv_mode)
    report = infer_from_args(args, toy_queries(records, folder), KEY_FIELDS, loaded=loaded)
    if probing:
        run_probe(*loaded, records, folder, args.answers_file, args.probe_images, args.batch_size,
                  generation_from_args(args), args.region_feature, args.progress)
    elif probe_path(args.answers_file).is_file():  # an earlier run's probe answers, not this run's
        probe_path(args.answers_file).unlink()
        logger.info("removed %s: the probe did not run (--probe-images 0 or several chunks)",
                    probe_path(args.answers_file))
    if args.command == "evaluate":
        # With several chunks (or torchrun ranks) the last one to finish writes the metrics.
        chunked = report.path != Path(args.answers_file)
        _score(args.answers_file, args.annotation_file, args.output, args.iou_threshold, only_if_complete=chunked)
    return 0


if __name__ == "__main__":
    sys.exit(main())
