"""Flickr30k Entities -> flickr records: grounded captions, phrase grounding, and captions with a swapped entity.

Reads ``Annotations/<id>.xml`` (image size; one ``<object>`` per box with the entity ids it belongs to in
``<name>``, or ``<nobndbox>``/``<scene>`` for entities without a box) and ``Sentences/<id>.txt`` (five captions,
phrases marked ``[/EN#<entity>/<type> words]``). Boxes are 1-based inclusive pixels in the XML and are written
0-based. Phrases whose entity has no box (scene, "notvisual", nobndbox) stay in the captions as plain text and are
counted. ``val.txt`` / ``test.txt`` in the same folder list evaluation images; they are left out.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections import Counter

from ferret.data.build.common import QA, BuildError, ImageRef, Target, box_from_corners, negatives_for
from ferret.data.build.context import BuildContext
from ferret.data.build.negatives import swap_phrase
from ferret.data.build.streaming import progress
from ferret.data.build.templates import TEMPLATES, boxes_text, fill

SOURCE = "flickr30k"
PHRASE = re.compile(r"\[/EN#(\d+)((?:/[^\s\]]+)*)\s+([^\]]*)\]")
SWAP_VOCABULARY = 200  # most frequent phrases per entity type are the swap candidates


def parse_sentence(line: str) -> tuple[str, list[tuple[int, int, str, str, str]]]:
    """A Sentences line -> (plain caption, [(start, end, entity id, first type, phrase)])."""
    plain, phrases, cursor = [], [], 0
    length = 0
    for match in PHRASE.finditer(line):
        before = line[cursor:match.start()]
        plain.append(before)
        length += len(before)
        words = " ".join(match.group(3).split())
        types = [t for t in match.group(2).split("/") if t]
        phrases.append((length, length + len(words), match.group(1), types[0] if types else "other", words))
        plain.append(words)
        length += len(words)
        cursor = match.end()
    plain.append(line[cursor:])
    return "".join(plain).strip(), phrases


def parse_annotation(path: str) -> tuple[int, int, dict[str, list[tuple]]]:
    """An Annotations xml -> (width, height, entity id -> boxes (x1, y1, x2, y2) 1-based inclusive)."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:
        raise BuildError(f"{path}: not a readable Flickr30k Entities annotation ({err})") from err
    try:
        width = int(root.findtext("size/width"))
        height = int(root.findtext("size/height"))
    except (TypeError, ValueError) as err:
        raise BuildError(f"{path}: <size><width>/<height> missing or not integers") from err
    boxes: dict[str, list[tuple]] = {}
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        if box is None:
            continue
        try:
            corners = tuple(int(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError) as err:
            raise BuildError(f"{path}: a <bndbox> lacks integer xmin/ymin/xmax/ymax") from err
        for name in obj.findall("name"):
            boxes.setdefault(name.text.strip(), []).append(corners)
    return width, height, boxes


def read_list(path: str) -> list[str]:
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def image_ids(flickr_dir: str) -> list[str]:
    folder = os.path.join(flickr_dir, "Annotations")
    if not os.path.isdir(folder):
        raise BuildError(f"{flickr_dir}: no Annotations/ folder (Flickr30k Entities layout: Annotations/*.xml, "
                         "Sentences/*.txt)")
    return sorted((f[:-4] for f in os.listdir(folder) if f.endswith(".xml")), key=lambda s: (len(s), s))


def swap_vocabulary(flickr_dir: str, ids: list[str]) -> dict[str, list[str]]:
    counts: dict[str, Counter] = {}
    for image_id in ids:
        path = os.path.join(flickr_dir, "Sentences", f"{image_id}.txt")
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                for _, _, entity, kind, words in parse_sentence(line)[1]:
                    if entity != "0" and kind != "notvisual":
                        counts.setdefault(kind, Counter())[words.lower()] += 1
    return {kind: [p for p, _ in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:SWAP_VOCABULARY]]
            for kind, c in counts.items()}


