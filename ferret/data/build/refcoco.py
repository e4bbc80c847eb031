"""RefCOCO / RefCOCO+ / RefCOCOg -> refexp records, from either official form:

* the ``refs(unc|google|umd).p`` pickles with the ``instances.json`` beside them (boxes, segmentation, image
  sizes). Only refs of the ``train`` split are used; the others name evaluation images (see leaks.py), and so do
  the val/test refs of every other pickle given, which keeps e.g. RefCOCOg-umd val images out of a
  RefCOCOg-google train set;
* MDETR's COCO-style files (``final_refexp_*.json``, ``finetune_refcoco*_train.json``): one image entry per
  expression (``caption``), its annotation(s) the referred object.

Every expression (a ref may have several sentences) becomes one question, either grounding ("What is the location
of <expression> in the image?" -> box) or referring ("Describe the object <region> ..." -> expression); the
questions of one image are packed together.
"""

from __future__ import annotations

import os
from collections import defaultdict

from ferret.data.build import coco
from ferret.data.build.common import QA, BuildError, ImageRef, Target, box_from_xywh
from ferret.data.build.context import BuildContext
from ferret.data.build.leaks import image_number, is_eval_file, load_refs, refs_name
from ferret.data.build.streaming import Buckets, bucket_count
from ferret.data.build.templates import TEMPLATES, boxes_text, fill


def clean_expression(text: str) -> str:
    return " ".join(str(text).replace(",", " ").split()).strip(" .")


def expression_qas(expressions: list[tuple[str, Target]], draws) -> list[QA]:
    t = TEMPLATES["refexp"]
    qas = []
    for expression, target in expressions:
        if draws.direction() == "ground":
            qas.append(QA(fill(draws.pick(t["ground_q"]), expression=expression),
                          fill(draws.pick(t["ground_a"]), expression=expression, boxes=boxes_text(1)), [], [target]))
        else:
            qas.append(QA(fill(draws.pick(t["refer_q"])), fill(draws.pick(t["refer_a"]), expression=expression),
                          [target]))
    return draws.shuffle(qas)


def build_refs(ctx: BuildContext, refs_path: str, instances_path: str | None, image_folder: str,
               refs: list[dict] | None = None) -> None:
    if "refexp" not in ctx.tasks:
        return
    name = refs_name(refs_path)
    instances_path = instances_path or os.path.join(os.path.dirname(refs_path), "instances.json")
    if not os.path.isfile(instances_path):
        raise BuildError(f"{refs_path}: the instances.json with its boxes was not found at {instances_path}")
    refs = refs if refs is not None else load_refs(refs_path)
    source = ctx.report.source(name)
    with ctx.timed(source):
        by_image: dict[int, list[dict]] = defaultdict(list)
        for ref in refs:
            if not isinstance(ref, dict) or not isinstance(ref.get("image_id"), int) \
                    or not isinstance(ref.get("ann_id"), int):
                source.dropped["malformed_ref"] += 1
                continue
            if str(ref.get("split", "train")) != "train":
                continue
            by_image[ref["image_id"]].append(ref)
        wanted_anns = {int(r["ann_id"]) for refs_ in by_image.values() for r in refs_}
        for image, anns in coco.grouped(ctx, instances_path, f"refs_{len(ctx.report.sources)}", source,
                                        keep_image=lambda im: int(im["id"]) in by_image,
                                        keep_annotation=lambda a: int(a["id"]) in wanted_anns):
            if ctx.done(source):
                break
            ref_image = coco.image_ref(image)
            if ref_image is None:
                source.dropped["image_without_path_or_size"] += 1
                continue
            if not ctx.accept_image(source, image_folder, ref_image, coco_id=image["id"]):
                continue
            ann_by_id = {int(a["id"]): a for a in anns}
            expressions = []
            for ref in by_image[int(image["id"])]:
                ann = ann_by_id.get(int(ref["ann_id"]))
                box = box_from_xywh(*ann["bbox"][:4], ref_image.width, ref_image.height) \
                    if ann and isinstance(ann.get("bbox"), list) and len(ann["bbox"]) >= 4 else None
                if box is None:
                    source.dropped["ref_without_usable_box"] += 1
                    continue
                target = Target(box, ann.get("segmentation") or None)
                sentences = [clean_expression(s.get("sent") or s.get("raw") or "")
                             for s in ref.get("sentences") or [] if isinstance(s, dict)]
                for sentence in dict.fromkeys(s for s in sentences if s):
                    expressions.append((sentence, target))
            if expressions:
                _emit_expressions(ctx, source, image_folder, ref_image, f"{name}/{image['id']}", expressions)


def _emit_expressions(ctx: BuildContext, source, image_folder: str, ref_image, key: str, expressions: list) -> None:
    """One record of referring-expression questions about one image (``key`` seeds its draws)."""
    source.images_used += 1
    source.units += len(expressions)
    draws = ctx.draws("refexp", key)
    ctx.emit("refexp", source, image_folder, ref_image, key, expression_qas(expressions, draws), draws)


def build_mdetr(ctx: BuildContext, path: str, image_folder: str) -> None:
    """An MDETR refexp training file; all expressions of one COCO image end up in the same records."""
    if "refexp" not in ctx.tasks:
        return
    if is_eval_file(path):
        raise BuildError(f"{path}: this is an evaluation split; pass it with --exclude-eval, not as training data")
    name = os.path.splitext(os.path.basename(path))[0]
    source = ctx.report.source(name)
    with ctx.timed(source):
        by_picture = Buckets(os.path.join(ctx.tmp_dir, f"mdetr_{name}"), bucket_count(os.path.getsize(path)))
        try:
            for entry, anns in coco.grouped(ctx, path, f"mdetr_{name}", source):
                ref_image = coco.image_ref(entry)
                coco_id = entry.get("original_img_id")
                coco_id = int(coco_id) if coco_id is not None else image_number(entry.get("file_name", ""))
                expression = clean_expression(entry.get("caption") or "")
                if ref_image is None or coco_id is None or not expression or not anns:
                    source.dropped["entry_without_image_caption_or_box"] += 1
                    continue
                boxes = [(box_from_xywh(*a["bbox"][:4], ref_image.width, ref_image.height), a.get("segmentation"))
                         for a in anns if isinstance(a.get("bbox"), list) and len(a["bbox"]) >= 4]
                boxes = [(b, s) for b, s in boxes if b is not None]
                if not boxes:
                    source.dropped["entry_without_usable_box"] += 1
                    continue
                by_picture.add(coco_id, "expression", {"image": [ref_image.path, ref_image.width, ref_image.height],
                                                        "expression": expression, "boxes": boxes})
            for coco_id, group in by_picture.groups():
                if ctx.done(source):
                    break
                items = group["expression"]
                ref_image = ImageRef(*items[0]["image"])
                if not ctx.accept_image(source, image_folder, ref_image, coco_id=coco_id):
                    continue
                expressions = []
                for item in items:
                    if len(item["boxes"]) == 1:
                        box, segmentation = item["boxes"][0]
                        expressions.append((item["expression"], Target(tuple(box), segmentation or None)))
                    else:
                        source.dropped["expression_with_several_boxes"] += 1
                if expressions:
                    _emit_expressions(ctx, source, image_folder, ref_image, f"{name}/{coco_id}", expressions)
        finally:
            by_picture.close()
