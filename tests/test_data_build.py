"""ferret data build: every source format (written here, with their odd cases), record by record against
hand-written GRIT expectations, evaluation-image exclusion, determinism, negatives, the validator and a short
training run on the built set."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ fixtures
def image(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = (np.arange(width) * 4 % 256)[None, :]
    Image.fromarray(pixels).save(path, format="PNG")  # any decodable file will do; the name says .jpg


def dump(path: Path, data) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return str(path)


def coco_files(root: Path) -> None:
    """COCO instances: three images; image 1 has a dog (polygon), a cat (empty segmentation) and a crowd of
    people (RLE with list counts); annotations are not ordered by image; image 2 is a POPE image, image 3 a
    RefCOCO val image."""
    for i in (1, 2, 3):
        image(root / "coco/train2017" / f"{i:012d}.jpg", 64, 48)
        image(root / "coco/train2014" / f"COCO_train2014_{i:012d}.jpg", 64, 48)
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 64, "height": 48} for i in (1, 2, 3)]
    crowd_counts = [100, 20, 3052]  # 3172 = 64 * 48... but uncompressed counts of a crowd region
    annotations = [
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [4, 6, 20, 18], "iscrowd": 0, "area": 200,
         "segmentation": [[4, 6, 24, 6, 24, 24, 4, 24]]},
        {"id": 21, "image_id": 2, "category_id": 2, "bbox": [0, 0, 10, 10], "iscrowd": 0, "area": 100,
         "segmentation": []},
        {"id": 12, "image_id": 1, "category_id": 2, "bbox": [30.5, 10, 20, 30], "iscrowd": 0, "area": 600,
         "segmentation": []},
        {"id": 13, "image_id": 1, "category_id": 3, "bbox": [40, 0, 20, 20], "iscrowd": 1, "area": 300,
         "segmentation": {"size": [48, 64], "counts": crowd_counts}},
        {"id": 31, "image_id": 3, "category_id": 1, "bbox": [10, 10, 30, 30], "iscrowd": 0, "area": 900,
         "segmentation": [[10, 10, 40, 10, 40, 40]]},
    ]
    categories = [{"id": 1, "name": "dog", "supercategory": "animal"},
                  {"id": 2, "name": "cat", "supercategory": "animal"},
                  {"id": 3, "name": "person", "supercategory": "person"}]
    dump(root / "coco/annotations/instances_train2017.json",
         {"info": {}, "images": images, "licenses": [], "annotations": annotations, "categories": categories})
    dump(root / "pope.jsonl", None)
    (root / "pope.jsonl").write_text(json.dumps({"image": "COCO_val2014_000000000002.jpg", "text": "Is there a cat?",
                                                 "label": "yes"}) + "\n")


def refcoco_files(root: Path) -> None:
    """refs(unc).p: a train ref with two sentences (plus a repeat) on image 1, a val ref on image 3."""
    refs = [
        {"ref_id": 0, "ann_id": 11, "image_id": 1, "split": "train", "category_id": 1,
         "file_name": "COCO_train2014_000000000001_11.jpg", "sent_ids": [0, 1, 2],
         "sentences": [{"sent_id": 0, "sent": "brown dog on the left", "raw": "Brown dog, on the left."},
                       {"sent_id": 1, "sent": "the dog", "raw": "the dog"},
                       {"sent_id": 2, "sent": "the dog", "raw": "the dog"}]},
        {"ref_id": 1, "ann_id": 12, "image_id": 1, "split": "train", "category_id": 2,
         "file_name": "COCO_train2014_000000000001_12.jpg", "sent_ids": [3],
         "sentences": [{"sent_id": 3, "sent": "cat", "raw": "cat"}]},
        {"ref_id": 2, "ann_id": 31, "image_id": 3, "split": "val", "category_id": 1,
         "file_name": "COCO_train2014_000000000003_31.jpg", "sent_ids": [4],
         "sentences": [{"sent_id": 4, "sent": "big dog", "raw": "big dog"}]},
    ]
    folder = root / "refcoco"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    coco = json.loads((root / "coco/annotations/instances_train2017.json").read_text())
    for im in coco["images"]:
        im["file_name"] = f"COCO_train2014_{im['id']:012d}.jpg"
    dump(folder / "instances.json", coco)


FLICKR_SENTENCES = [
    "[/EN#1/people A man] in [/EN#2/clothing a red hat] walks [/EN#3/animals two dogs] in [/EN#4/scene the park] .",
    "[/EN#1/people A person] is [/EN#0/notvisual outside] with [/EN#3/animals dogs] .",
]


def flickr_files(root: Path) -> None:
    """Image 100 (train): entity 1 one box, 2 one box, 3 two boxes, 4 scene (no box), 0 notvisual.
    Image 200 is in test.txt."""
    ann = root / "flickr/Annotations"
    ann.mkdir(parents=True, exist_ok=True)
    (ann / "100.xml").write_text(
        "<annotation><filename>100.jpg</filename><size><width>50</width><height>40</height><depth>3</depth></size>"
        "<object><name>1</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>21</xmax><ymax>31</ymax></bndbox></object>"
        "<object><name>2</name><bndbox><xmin>5</xmin><ymin>2</ymin><xmax>15</xmax><ymax>8</ymax></bndbox></object>"
        "<object><name>3</name><bndbox><xmin>25</xmin><ymin>20</ymin><xmax>35</xmax><ymax>30</ymax></bndbox></object>"
        "<object><name>3</name><bndbox><xmin>36</xmin><ymin>20</ymin><xmax>50</xmax><ymax>40</ymax></bndbox></object>"
        "<object><name>4</name><scene>1</scene></object></annotation>")
    (ann / "200.xml").write_text(
        "<annotation><size><width>50</width><height>40</height></size>"
        "<object><name>9</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>"
        "</annotation>")
    sentences = root / "flickr/Sentences"
    sentences.mkdir(parents=True, exist_ok=True)
    (sentences / "100.txt").write_text("\n".join(FLICKR_SENTENCES) + "\n")
    (sentences / "200.txt").write_text("[/EN#9/animals A cat] sleeps .\n")
    (root / "flickr/train.txt").write_text("100\n")
    (root / "flickr/val.txt").write_text("")
    (root / "flickr/test.txt").write_text("200\n")
    for i in (100, 200):
        image(root / "flickr30k-images" / f"{i}.jpg", 50, 40)


def vg_files(root: Path) -> None:
    """Image 10: a dog with two names and a synset, two identical trees, a box off the image; image 11 is COCO
    image 3 (a RefCOCO val image), image 12 is Flickr image 200 (a Flickr test image)."""
    vg = root / "vg"
    dump(vg / "image_data.json", [
        {"width": 60, "height": 40, "url": "https://cs.stanford.edu/people/rak248/VG_100K/10.jpg", "image_id": 10,
         "coco_id": None, "flickr_id": None},
        {"width": 64, "height": 48, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/11.jpg", "image_id": 11,
         "coco_id": 3, "flickr_id": None},
        {"width": 50, "height": 40, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/12.jpg", "image_id": 12,
         "coco_id": None, "flickr_id": 200},
    ])
    image(root / "vg/images/VG_100K/10.jpg", 60, 40)
    image(root / "vg/images/VG_100K_2/11.jpg", 64, 48)
    image(root / "vg/images/VG_100K_2/12.jpg", 50, 40)
    dog = {"object_id": 1, "x": 2, "y": 3, "w": 20, "h": 15, "names": ["Dog", "puppy"], "synsets": ["dog.n.01"]}
    tree = {"object_id": 2, "x": 30, "y": 0, "w": 29, "h": 39, "names": ["tree"], "synsets": ["tree.n.01"]}
    off = {"object_id": 3, "x": 70, "y": 0, "w": 5, "h": 5, "names": ["bird"], "synsets": ["bird.n.01"]}
    other = {"object_id": 4, "x": 0, "y": 0, "w": 10, "h": 10, "names": ["car"], "synsets": ["car.n.01"]}
    dump(vg / "objects.json", [
        {"image_id": 10, "objects": [dog, tree, dict(tree, object_id=5), off]},
        {"image_id": 11, "objects": [other]},
        {"image_id": 12, "objects": [other]},
    ])
    dump(vg / "attributes.json", [
        {"image_id": 10, "attributes": [dict(dog, attributes=["brown", "Small"]), dict(tree, attributes=[])]},
        {"image_id": 11, "attributes": [dict(other, attributes=["red"])]},
    ])
    dump(vg / "relationships.json", [
        {"image_id": 10, "relationships": [
            {"relationship_id": 7, "predicate": "UNDER", "subject": dog, "object": tree, "synsets": []},
            {"relationship_id": 8, "predicate": "near", "subject": {"object_id": 9, "x": 1, "y": 1, "w": 0, "h": 5,
                                                                      "name": "stick"}, "object": tree}]},
    ])
    dump(vg / "region_descriptions.json", [
        {"id": 10, "regions": [
            {"region_id": 1, "image_id": 10, "phrase": "a dog lying in the grass", "x": 0, "y": 2, "width": 30,
             "height": 20},
            {"region_id": 2, "image_id": 10, "phrase": "tall green tree. ", "x": 30, "y": 0, "width": 30,
             "height": 40},
            {"region_id": 3, "image_id": 10, "phrase": "", "x": 30, "y": 0, "width": 3, "height": 4}]},
        {"id": 12, "regions": [{"region_id": 4, "image_id": 12, "phrase": "cat", "x": 1, "y": 1, "width": 8,
                                "height": 8}]},
    ])


def detection_files(root: Path) -> None:
    """Objects365 (COCO-style, empty segmentations) and LVIS (coco_url paths, neg_category_ids)."""
    image(root / "o365/images/obj365_1.jpg", 40, 30)
    dump(root / "o365/objects365_train.json", {
        "images": [{"id": 1, "file_name": "obj365_1.jpg", "width": 40, "height": 30}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [1, 2, 10, 12], "iscrowd": 0,
                         "segmentation": []}],
        "categories": [{"id": 5, "name": "Bottle"}, {"id": 6, "name": "Cup"}]})
    image(root / "coco/train2017/000000000004.jpg", 40, 30)
    dump(root / "lvis/lvis_v1_train.json", {
        "images": [{"id": 4, "coco_url": "http://images.cocodataset.org/train2017/000000000004.jpg",
                    "width": 40, "height": 30, "neg_category_ids": [2], "not_exhaustive_category_ids": []}],
        "annotations": [{"id": 1, "image_id": 4, "category_id": 1, "bbox": [5, 5, 10, 10],
                         "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]]}],
        "categories": [{"id": 1, "name": "bow_(weapon)", "synonyms": ["bow_(weapon)"], "synset": "bow.n.04"},
                       {"id": 2, "name": "teddy_bear", "synonyms": ["teddy_bear", "teddy"], "synset": "teddy.n.01"},
                       {"id": 3, "name": "zebra", "synonyms": ["zebra"], "synset": "zebra.n.01"}]})


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    coco_files(root)
    refcoco_files(root)
    flickr_files(root)
    vg_files(root)
    detection_files(root)
    return root


def build_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--out", str(out), "--no-progress",
            "--coco-instances", str(root / "coco/annotations/instances_train2017.json"),
            "--coco-images", str(root / "coco/train2017"),
            "--refcoco-refs", str(root / "refcoco/refs(unc).p"), "--refcoco-images", str(root / "coco/train2014"),
            "--flickr-dir", str(root / "flickr"), "--flickr-images", str(root / "flickr30k-images"),
            "--vg-dir", str(root / "vg"), "--vg-images", str(root / "vg/images"),
            "--objects365", str(root / "o365/objects365_train.json"),
            "--objects365-images", str(root / "o365/images"),
            "--lvis", str(root / "lvis/lvis_v1_train.json"), "--lvis-images", str(root / "coco"),
            "--exclude-eval", str(root / "pope.jsonl"), *extra]


def read_out(out: Path) -> dict[str, list[dict]]:
    records = {}
    for path in sorted((out / "data").glob("*.json")):
        records[path.name] = json.loads(path.read_text())
    return records