def build(ctx: BuildContext, flickr_dir: str, image_folder: str) -> None:
    if "flickr" not in ctx.tasks:
        return
    source = ctx.report.source(SOURCE)
    options = ctx.options
    with ctx.timed(source):
        ids = image_ids(flickr_dir)
        eval_ids = {i for i in ids if not ctx.keep_eval_images and ctx.eval_reason(flickr_id=int(i))} \
            if all(i.isdigit() for i in ids) else set()
        vocab = swap_vocabulary(flickr_dir, [i for i in ids if i not in eval_ids]) if options.negative_share else {}
        with progress(len(ids), "Flickr30k Entities", ctx.show_progress, unit="img") as bar:
            for image_id in ids:
                bar.update(1)
                if ctx.done(source):
                    break
                width, height, entity_boxes = parse_annotation(os.path.join(flickr_dir, "Annotations",
                                                                            f"{image_id}.xml"))
                ref = ImageRef(f"{image_id}.jpg", width, height)
                if not ctx.accept_image(source, image_folder, ref,
                                        flickr_id=int(image_id) if image_id.isdigit() else None):
                    continue
                sentences_path = os.path.join(flickr_dir, "Sentences", f"{image_id}.txt")
                if not os.path.isfile(sentences_path):
                    source.dropped["image_without_sentences"] += 1
                    continue
                with open(sentences_path, encoding="utf-8", errors="replace") as f:
                    sentences = [parse_sentence(line) for line in f if line.strip()]
                targets = {}
                for entity, corners in entity_boxes.items():
                    boxes = [box_from_corners(x1 - 1, y1 - 1, x2 - 1, y2 - 1, width, height)
                             for x1, y1, x2, y2 in corners]
                    boxes = [Target(b) for b in boxes if b is not None]
                    if boxes:
                        targets[entity] = boxes
                draws = ctx.draws("flickr", image_id)
                qas = draws.shuffle(image_qas(sentences, targets, vocab, draws, source, options))
                if qas:
                    source.images_used += 1
                    source.units += len(sentences)
                    ctx.emit("flickr", source, image_folder, ref, image_id, qas, draws)


def image_qas(sentences, targets, vocab, draws, source, options) -> list[QA]:
    t = TEMPLATES["flickr"]
    qas: list[QA] = []
    words_in_image = {w.lower() for caption, _ in sentences for w in re.findall(r"[\w'-]+", caption)}
    for caption, phrases in sentences:
        boxed = [(s, e, ent, kind, words) for s, e, ent, kind, words in phrases
                 if ent in targets and len(targets[ent]) <= options.max_instances]
        source.counts["phrases_without_box"] += sum(1 for p in phrases if p[2] not in targets)
        if not boxed:
            continue
        if draws.direction() == "refer":  # grounded caption
            pieces, cursor, regions = [], 0, []
            for start, end, entity, _, _ in boxed:
                pieces.append(caption[cursor:end])
                pieces.append(" " + boxes_text(len(targets[entity]), len(regions)))
                regions += targets[entity]
                cursor = end
            pieces.append(caption[cursor:])
            answer = re.sub(r"\s+([.,;:!?])", r"\1", "".join(pieces))
            qas.append(QA(fill(draws.pick(t["caption_q"])), answer, [], regions))
        else:  # phrase grounding, in the evaluation's wording
            names, answer, regions = [], [], []
            for _, _, entity, _, words in dict((p[2], p) for p in boxed).values():
                phrase = words.lower().replace(",", "")
                names.append(phrase)
                answer.append(f"{phrase} {boxes_text(len(targets[entity]), len(regions))}")
                regions += targets[entity]
            qas.append(QA(fill(draws.pick(t["phrases_q"]), phrases=", ".join(names)), "; ".join(answer), [], regions))
    for _ in range(negatives_for(len(qas), options.negative_share, draws)):
        caption, phrases = draws.rng.choice(sentences)
        candidates = [p for p in phrases if p[2] != "0" and p[3] != "notvisual"]
        if not candidates:
            continue
        start, end, entity, kind, words = draws.rng.choice(candidates)
        wrong = swap_phrase(kind, words_in_image, vocab, draws)
        if wrong is None:
            source.counts["no_swap_candidate"] += 1
            continue
        swapped = re.sub(r"\s+([.,;:!?])", r"\1", caption[:start] + wrong + caption[end:])
        boxes = targets.get(entity, [])
        if boxes and len(boxes) <= options.max_instances:
            answer = fill(draws.pick(t["swapped_a"]), wrong=wrong, right=words.lower(), boxes=boxes_text(len(boxes)))
        else:
            answer, boxes = fill(draws.pick(t["swapped_unboxed_a"]), wrong=wrong, right=words.lower()), []
        qas.append(QA(fill(draws.pick(t["swapped_q"]), caption=swapped), answer, [], boxes, negative=True))
    return qas
