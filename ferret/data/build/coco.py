"""COCO-style detection files: COCO instances (2014/2017), LVIS (v0.5/v1) and Objects365 -> object records
(refer to every object, ground every category, ask about absent ones).

A COCO-style file lists ``images``, then ``annotations`` in no particular order, then ``categories``. Each list
is read streaming (one ijson pass per key); images and annotations are spread over temporary buckets by image id
(``streaming.Buckets``) and each bucket is grouped alone, so memory holds one bucket whatever the file size.
Crowd annotations (``iscrowd`` 1: a group, not one object) are left out and counted; empty segmentations just
mean that no free-form shape is available for that object.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from ferret.data.build.common import BuildError, ImageRef, Target, box_from_xywh
from ferret.data.build.context import BuildContext
from ferret.data.build.leaks import is_eval_file
from ferret.data.build.negatives import AbsentNames
from ferret.data.build.streaming import Buckets, bucket_count, iter_items
from ferret.data.build.tasks import NamedObject, clean_name, dedupe, object_qas

IMAGE_FIELDS = ("id", "file_name", "coco_url", "width", "height", "neg_category_ids", "original_img_id",
                "caption", "dataset_name")
ANNOTATION_FIELDS = ("id", "image_id", "bbox", "category_id", "segmentation", "iscrowd")


def categories(path: str, show: bool) -> dict[int, dict]:
    out = {}
    for c in iter_items(path, "categories.item", f"{os.path.basename(path)} categories", show):
        if not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise BuildError(f"{path}: a category lacks an integer id or a name: {str(c)[:80]}")
        out[c["id"]] = c
    return out


def grouped(ctx: BuildContext, path: str, name: str, source=None, keep_image=None, keep_annotation=None
            ) -> Iterator[tuple[dict, list[dict]]]:
    """(image, its annotations) for every image of a COCO-style file, bucket by bucket.

    ``keep_image(image)`` / ``keep_annotation(annotation)`` filter while bucketing. Crowd annotations are counted
    in ``source.dropped['crowd_annotation']`` and left out.
    """
    if not os.path.isfile(path):
        raise BuildError(f"{path}: file not found")
    buckets = Buckets(os.path.join(ctx.tmp_dir, f"buckets_{name}"), bucket_count(os.path.getsize(path)))
    try:
        for image in iter_items(path, "images.item", f"{name} images", ctx.show_progress):
            if not isinstance(image.get("id"), int):
                raise BuildError(f"{path}: an image entry has no integer id: {str(image)[:80]}")
            if keep_image is None or keep_image(image):
                buckets.add(image["id"], "image", {k: image[k] for k in IMAGE_FIELDS if k in image})
        for ann in iter_items(path, "annotations.item", f"{name} annotations", ctx.show_progress):
            if not isinstance(ann.get("image_id"), int) or "bbox" not in ann:
                raise BuildError(f"{path}: annotation {ann.get('id')} lacks an integer image_id or a bbox")
            if ann.get("iscrowd"):
                if source is not None:
                    source.dropped["crowd_annotation"] += 1
                continue
            if keep_annotation is None or keep_annotation(ann):
                buckets.add(ann["image_id"], "ann", {k: ann[k] for k in ANNOTATION_FIELDS if k in ann})
        for _, group in buckets.groups():
            images = group.get("image")
            if not images:
                if source is not None:
                    source.dropped["annotation_of_unknown_image"] += len(group.get("ann", []))
                continue
            yield images[0], group.get("ann", [])
    finally:
        buckets.close()


def image_ref(image: dict) -> ImageRef | None:
    """The image's path (``file_name``, or the last two parts of LVIS's ``coco_url``) and size."""
    path = image.get("file_name")
    if not path and image.get("coco_url"):
        path = "/".join(image["coco_url"].rstrip("/").split("/")[-2:])
    width, height = image.get("width"), image.get("height")
    if not path or not isinstance(width, int) or not isinstance(height, int) or width <= 0 or height <= 0:
        return None
    return ImageRef(path, width, height)


def category_names(cats: dict[int, dict]) -> dict[int, tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """category id -> (name, synonyms, synsets); LVIS names like ``bow_(weapon)`` read ``bow (weapon)``."""
    out = {}
    for cid, c in cats.items():
        name = clean_name(c.get("name", ""))
        raw = c.get("synonyms") if isinstance(c.get("synonyms"), list) else []
        synonyms = tuple(s for s in (clean_name(x) for x in raw) if s and s != name)
        synsets = (c["synset"],) if c.get("synset") else ()
        out[cid] = (name, synonyms, synsets)
    return out


KINDS = {"coco": "coco_objects", "lvis": "lvis_objects", "objects365": "objects365"}


def build(ctx: BuildContext, flavour: str, path: str, image_folder: str) -> None:
    """COCO instances (``flavour`` "coco"), LVIS ("lvis") or Objects365 ("objects365")."""
    kind = KINDS[flavour]
    if kind not in ctx.tasks:
        return
    if flavour in ("coco", "lvis") and is_eval_file(path) and not ctx.keep_eval_images:
        raise BuildError(f"{path}: its name marks an evaluation split, whose images the benchmarks score (LVIS "
                         "referring uses LVIS val, POPE COCO val2014, Ferret-Bench COCO val2017); pass it with "
                         "--exclude-eval, or build from it anyway with --keep-eval-images")
    stem = os.path.splitext(os.path.basename(path))[0]
    label = stem if flavour in stem.lower() else f"{flavour}_{stem}"
    source = ctx.report.source(f"{flavour}:{os.path.basename(path)}", label=label)
    options = ctx.options
    with ctx.timed(source):
        cats = category_names(categories(path, ctx.show_progress))
        if not cats:
            raise BuildError(f"{path}: no categories")
        everything = AbsentNames([n for n, _, _ in cats.values()], {n: set(s) for n, _, s in cats.values()})
        uses_coco_ids = flavour in ("coco", "lvis")
        for image, anns in grouped(ctx, path, flavour, source):
            if ctx.done(source):
                break
            ref = image_ref(image)
            if ref is None:
                source.dropped["image_without_path_or_size"] += 1
                continue
            if not ctx.accept_image(source, image_folder, ref, coco_id=image["id"] if uses_coco_ids else None):
                continue
            objects = []
            for ann in anns:
                category = ann.get("category_id")
                name, synonyms, synsets = cats.get(category, (None, (), ())) if isinstance(category, int) \
                    else (None, (), ())
                box = box_from_xywh(*ann["bbox"][:4], ref.width, ref.height) \
                    if isinstance(ann.get("bbox"), list) and len(ann["bbox"]) >= 4 else None
                if name is None or box is None:
                    source.dropped["annotation_without_category_or_box"] += 1
                    continue
                objects.append(NamedObject(name, Target(box, ann.get("segmentation") or None), synonyms, synsets))
            objects = dedupe(objects)
            if not objects:
                source.dropped["image_without_objects"] += 1
                continue
            source.images_used += 1
            source.units += len(objects)
            if flavour == "lvis":  # labels are not exhaustive: only verified-absent categories are asked about
                negatives = [cats[c][0] for c in image.get("neg_category_ids") or [] if c in cats]
                absent = AbsentNames(negatives) if negatives else None
                if absent is None:
                    source.counts["no_verified_negatives"] += 1
            else:
                absent = everything
            draws = ctx.draws(kind, image["id"])
            ctx.emit(kind, source, image_folder, ref, image["id"],
                     object_qas(objects, draws, source.counts, absent, options.negative_share, options.max_instances),
                     draws)
