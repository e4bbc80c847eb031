"""Which images belong to evaluation splits, so that no training record is built from them.

Images are known by their COCO id (RefCOCO/+/g, POPE, LVIS and Ferret-Bench all use COCO images; 2014 and 2017
share ids), their Flickr30k id, or their Visual Genome id, which ``image_data.json`` maps to the other two
(``coco_id``, ``flickr_id``). The ids come from the annotation files the user has:

* RefCOCO/+/g ``refs(*).p``: every ref whose ``split`` is not ``train`` (val, testA, testB, test);
* MDETR ``final_refexp_*`` / ``finetune_refcoco*_*`` / ``final_flickr_*`` JSON files whose name says val or test,
  and COCO-style files of evaluation images (e.g. ``lvis_v1_val.json``, whose images the LVIS referring
  benchmark uses; ``instances_val2014.json``, POPE's);
* Flickr30k Entities ``val.txt`` / ``test.txt`` (one image id per line);
* JSON-lines question files (POPE ``image``, LVIS referring ``image_path``, Ferret-Bench ``image``): the id is
  the number in the image file name (``COCO_val2014_000000123456.jpg``, ``000000123456.jpg``).
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections import Counter

from ferret.data.build.common import BuildError
from ferret.data.build.streaming import iter_items

_IMAGE_NUMBER = re.compile(r"(\d+)\.(?:jpe?g|png)$", re.IGNORECASE)
EVAL_SPLIT_WORDS = ("val", "test")


def image_number(file_name: str) -> int | None:
    """The trailing number of an image file name (COCO and Flickr ids), or None."""
    match = _IMAGE_NUMBER.search(os.path.basename(str(file_name)))
    return int(match.group(1)) if match else None


def is_eval_file(path: str) -> bool:
    """Whether an annotation file's name marks an evaluation split (val / testA / testB / test)."""
    name = os.path.basename(path).lower()
    return any(re.search(rf"(^|[_.\-]){w}", name) for w in EVAL_SPLIT_WORDS)


def load_refs(path: str) -> list[dict]:
    """The refs of a ``refs(unc|google|umd).p`` pickle; BuildError when it is not a list of refs."""
    try:
        with open(path, "rb") as f:
            refs = pickle.load(f)
    except FileNotFoundError as err:
        raise BuildError(f"{path}: file not found") from err
    except Exception as err:  # a corrupt pickle raises assorted errors
        raise BuildError(f"{path}: not a readable refs pickle ({type(err).__name__}: {err})") from err
    if not isinstance(refs, list) or not all(isinstance(r, dict) and "image_id" in r for r in refs[:10]):
        raise BuildError(f"{path}: expected a list of refs (dicts with image_id, ann_id, split, sentences)")
    return refs


def refs_name(path: str) -> str:
    """``refcoco+/refs(unc).p`` -> ``refcoco+(unc)``."""
    folder = os.path.basename(os.path.dirname(os.path.abspath(path))) or "refs"
    match = re.search(r"refs\((\w+)\)", os.path.basename(path))
    return f"{folder}({match.group(1)})" if match else folder


class EvalImages:
    """Evaluation image ids with the reason each was listed."""

    def __init__(self) -> None:
        self.coco: dict[int, str] = {}
        self.flickr: dict[int, str] = {}
        self.files: list[str] = []

    def __bool__(self) -> bool:
        return bool(self.coco or self.flickr)

    def add_refs(self, path: str, refs: list[dict]) -> None:
        name = refs_name(path)
        for ref in refs:
            split = str(ref.get("split", "train")) if isinstance(ref, dict) else "train"
            if split != "train" and isinstance(ref.get("image_id"), int):
                self.coco.setdefault(ref["image_id"], f"{name} {split}")
        self.files.append(path)

    def add_file(self, path: str, show: bool = False) -> None:
        """Any supported evaluation annotation file (see the module docstring)."""
        lower = path.lower()
        if lower.endswith(".p") or lower.endswith(".pkl"):
            self.add_refs(path, load_refs(path))
            return
        if lower.endswith(".txt"):
            self.add_flickr_list(path)
            return
        if lower.endswith((".jsonl", ".ndjson")):
            self.add_jsonl(path)
            return
        if lower.endswith(".json"):
            self.add_mdetr(path, show)
            return
        raise BuildError(f"{path}: unknown evaluation file type (expected refs .p, MDETR .json, a Flickr split "
                         ".txt or a question .jsonl)")

    def add_flickr_list(self, path: str) -> None:
        reason = f"flickr30k {os.path.splitext(os.path.basename(path))[0]}"
        with open(path) as f:
            for number, line in enumerate(f, start=1):
                line = line.strip()
                if not line:
                    continue
                if not line.isdigit():
                    raise BuildError(f"{path} line {number}: expected a Flickr30k image id, got {line[:40]!r}")
                self.flickr.setdefault(int(line), reason)
        self.files.append(path)

    def add_jsonl(self, path: str) -> None:
        reason = os.path.basename(path)
        with open(path) as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as err:
                    raise BuildError(f"{path} line {number}: not valid JSON ({err})") from err
                name = entry.get("image") or entry.get("image_path") if isinstance(entry, dict) else None
                number_in_name = image_number(name) if name else None
                if number_in_name is None:
                    raise BuildError(f"{path} line {number}: no image file name with a COCO id "
                                     "(fields 'image' or 'image_path')")
                self.coco.setdefault(number_in_name, reason)
        self.files.append(path)

    def add_mdetr(self, path: str, show: bool = False) -> None:
        if not is_eval_file(path):
            raise BuildError(f"{path}: its name does not mark an evaluation split (val/test); pass training "
                             "files as sources instead")
        flickr = "flickr" in os.path.basename(path).lower()
        reason = os.path.basename(path)
        table = self.flickr if flickr else self.coco
        for image in iter_items(path, "images.item", show=show):
            key = image.get("original_img_id")
            if key is None:  # COCO / LVIS files: the number in file_name or coco_url (= the COCO id)
                key = image_number(image.get("file_name") or image.get("coco_url") or "")
            if key is None:
                raise BuildError(f"{path}: image entry {image.get('id')} has neither original_img_id nor a "
                                 "numbered file_name")
            table.setdefault(int(key), reason)
        self.files.append(path)

    def coco_reason(self, coco_id) -> str | None:
        return self.coco.get(int(coco_id)) if coco_id is not None else None

    def flickr_reason(self, flickr_id) -> str | None:
        return self.flickr.get(int(flickr_id)) if flickr_id is not None else None

    def vg_reason(self, coco_id, flickr_id) -> str | None:
        """Why a Visual Genome image (with its image_data coco_id / flickr_id) is an evaluation image, or None."""
        reason = self.coco_reason(coco_id)
        if reason:
            return f"{reason} (via VG coco_id)"
        reason = self.flickr_reason(flickr_id)
        return f"{reason} (via VG flickr_id)" if reason else None

    def summary(self) -> dict:
        return {"coco_ids": len(self.coco), "flickr_ids": len(self.flickr), "files": list(self.files),
                "coco_reasons": dict(Counter(self.coco.values())),
                "flickr_reasons": dict(Counter(self.flickr.values()))}
