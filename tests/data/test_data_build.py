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

REPO = Path(__file__).resolve().parents[2]


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
    Image 200 is in test.txt; image 300 (train) has a cat, and a sofa whose entity has no box at all."""
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
    (ann / "300.xml").write_text(
        "<annotation><size><width>50</width><height>40</height></size>"
        "<object><name>5</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>12</xmax><ymax>12</ymax></bndbox></object>"
        "</annotation>")
    (sentences / "300.txt").write_text("[/EN#5/animals A cat] on [/EN#6/other a sofa] .\n")
    (root / "flickr/train.txt").write_text("100\n300\n")
    (root / "flickr/val.txt").write_text("")
    (root / "flickr/test.txt").write_text("200\n")
    for i in (100, 200, 300):
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
        {"image_id": 12, "objects": [other, dict(dog, object_id=6, names=["puppy"]),
                                     dict(dog, object_id=7, names=["hound"])]},
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


def run_build(root: Path, out: Path, *extra: str) -> dict:
    from ferret.data.build.command import main

    assert main(build_args(root, out, *extra)) == 0
    return json.loads((out / "build_report.json").read_text())


PLAIN = ("--canonical", "--refer-forms", "box=1", "--negative-share", "0", "--yesno-negative-share", "0")


@pytest.fixture(scope="module")
def plain(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    return out, run_build(sources, out, *PLAIN)


def human(text):
    return {"from": "human", "value": text}


def gpt(text):
    return {"from": "gpt", "value": text}


def rec(id_, image, w, h, turns, boxes, forms):
    return {"id": id_, "image": image, "image_w": w, "image_h": h, "conversations": turns, "box_x1y1x2y2": boxes,
            "refer_as": forms}


DOG, CAT = [4, 6, 24, 24], [30.5, 10, 50.5, 40]  # COCO [x, y, w, h] -> [x, y, x + w, y + h]
VG_DOG, VG_TREE = [2, 3, 22, 18], [30, 0, 59, 39]  # VG x, y, w, h; the tree's right edge clamps to W - 1 = 59

# Written by hand from the fixtures above (canonical mode: first template, annotation order, boxes only).
EXPECTED = {
    "grit_coco_instances_train2017_00000.json": [rec(
        "coco_objects/1/0", "000000000001.jpg", 64, 48,
        [human("<image>\nWhat is the object <bbox_location0>?"), gpt("dog"),
         human("What is the object <bbox_location0>?"), gpt("cat"),
         human("Where is the dog in the image?"), gpt("dog <bbox_location0>"),
         human("Where is the cat in the image?"), gpt("cat <bbox_location0>")],
        [[DOG], [], [CAT], [], [], [DOG], [], [CAT]], ["box", None, "box", None, None, None, None, None])],
    "refexp_refcoco_unc_00000.json": [rec(  # the repeated sentence "the dog" is asked once
        "refexp/refcoco(unc)/1/0", "COCO_train2014_000000000001.jpg", 64, 48,
        [human("<image>\nDescribe the object <bbox_location0> so that it can be told apart from the others."),
         gpt("brown dog on the left"),
         human("What is the location of the dog in the image?"), gpt("the dog <bbox_location0>"),
         human("Describe the object <bbox_location0> so that it can be told apart from the others."), gpt("cat")],
        [[DOG], [], [], [DOG], [CAT], []], ["box", None, None, None, "box", None])],
    "flickr_flickr30k_00000.json": [
        rec("flickr/100/0", "100.jpg", 50, 40,  # Flickr boxes are 1-based: (1, 1, 21, 31) -> [0, 0, 20, 30]
            [human("<image>\nDescribe the image in one sentence and give the location of each object you mention."),
             gpt("A man <bbox_location0> in a red hat <bbox_location1> walks two dogs <bbox_location2>, "
                 "<bbox_location3> in the park."),
             human("What are the locations of a person, dogs?"),
             gpt("a person <bbox_location0>; dogs <bbox_location1>, <bbox_location2>")],
            [[], [[0, 0, 20, 30], [4, 1, 14, 7], [24, 19, 34, 29], [35, 19, 49, 39]], [],
             [[0, 0, 20, 30], [24, 19, 34, 29], [35, 19, 49, 39]]], [None] * 4),
        rec("flickr/300/0", "300.jpg", 50, 40,
            [human("<image>\nDescribe the image in one sentence and give the location of each object you mention."),
             gpt("A cat <bbox_location0> on a sofa.")],
            [[], [[1, 1, 11, 11]]], [None, None])],
    "vg_object_vg_00000.json": [rec(  # "puppy" is the dog's second name; the second tree repeats the first
        "vg_objects/10/0", "VG_100K/10.jpg", 60, 40,
        [human("<image>\nWhat is the object <bbox_location0>?"), gpt("dog"),
         human("What is the object <bbox_location0>?"), gpt("tree"),
         human("Where is the dog in the image?"), gpt("dog <bbox_location0>"),
         human("Where is the tree in the image?"), gpt("tree <bbox_location0>")],
        [[VG_DOG], [], [VG_TREE], [], [], [VG_DOG], [], [VG_TREE]],
        ["box", None, "box", None, None, None, None, None])],
    "vg_yesno_object_vg_00000.json": [rec(
        "vg_yesno_objects/10/0", "VG_100K/10.jpg", 60, 40,
        [human("<image>\nIs there a dog in the image?"), gpt("Yes, there is a dog <bbox_location0>."),
         human("Is there a tree in the image?"), gpt("Yes, there is a tree <bbox_location0>.")],
        [[], [VG_DOG], [], [VG_TREE]], [None] * 4)],
    "vg_attribute_vg_00000.json": [rec(
        "vg_attributes/10/0", "VG_100K/10.jpg", 60, 40,
        [human("<image>\nWhat are the attributes of the dog <bbox_location0>?"), gpt("The dog is brown and small."),
         human("Where is the brown and small dog?"), gpt("brown and small dog <bbox_location0>")],
        [[VG_DOG], [], [], [VG_DOG]], ["box", None, None, None])],
    "vg_relation_vg_00000.json": [rec(  # the "stick" relationship has a 0-wide box and is dropped
        "vg_relations/10/0", "VG_100K/10.jpg", 60, 40,
        [human("<image>\nWhat is the relationship between <bbox_location0> and <bbox_location1>?"),
         gpt("The dog <bbox_location0> is under the tree <bbox_location1>.")],
        [[VG_DOG, VG_TREE], [VG_DOG, VG_TREE]], ["box", None])],
    "vg_region_vg_00000.json": [rec(
        "vg_regions/10/0", "VG_100K/10.jpg", 60, 40,
        [human("<image>\nDescribe the region <bbox_location0> in a short phrase."), gpt("a dog lying in the grass"),
         human('Where is "tall green tree" in the image?'), gpt("tall green tree <bbox_location0>")],
        [[[0, 2, 30, 22]], [], [], [VG_TREE]], ["box", None, None, None])],
    "objects365_objects365_train_00000.json": [rec(
        "objects365/1/0", "obj365_1.jpg", 40, 30,
        [human("<image>\nWhat is the object <bbox_location0>?"), gpt("bottle"),
         human("Where is the bottle in the image?"), gpt("bottle <bbox_location0>")],
        [[[1, 2, 11, 14]], [], [], [[1, 2, 11, 14]]], ["box", None, None, None])],
    "grit_lvis_v1_train_00000.json": [rec(
        "lvis_objects/4/0", "train2017/000000000004.jpg", 40, 30,
        [human("<image>\nWhat is the object <bbox_location0>?"), gpt("bow (weapon)"),
         human("Where is the bow (weapon) in the image?"), gpt("bow (weapon) <bbox_location0>")],
        [[[5, 5, 15, 15]], [], [], [[5, 5, 15, 15]]], ["box", None, None, None])],
}


# ------------------------------------------------------------------------------------------------ records
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_records_match_hand_written_expectations(plain, name):
    out, _ = plain
    got = read_out(out)
    assert name in got, sorted(got)
    assert got[name] == EXPECTED[name]


def test_every_file_is_routed_by_its_name_and_listed_in_the_mix(plain):
    from ferret.data.grit import infer_dataset_type

    out, report = plain
    files = sorted(p.name for p in (out / "data").glob("*.json"))
    assert files == sorted(EXPECTED)
    tags = {name: infer_dataset_type(name) for name in files}
    assert tags["refexp_refcoco_unc_00000.json"] == "refexp" and tags["vg_region_vg_00000.json"] == "vg_region"
    assert tags["vg_yesno_object_vg_00000.json"] == "vg_yesno_object" and tags["vg_object_vg_00000.json"] == "vg_object"
    assert tags["grit_lvis_v1_train_00000.json"] == "grit" and tags["flickr_flickr30k_00000.json"] == "flickr"
    mix = json.loads((out / "train_mix.json").read_text())
    weights = {os.path.basename(p): m for p, m in zip(mix["data_path"], mix["data_multiple"])}
    # the recipe's weights: vg relations and regions 0.2, the rest 1
    assert weights["vg_relation_vg_00000.json"] == 0.2 and weights["vg_region_vg_00000.json"] == 0.2
    assert weights["refexp_refcoco_unc_00000.json"] == 1.0 and len(weights) == len(files)
    folders = {os.path.basename(p): f for p, f in zip(mix["data_path"], mix["image_folder"])}
    assert folders["grit_lvis_v1_train_00000.json"].endswith("/coco")
    words = (out / "train_mix.args").read_text().split()
    assert words[0] == "--data_path" and words.count("--data_multiple") == 1 and "0.2" in words
    assert report["records_per_task_kind"] == {
        "coco_objects": 1, "flickr": 2, "lvis_objects": 1, "objects365": 1, "refexp": 1, "vg_attributes": 1,
        "vg_objects": 1, "vg_regions": 1, "vg_relations": 1, "vg_yesno_objects": 1}


def test_report_counts_evaluation_images_and_odd_cases(plain):
    _, report = plain
    sources = report["sources"]
    coco = sources["coco:instances_train2017.json"]
    assert coco["evaluation_images_left_out"] == {"pope.jsonl": 1, "refcoco(unc) val": 1}
    assert coco["dropped"]["crowd_annotation"] == 1 and coco["images_used"] == 1
    assert sources["refcoco(unc)"]["evaluation_images_left_out"] == {}  # its val ref is not read as training
    assert sources["flickr30k"]["evaluation_images_left_out"] == {"flickr30k test": 1}
    assert sources["flickr30k"]["counts"]["phrases_without_box"] == 3  # the park (scene), outside (notvisual), a sofa
    vg_objects = sources["vg_objects"]
    assert vg_objects["evaluation_images_left_out"] == {"refcoco(unc) val (via VG coco_id)": 1,
                                                        "flickr30k test (via VG flickr_id)": 1}
    assert vg_objects["dropped"] == {"object_without_name_or_box": 1}  # the bird off the image
    assert sources["vg_relations"]["dropped"] == {"relationship_incomplete": 1}
    assert sources["vg_regions"]["dropped"] == {"region_without_phrase_or_box": 1}
    assert report["evaluation_images"]["coco_ids"] == 2 and report["evaluation_images"]["flickr_ids"] == 1
    text = (Path(plain[0]) / "build_report.txt").read_text()
    assert "evaluation images left out: flickr30k test=1" in text


def test_no_record_comes_from_an_evaluation_image(sources, tmp_path):
    run_build(sources, tmp_path / "out")  # default options: random templates, forms and negatives
    images = {r["image"] for records in read_out(tmp_path / "out").values() for r in records}
    for leaked in ("000000000002.jpg", "000000000003.jpg", "COCO_train2014_000000000003.jpg", "200.jpg",
                   "VG_100K_2/11.jpg", "VG_100K_2/12.jpg"):
        assert leaked not in images
    kept = run_build(sources, tmp_path / "kept", *PLAIN, "--keep-eval-images")
    assert kept["sources"]["coco:instances_train2017.json"]["images_used"] == 3


# ------------------------------------------------------------------------------------------------ draws
def test_same_seed_same_output_other_seed_other_draws(sources, tmp_path):
    run_build(sources, tmp_path / "a", "--seed", "3")
    run_build(sources, tmp_path / "b", "--seed", "3")
    run_build(sources, tmp_path / "c", "--seed", "4")
    a, b, c = (read_out(tmp_path / k) for k in "abc")
    assert a == b
    for name in a:
        assert (tmp_path / "a" / "data" / name).read_bytes() == (tmp_path / "b" / "data" / name).read_bytes()
    assert a != c and a.keys() == c.keys()


def test_free_form_turns_carry_the_segmentation_and_fall_back_without_one(sources, tmp_path):
    from ferret.regions import FreeForm

    report = run_build(sources, tmp_path, "--canonical", "--refer-forms", "free_form=1", "--negative-share", "0",
                       "--tasks", "coco_objects")
    record = read_out(tmp_path)["grit_coco_instances_train2017_00000.json"][0]
    # turn 0 refers to the dog (a polygon): free-form, its mask is the filled polygon x 4..24, y 6..24
    assert record["refer_as"][:3] == ["free_form", None, "box"]
    mask = FreeForm.from_rle(record["masks"][0][0]).mask
    assert mask.shape == (48, 64) and mask.sum() == 21 * 19 and mask[6:25, 4:25].all()
    # turn 2 refers to the cat, whose segmentation is empty: it falls back to a box, without a mask
    assert record["masks"][2] == [None]
    assert report["sources"]["coco:instances_train2017.json"]["counts"]["free_form_fallback"] == 1


def test_referring_forms_follow_their_weights(sources, tmp_path):
    report = run_build(sources, tmp_path, "--refer-forms", "point=1,box=0,free_form=0", "--tasks", "vg_regions",
                       "vg_objects", "refexp")
    forms = [f for records in read_out(tmp_path).values() for r in records for f in r["refer_as"] if f]
    assert len(forms) >= 3 and set(forms) == {"point"}
    counted = sum(v for s in report["sources"].values() for k, v in s["counts"].items() if k.startswith("form:"))
    assert counted == len(forms)


def test_absent_objects_are_never_present_synonyms_or_synsets(sources, tmp_path):
    run_build(sources, tmp_path, "--canonical", "--negative-share", "0.5", "--yesno-negative-share", "0.5",
              "--tasks", "vg_yesno_objects", "lvis_objects", "flickr")
    out = read_out(tmp_path)
    (yesno,) = out["vg_yesno_object_vg_00000.json"]
    questions = [t["value"] for t in yesno["conversations"][0::2]]
    answers = [t["value"] for t in yesno["conversations"][1::2]]
    asked_absent = {q.split("Is there a ")[1].split(" in the")[0].replace("n ", "", 1) if q.count("Is there an ")
                    else q.split("Is there a ")[1].split(" in the")[0]
                    for q, a in zip(questions, answers) if a.startswith("No")}
    # 2 present names (dog, tree) -> 2 absent ones at a share of 0.5. "puppy" (the dog's other name) and "hound"
    # (the dog's synset dog.n.01) are never asked; "car" and "bird" (annotated off the image) are the candidates.
    assert asked_absent == {"car", "bird"}
    (lvis,) = out["grit_lvis_v1_train_00000.json"]
    text = json.dumps(lvis["conversations"])
    assert "There is no teddy bear in the image." in text and "zebra" not in text  # only verified negatives
    flickr = out["flickr_flickr30k_00000.json"]
    swapped = [r for r in flickr if any('Does this caption match' in t["value"] for t in r["conversations"])]
    assert swapped, "a negative share of 0.5 over 3 questions must swap at least one caption"
    for record in swapped:
        for q, a in zip(record["conversations"][0::2], record["conversations"][1::2]):
            if "Does this caption match" in q["value"]:
                assert a["value"].startswith("No. There is no ")


# ------------------------------------------------------------------------------------------------ scale and input
def test_bucketed_grouping_gives_the_same_records(sources, tmp_path, monkeypatch):
    from ferret.data.build import streaming

    run_build(sources, tmp_path / "one", *PLAIN, "--tasks", "coco_objects", "refexp", "lvis_objects")
    monkeypatch.setattr(streaming, "BUCKET_BYTES", 64)  # dozens of buckets for the small files
    monkeypatch.setattr(streaming.bucket_count, "__defaults__", (64,))
    run_build(sources, tmp_path / "many", *PLAIN, "--tasks", "coco_objects", "refexp", "lvis_objects")
    assert read_out(tmp_path / "one") == read_out(tmp_path / "many")
    assert not (tmp_path / "many" / ".tmp").exists()


def test_shards_split_and_a_rebuild_leaves_no_stale_shard(sources, tmp_path):
    from ferret.data.build.writer import ShardWriter

    writer = ShardWriter(str(tmp_path), "vg_region_vg", 2)
    for k in range(5):
        writer.write({"id": k})
    paths = writer.close()
    assert [os.path.basename(p) for p in paths] == [f"vg_region_vg_0000{k}.json" for k in range(3)]
    assert [json.loads(Path(p).read_text()) for p in paths] == [[{"id": 0}, {"id": 1}], [{"id": 2}, {"id": 3}],
                                                                [{"id": 4}]]
    ShardWriter(str(tmp_path), "vg_region_vg", 2).close()
    assert not list(tmp_path.glob("vg_region_vg_*.json"))


def test_bad_inputs_get_clear_errors(sources, tmp_path, capsys):
    from ferret.data.build.command import main

    broken = tmp_path / "instances_broken.json"
    broken.write_text('{"images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 4}, {"id": ')
    assert main(["--out", str(tmp_path / "o"), "--no-progress", "--coco-instances", str(broken),
                 "--coco-images", str(tmp_path)]) == 2
    assert "instances_broken.json: not valid JSON" in capsys.readouterr().err
    bad_refs = tmp_path / "refcoco" / "refs(unc).p"
    bad_refs.parent.mkdir()
    bad_refs.write_bytes(pickle.dumps({"not": "a list"}))
    assert main(["--out", str(tmp_path / "o"), "--no-progress", "--refcoco-refs", str(bad_refs),
                 "--refcoco-images", str(tmp_path)]) == 2
    assert "expected a list of refs" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "o"), "--no-progress", "--vg-dir", str(sources / "vg")]) == 2
    assert "--vg-images is required" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "no source given" in capsys.readouterr().err


def test_missing_image_files_drop_their_records(sources, tmp_path):
    empty = tmp_path / "no_images"
    empty.mkdir()
    from ferret.data.build.command import main

    assert main(["--out", str(tmp_path / "o"), "--no-progress", "--vg-dir", str(sources / "vg"),
                 "--vg-images", str(empty), "--tasks", "vg_regions"]) == 0
    report = json.loads((tmp_path / "o" / "build_report.json").read_text())
    # no evaluation file is given here, so both VG images with regions are looked for, and both are missing
    assert report["sources"]["vg_regions"]["dropped"] == {"image_file_missing": 2}
    assert report["records"] == 0


# ------------------------------------------------------------------------------------------------ end to end
def test_cli_routes_and_help_imports_no_torch(capsys):
    from ferret.cli import GROUPS, main

    assert GROUPS["data"]["build"] == "ferret.data.build"
    assert GROUPS["data"]["generate-conversations"] == "ferret.data.build.conversations"
    with pytest.raises(SystemExit):
        main(["data", "build", "--help"])
    assert "--vg-dir" in capsys.readouterr().out
    code = ("import sys\nfrom ferret.cli import main\nfor cmd in ('build', 'generate-conversations'):\n"
            "    try:\n        main(['data', cmd, '--help'])\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'pycocotools') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_options_out_of_range_are_named(sources, tmp_path, capsys):
    from ferret.data.build.command import main

    assert main(build_args(sources, tmp_path, "--negative-share", "1.5")) == 2
    assert "negative_share must be in [0, 1), got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(build_args(sources, tmp_path, "--refer-forms", "circle=1"))
    assert "--refer-forms item 'circle=1'" in capsys.readouterr().err


def test_built_set_validates_and_trains(sources, tmp_path):
    """The default build passes the validator with zero bad records, and the tiny model trains a few steps on it
    through the written mix (train_mix.json as --config)."""
    from ferret.data import validate as V
    from ferret.data.toy import train_toy_tokenizer, world_corpus
    from ferret.train.train import main as train_main

    out = tmp_path / "grit"
    run_build(sources, out, "--negative-share", "0.3")
    words = (out / "validate.args").read_text().split()
    files = [w for w in words if not w.startswith("--") and words[words.index(w) - 1] != "--image-folder"]
    folders = [words[i + 1] for i, w in enumerate(words) if w == "--image-folder"]
    report = V.validate(files, folders)
    assert report.records == sum(len(r) for r in read_out(out).values()) > 0
    assert report.bad == 0 and not report.has_errors, report.summary()
    records = [r for rs in read_out(out).values() for r in rs]
    train_toy_tokenizer(tmp_path / "tokenizer", world_corpus(records) * 4, vocab_size=500)
    run = tmp_path / "run"
    assert train_main(["--config", str(out / "train_mix.json"), "--init_config", "small",
                       "--tokenizer_path", str(tmp_path / "tokenizer"), "--output_dir", str(run),
                       "--max_steps", "2", "--per_device_train_batch_size", "2", "--model_max_length", "256",
                       "--logging_steps", "1", "--report_to", "none", "--use_cpu", "True", "--seed", "0",
                       "--save_strategy", "no"]) == 0
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_merge_mix_lists_other_shards_in_the_mix(sources, tmp_path):
    other = tmp_path / "convs"
    other.mkdir()
    shard = other / "git_instruction_generated_vg_00000.json"
    shard.write_text("[]")
    (other / "train_mix.json").write_text(json.dumps({"data_path": [str(shard)], "image_folder": ["/img/vg"],
                                                      "data_multiple": [3.0]}))
    run_build(sources, tmp_path / "out", *PLAIN, "--tasks", "vg_regions", "--merge-mix", str(other))
    mix = json.loads((tmp_path / "out" / "train_mix.json").read_text())
    assert mix["data_path"][-1] == str(shard) and mix["data_multiple"][-1] == 3.0
    assert mix["image_folder"][-1] == "/img/vg"
    assert len(mix["data_path"]) == 2
    assert str(shard) in (tmp_path / "out" / "validate.args").read_text()
    from ferret.data.build.command import main

    assert main(["--out", str(tmp_path / "x"), "--vg-dir", str(sources / "vg"), "--vg-images", "v",
                 "--merge-mix", str(tmp_path / "nowhere")]) == 2


def test_mdetr_expression_files(sources, tmp_path):
    """MDETR's COCO-style files: one image entry per expression; expressions of one COCO image are packed
    together; a val file given with --exclude-eval keeps its images out."""
    def entry(i, coco_id, caption):
        return {"id": i, "file_name": f"COCO_train2014_{coco_id:012d}.jpg", "height": 48, "width": 64,
                "caption": caption, "dataset_name": "refcoco", "original_img_id": coco_id, "tokens_positive": []}

    def ann(i, image_id, bbox):
        return {"id": i, "image_id": image_id, "bbox": bbox, "category_id": 1, "iscrowd": 0, "area": 1,
                "segmentation": [], "tokens_positive": [[0, 3]]}

    train = dump(tmp_path / "final_refexp_train.json", {
        "images": [entry(0, 1, "left dog"), entry(1, 3, "big dog"), entry(2, 1, "the cat, right")],
        "annotations": [ann(0, 2, [30.5, 10, 20, 30]), ann(1, 0, [4, 6, 20, 18]), ann(2, 1, [10, 10, 30, 30])],
        "categories": [{"id": 1, "name": "dog"}]})
    val = dump(tmp_path / "final_refexp_val.json", {"images": [entry(0, 3, "big dog")], "annotations": [],
                                                   "categories": []})
    from ferret.data.build.command import main

    assert main(["--out", str(tmp_path / "out"), "--no-progress", *PLAIN, "--mdetr-refexp", train,
                 "--refcoco-images", str(sources / "coco/train2014"), "--exclude-eval", val]) == 0
    got = read_out(tmp_path / "out")
    assert got == {"refexp_final_refexp_train_00000.json": [rec(
        "refexp/final_refexp_train/1/0", "COCO_train2014_000000000001.jpg", 64, 48,
        [human("<image>\nDescribe the object <bbox_location0> so that it can be told apart from the others."),
         gpt("left dog"),
         human("What is the location of the cat right in the image?"), gpt("the cat right <bbox_location0>")],
        [[DOG], [], [], [CAT]], ["box", None, None, None])]}
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert report["sources"]["final_refexp_train"]["evaluation_images_left_out"] == {"final_refexp_val.json": 1}
    assert main(["--out", str(tmp_path / "o2"), "--no-progress", "--mdetr-refexp", val,
                 "--refcoco-images", str(sources / "coco/train2014")]) == 2


def test_lvis_val_is_an_evaluation_file(sources, tmp_path, capsys):
    """LVIS val holds the LVIS-referring benchmark's images: refused as training data, accepted by --exclude-eval
    (ids from coco_url), which then keeps COCO image 4 out of the LVIS train build."""
    from ferret.data.build.command import main

    val = tmp_path / "lvis_v1_val.json"
    val.write_text((sources / "lvis/lvis_v1_train.json").read_text())
    assert main(["--out", str(tmp_path / "o"), "--no-progress", "--lvis", str(val), "--lvis-images", "x"]) == 2
    assert "lvis_v1_val.json: its name marks an evaluation split" in capsys.readouterr().err
    report = run_build(sources, tmp_path / "o", "--tasks", "lvis_objects", "--exclude-eval", str(val))
    assert report["sources"]["lvis:lvis_v1_train.json"]["evaluation_images_left_out"] == {"lvis_v1_val.json": 1}
    assert report["records"] == 0


def test_malformed_files_and_items(sources, tmp_path, capsys):
    """Wrong top levels stop the build with the file named; malformed items inside an entry are counted."""
    from ferret.data.build.command import main

    vg = tmp_path / "vg"
    vg.mkdir()
    (vg / "image_data.json").write_text((sources / "vg/image_data.json").read_text())
    (vg / "region_descriptions.json").write_text(json.dumps({"regions": []}))
    assert main(["--out", str(tmp_path / "o"), "--no-progress", "--vg-dir", str(vg), "--vg-images",
                 str(sources / "vg/images"), "--tasks", "vg_regions"]) == 2
    assert "region_descriptions.json: expected a JSON list at the top level" in capsys.readouterr().err
    (vg / "region_descriptions.json").write_text(json.dumps([
        {"id": 10, "regions": [7, "text", {"phrase": "a dog", "x": 0, "y": 0, "width": 10, "height": 10}]}, 3]))
    assert main(["--out", str(tmp_path / "o"), "--no-progress", "--vg-dir", str(vg), "--vg-images",
                 str(sources / "vg/images"), "--tasks", "vg_regions"]) == 2
    assert "item 1 of 'item' is a int, expected a JSON object" in capsys.readouterr().err
    (vg / "region_descriptions.json").write_text(json.dumps([
        {"id": 10, "regions": [7, "text", {"phrase": "a dog", "x": 0, "y": 0, "width": 10, "height": 10}]}]))
    assert main(["--out", str(tmp_path / "o"), "--no-progress", "--vg-dir", str(vg), "--vg-images",
                 str(sources / "vg/images"), "--tasks", "vg_regions"]) == 0
    report = json.loads((tmp_path / "o" / "build_report.json").read_text())
    assert report["sources"]["vg_regions"]["dropped"] == {"malformed_item": 2}
    assert report["records"] == 1
    coco = tmp_path / "instances_list.json"
    coco.write_text("[]")
    assert main(["--out", str(tmp_path / "o"), "--no-progress", "--coco-instances", str(coco),
                 "--coco-images", str(tmp_path)]) == 2
    assert "instances_list.json: expected a JSON object at the top level" in capsys.readouterr().err


def test_packing_splits_questions_over_records(sources, tmp_path):
    """Image 10's four object questions (2 refer + 2 ground) in records of at most 3, then capped at 1 record."""
    run_build(sources, tmp_path / "a", *PLAIN, "--tasks", "vg_objects", "--qa-per-record", "3")
    records = read_out(tmp_path / "a")["vg_object_vg_00000.json"]
    assert [r["id"] for r in records] == ["vg_objects/10/0", "vg_objects/10/1"]
    assert [len(r["conversations"]) for r in records] == [6, 2]
    assert records[1]["conversations"][0]["value"] == "<image>\nWhere is the tree in the image?"
    report = run_build(sources, tmp_path / "b", *PLAIN, "--tasks", "vg_objects", "--qa-per-record", "3",
                       "--records-per-image", "1")
    assert report["sources"]["vg_objects"]["counts"]["qa_beyond_records_per_image"] == 1
