"""Visual Genome: objects, attributes, relationships and region descriptions -> vg_object / vg_yesno_object /
vg_attribute / vg_relation / vg_region records.

Reads the official files from one folder: ``image_data.json`` (sizes, image paths from the url, and the
``coco_id`` / ``flickr_id`` that tie VG images to evaluation images), ``objects.json``, ``attributes.json``,
``relationships.json`` and ``region_descriptions.json``. Every file is a list with one entry per image, read
streaming; only image_data is held (a few numbers per image). Boxes are ``x, y, w, h`` pixels.
"""

from __future__ import annotations

import logging
import os
from collections import Counter

from ferret.data.build.common import QA, BuildError, ImageRef, Target, box_from_xywh
from ferret.data.build.context import BuildContext
from ferret.data.build.negatives import AbsentNames
from ferret.data.build.streaming import iter_items
from ferret.data.build.tasks import NamedObject, clean_name, dedupe, object_qas, yesno_qas
from ferret.data.build.templates import TEMPLATES, boxes_text, fill

logger = logging.getLogger(__name__)
FILES = {"image_data": "image_data.json", "objects": "objects.json", "attributes": "attributes.json",
         "relationships": "relationships.json", "regions": "region_descriptions.json"}
NEGATIVE_VOCABULARY = 2000  # the most frequent VG names are the candidates for absent-object questions


class VGImages:
    """image_data.json: image id -> (path relative to the VG image folder, width, height, coco_id, flickr_id)."""

    def __init__(self, path: str, show: bool):
        self.table: dict[int, tuple] = {}
        for entry in iter_items(path, "item", "VG image_data", show):
            image_id = entry.get("image_id", entry.get("id"))
            width, height = entry.get("width"), entry.get("height")
            if not isinstance(image_id, int) or not isinstance(width, int) or not isinstance(height, int) \
                    or width <= 0 or height <= 0:
                    raise BuildError(f"{path}: entry {str(entry)[:80]} lacks an integer image_id and positive "
                                 "integer width/height")
            url = entry.get("url") or ""
            parts = url.rstrip("/").split("/")
            rel = "/".join(parts[-2:]) if len(parts) >= 2 else f"{image_id}.jpg"
            self.table[int(image_id)] = (rel, width, height, entry.get("coco_id"), entry.get("flickr_id"))

    def get(self, image_id):
        return self.table.get(int(image_id)) if image_id is not None else None


def _names(obj: dict) -> list[str]:
    if not isinstance(obj, dict):
        return []
    names = obj.get("names")
    if names is None:
        names = [obj["name"]] if obj.get("name") else []
    if isinstance(names, str):
        names = [names]
    return [n for n in (clean_name(x) for x in names if isinstance(x, str)) if n]


def _object(obj: dict, width: int, height: int) -> NamedObject | None:
    names = _names(obj)
    if not names:
        return None
    synsets = obj.get("synsets") if isinstance(obj.get("synsets"), list) else []
    box = box_from_xywh(obj.get("x"), obj.get("y"), obj.get("w"), obj.get("h"), width, height)
    if box is None:
        return None
    return NamedObject(names[0], Target(box), tuple(names[1:]), tuple(str(s) for s in synsets))


def _entries(ctx: BuildContext, path: str, field: str, desc: str, images: VGImages, source, folder: str):
    """(image id, ImageRef, list under ``field``) for the usable images of one VG file."""
    for entry in iter_items(path, "item", desc, ctx.show_progress):
        if ctx.done(source):
            break
        image_id = entry.get("image_id", entry.get("id"))
        info = images.get(image_id) if isinstance(image_id, int) else None
        if info is None:
            source.dropped["image_not_in_image_data"] += 1
            continue
        rel, width, height, coco_id, flickr_id = info
        ref = ImageRef(rel, width, height)
        source.images_seen += 1
        reason = None if ctx.keep_eval_images else ctx.eval_images.vg_reason(coco_id, flickr_id)
        if reason:
            source.eval_leaks[reason] += 1
            continue
        if ctx.image_missing(folder, rel):
            source.dropped["image_file_missing"] += 1
            continue
        source.images_used += 1
        items = entry.get(field) or []
        if not isinstance(items, list):
            items = []
            source.dropped[f"{field}_not_a_list"] += 1
        malformed = sum(not isinstance(item, dict) for item in items)
        if malformed:
            source.dropped["malformed_item"] += malformed
            items = [item for item in items if isinstance(item, dict)]
        source.units += len(items)
        yield int(image_id), ref, items


