"""Captioning: COCO captions (Karpathy test) and region captioning (RefCOCOg regions, Visual Genome), CIDEr and METEOR.

Datasets (``--dataset``), read as published:

* ``coco``      Karpathy's ``dataset_coco.json`` (``{"images": [{filepath, filename, cocoid, split, sentences:
  [{raw}]}]}``, the ``--split``, default test, 5,000 images) or a COCO captions file (``{"images": [{id,
  file_name}], "annotations": [{image_id, caption}]}``, e.g. ``coco_karpathy_test_gt.json`` or
  ``captions_val2014.json``). One query per image; key ``image_id``; images ``{image-folder}/{filepath}/{filename}``
  (Karpathy) or ``{image-folder}/{file_name}``.
* ``refcocog``  RefCOCOg regions as Osprey and Kosmos-2 evaluate them: the COCO-style
  ``finetune_refcocog_val_with_mask.json`` (``images`` with ``caption``; ``annotations`` with ``bbox`` [x, y, w,
  h] and ``segmentation`` polygons or RLE). One query per annotation, the reference is its image entry's caption;
  key ``id`` (the annotation id).
* ``vg``        Visual Genome ``region_descriptions.json`` (``[{"id": image_id, "regions": [{region_id, image_id,
  phrase, x, y, width, height}]}]``); one query per region, the reference is its phrase; key ``id``
  (region_id); images ``{image-folder}/{image_id}.jpg``. Pass a file holding only the regions of your test split.

Regions are given as the box (``--region-format box``, the default) or, where the file has one, the mask
(``--region-format mask``, RefCOCOg). Questions: "Provide a one-sentence caption for the provided image." and
"Please give me a short description of <region0>." (Osprey's region prompt); ``--question`` changes them.

Scoring: the answer's coordinates are removed (``regions.strip_regions``); answers and references are tokenised
as the COCO caption evaluation does (Stanford PTBTokenizer, lower-cased, punctuation tokens dropped) and scored
with pycocoevalcap's CIDEr (CIDEr-D, n = 4, sigma = 6) and METEOR 1.5. Both the PTB tokenizer and METEOR run on
Java: without a Java runtime (Debian: ``apt-get install default-jre-headless``) METEOR is skipped with a message
and the tokenisation falls back to a Python one (``simple_tokenize``: lower-case, PTB-style splitting of
punctuation and ``'s``/``n't``), which agrees with PTB on ordinary captions; the metrics file says which was used.
Scores are reported x100, as the papers do.

Command lines::

    python -m ferret.eval caption infer --dataset coco --model-path checkpoints/ferret-7b \\
        --annotation-file data/coco/dataset_coco.json --image-folder data/coco --answers-file runs/coco_cap.jsonl
    python -m ferret.eval caption score --dataset coco --predictions runs/coco_cap.jsonl \\
        --annotation-file data/coco/dataset_coco.json
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ferret.eval.common import (
    PredictionStream,
    StreamAlignment,
    decode_segmentation,
    format_table,
    metrics_path,
    write_json,
)
from ferret.eval.inference import Query, add_inference_arguments, infer_from_args
from ferret.eval.metrics import xywh_to_xyxy
from ferret.flags import program_name

logger = logging.getLogger(__name__)

__all__ = ["CaptionItem", "DATASETS", "caption_queries", "java_available", "load_items", "main", "score_captions",
           "simple_tokenize"]

DATASETS = ("coco", "refcocog", "vg")
IMAGE_QUESTION = "Provide a one-sentence caption for the provided image."
REGION_QUESTION = "Please give me a short description of <region0>."
METEOR_SKIPPED = ("METEOR skipped: it needs a Java runtime ('java' not found on PATH; on Debian: "
                  "apt-get install default-jre-headless)")
# The tokens the COCO caption evaluation drops after PTB tokenisation.
_PUNCTUATION_TOKENS = {"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":", "-", "--",
                       "...", ";"}
_TOKEN = re.compile(r"\w+(?:[-.']\w+)*|\.\.\.|--|[^\w\s]")
_CLITIC = re.compile(r"^(\w+?)(n't|'s|'re|'ve|'ll|'d|'m)$")


@dataclass
class CaptionItem:
    """One thing to caption: an image, or a region of it (``region``: a dict with ``bbox`` and maybe
    ``segmentation``), with its reference captions."""

    key: str
    image: str
    references: list[str]
    width: int | None = None
    height: int | None = None
    region: dict[str, Any] | None = None


def java_available() -> bool:
    return shutil.which("java") is not None


def simple_tokenize(text: str) -> str:
    """Lower-case, split PTB-style, drop punctuation tokens: ``"A dog's ball."`` -> ``"a dog 's ball"``."""
    words = []
    for token in _TOKEN.findall(text.lower().replace("\n", " ")):
        clitic = _CLITIC.match(token)
        if clitic:
            words.extend(clitic.groups())
        elif token not in _PUNCTUATION_TOKENS:
            words.append(token)
    return " ".join(words)


# ----------------------------------------------------------------------------------------------------------
# Files


def _load_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_items(dataset: str, path: str | Path, split: str = "test") -> list[CaptionItem]:
    """The items of a dataset file (see the module docstring)."""
    data = _load_json(path)
    items: list[CaptionItem] = []
    if dataset == "coco":
        images = data.get("images") if isinstance(data, dict) else None
        if images is None:
            raise ValueError(f"{path}: expected Karpathy's dataset_coco.json or a COCO captions file with 'images'")
        if images and "sentences" in images[0]:  # Karpathy
            for image in images:
                if image.get("split") != split:
                    continue
                name = str(Path(image.get("filepath", "")) / image["filename"])
                items.append(CaptionItem(str(image.get("cocoid", image.get("imgid"))), name,
                                         [s["raw"] for s in image["sentences"]]))
        else:
            refs: dict[str, list[str]] = {}
            for ann in data.get("annotations", []):
                refs.setdefault(str(ann["image_id"]), []).append(ann["caption"])
            for image in images:
                key = str(image["id"])
                if key not in refs:
                    raise ValueError(f"{path}: image {key} has no caption annotation")
                items.append(CaptionItem(key, image["file_name"], refs[key], image.get("width"), image.get("height")))
    elif dataset == "refcocog":
        images = {str(image["id"]): image for image in data["images"]}
        for ann in data["annotations"]:
            image = images.get(str(ann["image_id"]))
            if image is None:
                raise ValueError(f"{path}: annotation {ann.get('id')} refers to image {ann['image_id']}, "
                                 "which is not in 'images'")
            if "caption" not in image:
                raise ValueError(f"{path}: image {image['id']} has no 'caption'")
            items.append(CaptionItem(str(ann["id"]), image["file_name"], [image["caption"]], int(image["width"]),
                                     int(image["height"]), {"bbox": ann["bbox"],
                                                            "segmentation": ann.get("segmentation")}))
    elif dataset == "vg":
        if not isinstance(data, list):
            raise ValueError(f"{path}: Visual Genome region_descriptions.json is a list of images")
        for image in data:
            for region in image.get("regions", []):
                bbox = [region["x"], region["y"], region["width"], region["height"]]
                items.append(CaptionItem(str(region["region_id"]), f"{region['image_id']}.jpg", [region["phrase"]],
                                         region=({"bbox": bbox})))
    else:
        raise ValueError(f"unknown caption dataset {dataset!r}; expected one of {DATASETS}")
    if not items:
        raise ValueError(f"{path}: no {dataset} item found" + (f" in split {split!r}" if dataset == "coco" else ""))
    return items


# ----------------------------------------------------------------------------------------------------------
# Scoring


def _tokenize(captions: dict[str, list[str]], use_java: bool) -> dict[str, list[str]]:
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    return {k: [simple_tokenize(c) for c in v] for k, v in captions.items()}


def score_captions(items: list[CaptionItem], predictions: PredictionStream | Iterable[dict[str, Any]],
                   meteor: bool | None = None, tokenizer: str = "auto", benchmark: str = "caption") -> dict[str, Any]:
    """CIDEr (and METEOR when Java is there, or ``meteor=True``) x100 of the answers against the references.

    ``tokenizer``: "ptb" (Java), "simple" or "auto" (PTB when Java is available).
    """
    from ferret.regions import strip_regions

    stream = PredictionStream.of(predictions)
    alignment = StreamAlignment(items, lambda item: item.key, f"{benchmark} item")
    hypotheses: dict[str, list[str]] = {}
    references: dict[str, list[str]] = {}
    for item, record in alignment.pairs(stream, lambda r: str(r["id"] if "id" in r else r["image_id"])):
        text = record.get("text", record.get("caption"))
        if not isinstance(text, str):
            stream.reject("no_text", f"{benchmark} item {item.key}")
            continue
        hypotheses[item.key] = [" ".join(strip_regions(text).split())]
        references[item.key] = list(item.references)
    java = java_available()
    use_ptb = {"auto": java, "ptb": True, "simple": False}[tokenizer]
    if use_ptb and not java:
        raise RuntimeError("the PTB tokenizer needs a Java runtime ('java' not found); use tokenizer='simple'")
    results: dict[str, Any] = {"n": len(hypotheses)}
    notes = []
    if hypotheses:
        from pycocoevalcap.cider.cider import Cider

        refs = _tokenize(references, use_ptb)
        hyps = _tokenize(hypotheses, use_ptb)
        results["CIDEr"] = 100.0 * float(Cider().compute_score(refs, hyps)[0])
        want_meteor = java if meteor is None else meteor
        if want_meteor and not java:
            raise RuntimeError(METEOR_SKIPPED)
        if want_meteor:
            from pycocoevalcap.meteor.meteor import Meteor

            scorer = Meteor()
            try:
                results["METEOR"] = 100.0 * float(scorer.compute_score(refs, hyps)[0])
            finally:
                del scorer
        elif java:
            notes.append("METEOR skipped on request")
        else:
            notes.append(METEOR_SKIPPED)
            logger.warning(METEOR_SKIPPED)
    return {"benchmark": benchmark, "results": results, "tokenizer": "ptb" if use_ptb else "simple",
            "notes": notes, "alignment": alignment.report(), "predictions_read": stream.report()}


# ----------------------------------------------------------------------------------------------------------
# Inference


def _region(item: CaptionItem, region_format: str, where: str, image):
    from ferret.regions import Box, FreeForm

    width, height = image.size
    x1, y1, x2, y2 = xywh_to_xyxy(item.region["bbox"])
    box = Box(x1, y1, x2, y2)
    segmentation = item.region.get("segmentation")
    if region_format == "box" or not segmentation:
        return [box], None
    return [FreeForm(decode_segmentation(segmentation, width, height, where))], None


def caption_queries(items: list[CaptionItem], image_folder: str | Path, region_format: str = "box",
                    question: str | None = None) -> list[Query]:
    queries = []
    for item in items:
        where = f"caption item {item.key} ({item.image})"
        key_field = "id" if item.region is not None else "image_id"
        prompt = question or (REGION_QUESTION if item.region is not None else IMAGE_QUESTION)
        queries.append(Query(
            image=Path(image_folder) / item.image, prompt=prompt,
            output={key_field: item.key, "image": item.image, "prompt": None, "text": None},
            regions=partial(_region, item, region_format, where) if item.region is not None else (),
            where=where))
    return queries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=program_name("ferret.eval.caption"), description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    infer = sub.add_parser("infer", help="caption every image or region with a model")
    score = sub.add_parser("score", help="CIDEr and METEOR of a prediction file or folder")
    for command in (infer, score):
        command.add_argument("--dataset", required=True, choices=DATASETS)
        command.add_argument("--annotation-file", required=True, help="the dataset's file (see the module help)")
        command.add_argument("--split", default="test", help="Karpathy split for --dataset coco (default test)")
    infer.add_argument("--region-format", default="box", choices=["box", "mask"])
    infer.add_argument("--question", default=None, help="the question (<region0> stands for the region)")
    add_inference_arguments(infer)
    score.add_argument("--predictions", required=True, help="a .jsonl file or a folder of {k}_of_{n}.jsonl chunks")
    score.add_argument("--tokenizer", default="auto", choices=["auto", "ptb", "simple"])
    score.add_argument("--no-meteor", dest="meteor", action="store_false", default=None,
                       help="skip METEOR (it starts a Java process that loads for ~30 s)")
    score.add_argument("--output", default=None, help="metrics JSON (default: <predictions>.metrics.json beside it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    items = load_items(args.dataset, args.annotation_file, args.split)
    if args.command == "infer":
        queries = caption_queries(items, args.image_folder, args.region_format, args.question)
        infer_from_args(args, queries, ("id",) if args.dataset != "coco" else ("image_id",))
        return 0
    benchmark = {"coco": "coco_caption", "refcocog": "refcocog_region_caption", "vg": "vg_region_caption"}
    metrics = score_captions(items, PredictionStream(args.predictions), meteor=args.meteor, tokenizer=args.tokenizer,
                             benchmark=benchmark[args.dataset])
    metrics["predictions"] = str(args.predictions)
    metrics["annotation_file"] = str(args.annotation_file)
    out = write_json(metrics, args.output or metrics_path(args.predictions))
    r = metrics["results"]
    print(format_table(["n", "CIDEr", "METEOR"], [[r["n"], r.get("CIDEr", "-"), r.get("METEOR", "skipped")]]))
    for note in metrics["notes"]:
        print(note)
    print(f"unparseable: {metrics['predictions_read']['unparseable']}; metrics written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
