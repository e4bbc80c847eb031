"""Flickr30k Entities phrase grounding: Recall@1/5/10 and the upper bound at IoU 0.5.

Ground truth is MDETR's ``final_flickr_mergedGT_{val,test}.json`` (``separateGT`` works too). Each entry of
``images`` is one caption of one image: ``caption``, ``tokens_positive_eval`` (per phrase, its character spans
in the caption), ``original_img_id``, ``sentence_id``, ``width``, ``height``. Each annotation is an
``[x, y, w, h]`` box with the character spans (``tokens_positive``) of the phrase it belongs to. Predictions
are JSON lines with ``image_id`` (= ``original_img_id``), ``sentence_id`` and ``text``, the answer to "What are
the locations of {phrases}?".

For every phrase of every caption:

1. Ground truth: the phrase's boxes are MERGED into their enclosing box (as the original's ``merge_boxes=True``).
   They come from the annotations whose spans overlap the phrase's spans, or, with ``--flickr-entities-path``,
   from the Flickr30k Entities ``Annotations/{image}.xml`` of the phrase's entity id (the original's source).
2. Prediction: the answer's regions (the pixel ``regions`` this project's inference stores, else the ``text``
   parsed with ``ferret.regions.parse_regions``, see ``common.answer_boxes``); the boxes kept are those whose phrase
   equals the ground-truth phrase after lower-casing, punctuation stripping and whitespace normalisation (the
   original's rule). When none matches exactly, and unless ``strict`` is set, a box is kept when one phrase
   contains the other as whole words ("a man" inside "and a man"), because the parser's phrase is "the text
   since the previous bracket or delimiter", which may carry a leading preposition. When still nothing
   matches, the zero box is used (IoU 0); the phrase counts in the denominator. The counts of exact, fallback
   and unmatched phrases are reported; ``strict=True`` reproduces the original's matching.
   A phrase is a span, not a string: when the same text occurs twice in a caption ("A girl hands a girl a
   flower"), the k-th occurrence gets the ground truth of the k-th annotated phrase with that text and the
   boxes of the answer's k-th mention of it ("a girl [..] hands a girl [..]": one box each; regions written
   after one mention, "two dogs [..] [..]", belong to that mention). An occurrence the answer does not mention
   gets the zero box. (The original gave both occurrences the first one's truth and every box of that text.)
3. Recall@k: the first k kept boxes, in answer order, contain one with IoU >= 0.5; the upper bound uses all.

Phrase types (people, clothing, bodyparts, animals, vehicles, instruments, scene, other) come only from the
Flickr30k Entities ``Sentences/{image}.txt`` files (lines like ``[/EN#18/people A man] in [/EN#19/clothing
a red shirt]``); with ``--flickr-entities-path`` the report has one row per type, without it only "all".

Inference (``infer``) reads the same MDETR JSON and the Flickr30k images and asks, for every caption in
image-entry id order, "What are the locations of {phrase 1, phrase 2, ...}?" (each phrase is the caption text of
its first character span, lower-cased, commas removed, as the original), writing the original's fields
``image_id`` (= original_img_id), ``sentence_id, file_name, prompt, text, width, height``.

Command lines::

    python -m ferret.eval.flickr infer --model-path checkpoints/ferret-7b \\
        --annotation-file data/annotations/final_flickr_mergedGT_test.json \\
        --image-folder data/flickr30k/flickr30k_images_split/test --answers-file runs/flickr_test.jsonl
    python -m ferret.eval.flickr score --predictions runs/flickr_test.jsonl \\
        --annotation-file data/annotations/final_flickr_mergedGT_test.json \\
        [--flickr-entities-path data/flickr30k_entities]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferret.eval.common import (
    AnswerBox,
    PredictionStream,
    StreamAlignment,
    format_table,
    metrics_path,
    normalize_phrase,
    write_json,
)
from ferret.eval.inference import Query, add_inference_arguments, infer_from_args
from ferret.eval.metrics import ZERO_BOX, box_iou_matrix, hit_at_k, merge_boxes, xywh_to_xyxy
from ferret.flags import program_name

logger = logging.getLogger(__name__)

__all__ = [
    "EntityPhrase",
    "FlickrEntities",
    "FlickrPhrase",
    "FlickrSentence",
    "KEY_FIELDS",
    "flickr_queries",
    "load_flickr_sentences",
    "main",
    "match_phrase_boxes",
    "parse_sentence",
    "read_entity_boxes",
    "read_sentences",
    "score_flickr",
]

DEFAULT_KS = (1, 5, 10)
KEY_FIELDS = ("image_id", "sentence_id")
QUESTION = "What are the locations of {phrases}?"

_ENTITY = re.compile(r"\[/EN#(?P<id>\d+)(?P<types>(?:/[^\s/\]]+)*)\s+(?P<text>[^\]]*)\]")


# ----------------------------------------------------------------------------------------------------------
# Flickr30k Entities files


@dataclass(frozen=True)
class EntityPhrase:
    """One annotated phrase of a Flickr30k Entities sentence."""

    phrase: str
    phrase_id: str
    phrase_types: tuple[str, ...]
    first_word_index: int


def parse_sentence(line: str) -> tuple[str, list[EntityPhrase]]:
    """Parse one line of a ``Sentences/*.txt`` file.

    ``"[/EN#18/people A man] in [/EN#19/clothing/other a red shirt] ."`` ->
    ``("A man in a red shirt .", [EntityPhrase("A man", "18", ("people",), 0), EntityPhrase("a red shirt", "19",
    ("clothing", "other"), 3)])``. Words are re-joined with single spaces.
    """
    words: list[str] = []
    phrases: list[EntityPhrase] = []
    cursor = 0
    for match in _ENTITY.finditer(line):
        words.extend(line[cursor : match.start()].split())
        phrase_words = match.group("text").split()
        phrases.append(
            EntityPhrase(
                phrase=" ".join(phrase_words),
                phrase_id=match.group("id"),
                phrase_types=tuple(t for t in match.group("types").split("/") if t),
                first_word_index=len(words),
            )
        )
        words.extend(phrase_words)
        cursor = match.end()
    words.extend(line[cursor:].split())
    return " ".join(words), phrases


def read_sentences(path: str | Path) -> list[tuple[str, list[EntityPhrase]]]:
    """All sentences of a ``Sentences/{image}.txt`` file, in order (sentence_id = index)."""
    with open(path, encoding="utf-8") as f:
        return [parse_sentence(line) for line in f.read().split("\n") if line.strip()]


def read_entity_boxes(path: str | Path) -> dict[str, list[tuple[float, float, float, float]]]:
    """Boxes per entity id from an ``Annotations/{image}.xml`` file: ``{phrase_id: [[xmin, ymin, xmax, ymax]]}``.

    Objects without a ``bndbox`` (scene / no-box entities) are left out; an object naming several entities
    counts for each of them.
    """
    root = ET.parse(path).getroot()
    boxes: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
    for obj in root.findall("object"):
        bndbox = obj.find("bndbox")
        if bndbox is None:
            continue
        try:
            box = tuple(float(bndbox.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: an object has a malformed bndbox ({exc})") from exc
        for name in obj.findall("name"):
            if name.text:
                boxes[name.text.strip()].append(box)  # type: ignore[arg-type]
    return dict(boxes)


class FlickrEntities:
    """Lazy, cached access to a Flickr30k Entities folder holding ``Sentences/`` and ``Annotations/``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        for sub in ("Sentences", "Annotations"):
            if not (self.root / sub).is_dir():
                raise FileNotFoundError(f"Flickr30k Entities path {self.root} has no {sub}/ folder")
        self._sentences: dict[str, list[tuple[str, list[EntityPhrase]]]] = {}
        self._boxes: dict[str, dict[str, list[tuple[float, float, float, float]]]] = {}

    def sentences(self, image_id: str) -> list[tuple[str, list[EntityPhrase]]]:
        if image_id not in self._sentences:
            self._sentences[image_id] = read_sentences(self.root / "Sentences" / f"{image_id}.txt")
        return self._sentences[image_id]

    def boxes(self, image_id: str) -> dict[str, list[tuple[float, float, float, float]]]:
        if image_id not in self._boxes:
            path = self.root / "Annotations" / f"{image_id}.xml"
            self._boxes[image_id] = read_entity_boxes(path) if path.is_file() else {}
        return self._boxes[image_id]

    def find_phrase(self, image_id: str, sentence_id: int, phrase: str,
                    occurrence: int = 0) -> EntityPhrase | None:
        """The ``occurrence``-th annotated phrase of that sentence with this text (normalised), or None."""
        sentences = self.sentences(image_id)
        if not 0 <= sentence_id < len(sentences):
            raise ValueError(
                f"sentence_id {sentence_id} is outside the {len(sentences)} sentences of Flickr image {image_id}"
            )
        candidates = sentences[sentence_id][1]
        wanted = normalize_phrase(phrase)
        same = [entity for entity in candidates if normalize_phrase(entity.phrase) == wanted]
        return same[occurrence] if len(same) > occurrence else None


# ----------------------------------------------------------------------------------------------------------
# MDETR ground truth


@dataclass
class FlickrPhrase:
    text: str
    spans: list[tuple[int, int]]
    boxes: list[tuple[float, float, float, float]]  # un-merged ground truth from the MDETR JSON, xyxy


@dataclass
class FlickrSentence:
    image_id: str  # original_img_id
    sentence_id: int
    caption: str
    width: int
    height: int
    phrases: list[FlickrPhrase] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, int]:
        return (self.image_id, self.sentence_id)


def _overlaps(spans_a: list[tuple[int, int]], spans_b: list[tuple[int, int]]) -> bool:
    return any(a0 < b1 and b0 < a1 for a0, a1 in spans_a for b0, b1 in spans_b)


def load_flickr_sentences(annotations: dict[str, Any]) -> list[FlickrSentence]:
    """The captions of an MDETR Flickr JSON (already loaded) with their phrases and ground-truth boxes."""
    by_image: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for ann in annotations.get("annotations", []):
        by_image[str(ann["image_id"])].append(ann)
    sentences = []
    for image in annotations["images"]:
        for field_name in ("caption", "tokens_positive_eval", "original_img_id", "sentence_id", "width", "height"):
            if field_name not in image:
                raise ValueError(f"Flickr image entry id={image.get('id')} has no '{field_name}'")
        caption = image["caption"]
        sentence = FlickrSentence(
            image_id=str(image["original_img_id"]),
            sentence_id=int(image["sentence_id"]),
            caption=caption,
            width=int(image["width"]),
            height=int(image["height"]),
        )
        anns = by_image.get(str(image.get("id")), [])
        for spans in image["tokens_positive_eval"]:
            spans = [(int(s), int(e)) for s, e in spans]
            if not spans:
                raise ValueError(f"Flickr image entry id={image.get('id')} has a phrase without character spans")
            text = " ".join(caption[s:e] for s, e in spans)
            boxes = [
                xywh_to_xyxy(ann["bbox"])
                for ann in anns
                if _overlaps(spans, [(int(s), int(e)) for s, e in ann.get("tokens_positive", [])])
            ]
            sentence.phrases.append(FlickrPhrase(text=text, spans=spans, boxes=boxes))
        sentences.append(sentence)
    return sentences


# ----------------------------------------------------------------------------------------------------------
# Scoring


def _contains_words(outer: str, inner: str) -> bool:
    return bool(inner) and f" {inner} " in f" {outer} "


def match_phrase_boxes(phrase: str, found: list[AnswerBox], strict: bool = False,
                       occurrence: int = 0) -> tuple[list[tuple], str]:
    """The boxes of an answer that ground ``phrase``, and how they matched: "exact", "fallback" or "none".

    ``occurrence`` is which occurrence of this phrase text in the caption is meant (0 = the first): the
    answer's mentions of the phrase are taken in order, and the k-th occurrence gets the boxes of the k-th
    mention only (nothing when the answer mentions it fewer times). See the module docstring for the rules.
    """
    wanted = normalize_phrase(phrase)
    exact = {id(b) for b in found if normalize_phrase(b.phrase) == wanted}
    candidates = [b for b in found if id(b) in exact]
    if not strict:
        candidates = [b for b in found if id(b) in exact or _contains_words(normalize_phrase(b.phrase), wanted)
                      or _contains_words(wanted, normalize_phrase(b.phrase))]
    mentions = sorted({b.mention for b in candidates})
    if occurrence >= len(mentions):
        return [], "none"
    chosen = [b for b in candidates if b.mention == mentions[occurrence]]
    return [b.box for b in chosen], ("exact" if any(id(b) in exact for b in chosen) else "fallback")


def score_flickr(
    annotations: dict[str, Any],
    predictions: list[dict[str, Any]],
    entities: FlickrEntities | None = None,
    strict: bool = False,
    ks: tuple[int, ...] = DEFAULT_KS,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Recall@k (and the upper bound) per phrase type ("all" always; the types only with ``entities``)."""
    sentences = load_flickr_sentences(annotations)
    stream = PredictionStream.of(predictions)
    alignment = StreamAlignment(sentences, lambda s: s.key, "Flickr sentence")
    hits: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    matching = {"exact": 0, "fallback": 0, "none": 0}
    without_box = 0
    without_type = 0
    for sentence, prediction in alignment.pairs(stream, lambda p: (str(p["image_id"]), int(p["sentence_id"]))):
        where = f"Flickr image {sentence.image_id} sentence {sentence.sentence_id}"
        found = stream.boxes(prediction, sentence.width, sentence.height, where)
        if found is None:
            continue
        seen: dict[str, int] = defaultdict(int)
        for phrase in sentence.phrases:
            occurrence = seen[normalize_phrase(phrase.text)]
            seen[normalize_phrase(phrase.text)] += 1
            categories = ["all"]
            gt_boxes = phrase.boxes
            if entities is not None:
                entity = entities.find_phrase(sentence.image_id, sentence.sentence_id, phrase.text, occurrence)
                if entity is None:
                    without_type += 1
                else:
                    categories.extend(entity.phrase_types)
                    gt_boxes = entities.boxes(sentence.image_id).get(entity.phrase_id) or gt_boxes
            if not gt_boxes:
                without_box += 1
                continue
            target = merge_boxes(gt_boxes)
            boxes, how = match_phrase_boxes(phrase.text, found, strict, occurrence)
            matching[how] += 1
            ious = box_iou_matrix(boxes or [ZERO_BOX], [target])[:, 0]
            for category in categories:
                bucket = hits[category]
                bucket["n"] += 1
                for k in ks:
                    bucket[f"recall@{k}"] += hit_at_k(ious, k, threshold)
                bucket["upper_bound"] += hit_at_k(ious, None, threshold)
    if without_box:
        logger.warning("%d phrases have no ground-truth box and were skipped", without_box)
    if without_type:
        logger.warning("%d phrases were not found in the Flickr30k Entities sentences (counted in 'all' only)",
                       without_type)

    results = {}
    for category in sorted(hits, key=lambda c: (c != "all", c)):
        bucket = hits[category]
        n = bucket["n"]
        row: dict[str, Any] = {"n": n}
        for k in ks:
            row[f"recall@{k}"] = bucket[f"recall@{k}"] / n
        row["upper_bound"] = bucket["upper_bound"] / n
        results[category] = row
    return {
        "benchmark": "flickr30k_entities",
        "results": results,
        "phrase_matching": matching,
        "phrases_without_box": without_box,
        "phrases_without_type": without_type,
        "alignment": alignment.report(),
        "predictions_read": stream.report(),
        "threshold": threshold,
        "ground_truth": "merged boxes" + (" (Flickr30k Entities XML)" if entities is not None else " (MDETR JSON)"),
        "strict_matching": strict,
    }


# ----------------------------------------------------------------------------------------------------------
# Inference


def flickr_queries(annotations: dict[str, Any], image_folder: str | Path) -> list[Query]:
    """One query per caption of an MDETR Flickr JSON, in image-entry id order (see the module docstring)."""
    if "images" not in annotations:
        raise ValueError("Flickr annotation JSON has no 'images' list")
    try:
        entries = sorted(annotations["images"], key=lambda entry: entry["id"])
    except TypeError:
        entries = sorted(annotations["images"], key=lambda entry: str(entry["id"]))
    queries = []
    for entry in entries:
        for field_name in ("id", "file_name", "caption", "tokens_positive_eval", "original_img_id", "sentence_id"):
            if field_name not in entry:
                raise ValueError(f"Flickr image entry id={entry.get('id')} has no '{field_name}'")
        caption = entry["caption"]
        phrases = []
        for k, spans in enumerate(entry["tokens_positive_eval"]):
            if not spans:
                raise ValueError(f"Flickr image entry id={entry['id']}: phrase {k} has no character span")
            start, end = int(spans[0][0]), int(spans[0][1])
            phrases.append(caption[start:end].lower().replace(",", "").strip())
        queries.append(Query(
            image=Path(image_folder) / entry["file_name"],
            prompt=QUESTION.format(phrases=", ".join(phrases)),
            output={"image_id": entry["original_img_id"], "sentence_id": entry["sentence_id"],
                    "file_name": entry["file_name"], "prompt": None, "text": None, "width": None, "height": None},
            where=f"Flickr image entry id={entry['id']} ({entry['file_name']})",
        ))
    return queries


def _print_results(metrics: dict[str, Any]) -> None:
    results = metrics["results"]
    if not results:
        print("no phrase evaluated")
        return
    columns = [c for c in next(iter(results.values())) if c != "n"]
    rows = [[c, results[c]["n"]] + [100 * results[c][k] for k in columns] for c in results]
    print(format_table(["phrase type", "n"] + [f"{c} (%)" for c in columns], rows))
    print(f"phrase matching: {metrics['phrase_matching']}; alignment: {metrics['alignment']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=program_name("ferret.eval.flickr"), description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    infer = sub.add_parser("infer", help="ground the phrases of every caption with a model")
    infer.add_argument("--annotation-file", "--data_path", dest="annotation_file", required=True,
                       help="MDETR final_flickr_{merged,separate}GT_{val,test}.json")
    add_inference_arguments(infer)
    score = sub.add_parser("score", help="compute Recall@k from a prediction file or folder")
    score.add_argument("--predictions", required=True, help="a .jsonl file or a folder of {k}_of_{n}.jsonl chunks")
    score.add_argument("--annotation-file", required=True, help="MDETR final_flickr_mergedGT_{val,test}.json")
    score.add_argument("--flickr-entities-path", default=None,
                       help="Flickr30k Entities folder with Sentences/ and Annotations/ (per-phrase-type numbers)")
    score.add_argument("--strict", action="store_true", help="exact phrase matching only (the original's rule)")
    score.add_argument("--iou-threshold", type=float, default=0.5)
    score.add_argument("--output", default=None, help="metrics JSON (default: <predictions>.metrics.json beside it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    with open(args.annotation_file, encoding="utf-8") as f:
        annotations = json.load(f)
    if args.command == "infer":
        infer_from_args(args, flickr_queries(annotations, args.image_folder), KEY_FIELDS)
        return 0
    entities = FlickrEntities(args.flickr_entities_path) if args.flickr_entities_path else None
    metrics = score_flickr(annotations, PredictionStream(args.predictions), entities, args.strict,
                           threshold=args.iou_threshold)
    metrics["predictions"] = str(args.predictions)
    metrics["annotation_file"] = str(args.annotation_file)
    out = write_json(metrics, args.output or metrics_path(args.predictions))
    _print_results(metrics)
    print(f"metrics written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