def negative_vocabulary(path: str, show: bool) -> AbsentNames:
    counts: Counter = Counter()
    synsets: dict[str, set[str]] = {}
    for entry in iter_items(path, "item", "VG names (negatives)", show):
        for obj in entry.get("objects") or []:
            names = _names(obj)
            if names:
                counts[names[0]] += 1
                if isinstance(obj.get("synsets"), list):
                    synsets.setdefault(names[0], set()).update(str(x) for x in obj["synsets"])
    return AbsentNames.from_counts(counts, synsets, NEGATIVE_VOCABULARY)


def build(ctx: BuildContext, vg_dir: str, image_folder: str) -> None:
    """Every VG task kind the context asks for, from the files present in ``vg_dir``."""
    paths = {k: os.path.join(vg_dir, v) for k, v in FILES.items()}
    if not os.path.isfile(paths["image_data"]):
        raise BuildError(f"{paths['image_data']}: Visual Genome needs image_data.json (image sizes and the "
                         "COCO/Flickr ids that keep evaluation images out)")
    images = VGImages(paths["image_data"], ctx.show_progress)
    steps = [(("vg_objects", "vg_yesno_objects"), "objects", build_objects),
             (("vg_attributes",), "attributes", build_attributes),
             (("vg_relations",), "relationships", build_relations),
             (("vg_regions",), "regions", build_regions)]
    for kinds, file_key, step in steps:
        if any(k in ctx.tasks for k in kinds):
            if os.path.isfile(paths[file_key]):
                step(ctx, paths[file_key], images, image_folder)
            else:
                logger.warning("%s not found: no %s records", paths[file_key], " / ".join(kinds))


def build_objects(ctx: BuildContext, path: str, images: VGImages, image_folder: str) -> None:
    """objects.json -> vg_object (refer, ground, absent) and vg_yesno_object records."""
    options = ctx.options
    absent = negative_vocabulary(path, ctx.show_progress) \
        if options.negative_share > 0 or options.yesno_negative_share > 0 else None
    source = ctx.report.source("vg_objects", label="vg")
    with ctx.timed(source):
        for image_id, ref, items in _entries(ctx, path, "objects", "VG objects", images, source, image_folder):
            objects = []
            for obj in items:
                named = _object(obj, ref.width, ref.height)
                if named is None:
                    source.dropped["object_without_name_or_box"] += 1
                else:
                    objects.append(named)
            objects = dedupe(objects)
            if "vg_objects" in ctx.tasks:
                draws = ctx.draws("vg_objects", image_id)
                ctx.emit("vg_objects", source, image_folder, ref, image_id,
                         object_qas(objects, draws, source.counts, absent, options.negative_share,
                                    options.max_instances), draws)
            if "vg_yesno_objects" in ctx.tasks:
                draws = ctx.draws("vg_yesno_objects", image_id)
                ctx.emit("vg_yesno_objects", source, image_folder, ref, image_id,
                         yesno_qas(objects, draws, source.counts, absent, options.yesno_negative_share,
                                   options.max_instances), draws)


def build_attributes(ctx: BuildContext, path: str, images: VGImages, image_folder: str) -> None:
    """attributes.json -> vg_attribute records: the attributes of a region, and the region of "white dog"."""
    source = ctx.report.source("vg_attributes", label="vg")
    t = TEMPLATES["attribute"]
    with ctx.timed(source):
        for image_id, ref, items in _entries(ctx, path, "attributes", "VG attributes", images, source, image_folder):
            draws = ctx.draws("vg_attributes", image_id)
            qas, groups = [], {}
            for obj in items:
                named = _object(obj, ref.width, ref.height)
                raw = obj.get("attributes") if isinstance(obj.get("attributes"), list) else []
                attributes = list(dict.fromkeys(a for a in (clean_name(x) for x in raw) if a))[:3]
                if named is None or not attributes:
                    source.dropped["object_without_attributes_or_box"] += 1
                    continue
                text = " and ".join(attributes) if len(attributes) < 3 else \
                    f"{attributes[0]}, {attributes[1]} and {attributes[2]}"
                qas.append(QA(fill(draws.pick(t["refer_q"]), name=named.name),
                              fill(draws.pick(t["refer_a"]), name=named.name, attributes=text), [named.target]))
                groups.setdefault((text, named.name), []).append(named.target)
            for (text, name), targets in groups.items():
                if len(targets) <= ctx.options.max_instances:
                    qas.append(QA(fill(draws.pick(t["ground_q"]), name=name, attributes=text),
                                  fill(draws.pick(t["ground_a"]), name=name, attributes=text,
                                       boxes=boxes_text(len(targets))), [], targets))
            ctx.emit("vg_attributes", source, image_folder, ref, image_id, draws.shuffle(qas), draws)


def build_relations(ctx: BuildContext, path: str, images: VGImages, image_folder: str) -> None:
    """relationships.json -> vg_relation records: the relation between two regions, or the object of one."""
    source = ctx.report.source("vg_relations", label="vg")
    t = TEMPLATES["relation"]
    with ctx.timed(source):
        for image_id, ref, items in _entries(ctx, path, "relationships", "VG relationships", images, source,
                                             image_folder):
            draws = ctx.draws("vg_relations", image_id)
            qas = []
            for rel in items:
                subject = _object(rel.get("subject"), ref.width, ref.height)
                obj = _object(rel.get("object"), ref.width, ref.height)
                predicate = clean_name(rel.get("predicate") or "")
                if subject is None or obj is None or not predicate:
                    source.dropped["relationship_incomplete"] += 1
                    continue
                fields = {"subject": subject.name, "object": obj.name, "predicate": predicate}
                if draws.direction() == "refer":
                    qas.append(QA(fill(draws.pick(t["refer_q"])),
                                  fill(draws.pick(t["refer_a"]), boxes0="<bbox_location0>",
                                       boxes1="<bbox_location1>", **fields),
                                  [subject.target, obj.target], [subject.target, obj.target]))
                else:
                    qas.append(QA(fill(draws.pick(t["ground_q"]), **fields),
                                  fill(draws.pick(t["ground_a"]), boxes=boxes_text(1), **fields),
                                  [subject.target], [obj.target]))
            ctx.emit("vg_relations", source, image_folder, ref, image_id, draws.shuffle(qas), draws)


def build_regions(ctx: BuildContext, path: str, images: VGImages, image_folder: str) -> None:
    """region_descriptions.json -> vg_region records: describe a region, or find the described one."""
    source = ctx.report.source("vg_regions", label="vg")
    t = TEMPLATES["region"]
    with ctx.timed(source):
        for image_id, ref, items in _entries(ctx, path, "regions", "VG regions", images, source, image_folder):
            draws = ctx.draws("vg_regions", image_id)
            qas = []
            for region in items:
                phrase = " ".join(str(region.get("phrase") or "").split()).rstrip(".")
                box = box_from_xywh(region.get("x"), region.get("y"), region.get("width"), region.get("height"),
                                    ref.width, ref.height)
                if not phrase or box is None:
                    source.dropped["region_without_phrase_or_box"] += 1
                    continue
                target = Target(box)
                if draws.direction() == "refer":
                    qas.append(QA(fill(draws.pick(t["refer_q"])), fill(draws.pick(t["refer_a"]), phrase=phrase),
                                  [target]))
                else:
                    qas.append(QA(fill(draws.pick(t["ground_q"]), phrase=phrase),
                                  fill(draws.pick(t["ground_a"]), phrase=phrase, boxes=boxes_text(1)),
                                  [], [target]))
            ctx.emit("vg_regions", source, image_folder, ref, image_id, draws.shuffle(qas), draws)
