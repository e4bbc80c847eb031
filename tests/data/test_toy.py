"""The toy world: determinism, GRIT record structure, exact boxes and masks, question semantics, tokenizer."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ferret.data import toy  # noqa: E402
from ferret.data.toy import (  # noqa: E402
    COLOR_RGB,
    TASKS,
    WorldConfig,
    make_world,
    train_toy_tokenizer,
    world_corpus,
)
from ferret.regions import FreeForm  # noqa: E402

SIZES = {"train": 30, "val": 10, "test": 10}
PLACEHOLDER = re.compile(r"<bbox_location(\d+)>")


def _make(folder: Path, seed: int = 0) -> dict[str, list[dict]]:
    return make_world(folder, SIZES["train"], SIZES["val"], SIZES["test"], image_size=112, seed=seed)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, dict[str, list[dict]]]:
    folder = tmp_path_factory.mktemp("world")
    return folder, _make(folder)


@pytest.fixture(scope="module")
def records(world) -> list[dict]:
    return [r for split in ("train", "val", "test") for r in world[1][split]]


def _image(folder: Path, record: dict) -> np.ndarray:
    return np.asarray(Image.open(folder / record["image"]).convert("RGB"))


def _tight_box(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


def test_same_seed_same_bytes_other_seed_other_world(world, tmp_path):
    folder, _ = world
    _make(tmp_path / "again")
    for split in SIZES:
        assert (folder / f"{split}.json").read_bytes() == (tmp_path / "again" / f"{split}.json").read_bytes()
    pngs = sorted(p.name for p in (folder / "images").glob("*.png"))
    assert len(pngs) == sum(SIZES.values())
    for name in pngs:
        assert (folder / "images" / name).read_bytes() == (tmp_path / "again" / "images" / name).read_bytes(), name
    _make(tmp_path / "other", seed=1)
    assert (folder / "train.json").read_bytes() != (tmp_path / "other" / "train.json").read_bytes()


def test_test_split_does_not_depend_on_train_size(world, tmp_path):
    folder, _ = world
    make_world(tmp_path, num_train=3, num_val=SIZES["val"], num_test=SIZES["test"], image_size=112, seed=0)
    assert (folder / "test.json").read_bytes() == (tmp_path / "test.json").read_bytes()


def test_records_follow_grit_layout(world, records):
    folder, splits = world
    for split, recs in splits.items():
        assert json.loads((folder / f"{split}.json").read_text()) == recs
        assert [r["id"] for r in recs] == [f"{split}_{i:05d}" for i in range(SIZES[split])]
    for r in records:
        assert r["image"] == f"images/{r['id']}.png"
        assert _image(folder, r).shape == (r["image_h"], r["image_w"], 3) == (112, 112, 3)
        assert [m["from"] for m in r["conversations"]] == ["human", "gpt"]
        assert r["conversations"][0]["value"].startswith("<image>\n")
        assert "<image>" not in r["conversations"][0]["value"][len("<image>\n") :]
        assert "<image>" not in r["conversations"][1]["value"]
        for key in ("box_x1y1x2y2", "masks", "region_type"):
            assert len(r[key]) == len(r["conversations"]), (r["id"], key)
        assert 1 <= len(r["objects"]) <= 3
        assert len({o["name"] for o in r["objects"]}) == len(r["objects"]), r["id"]


def test_objects_list_what_is_painted(world, records):
    """`objects` is what negatives and answers are checked against, so tie it to the pixels."""
    folder, _ = world
    for r in records:
        image = _image(folder, r)
        pixel_colors = {tuple(int(v) for v in c) for c in np.unique(image.reshape(-1, 3), axis=0)}
        painted = {name for name, rgb in COLOR_RGB.items() if rgb in pixel_colors}
        assert painted == {o["color"] for o in r["objects"]}, r["id"]
        assert len(pixel_colors) == len(painted) + 1, r["id"]  # plus one plain background level
        for o in r["objects"]:
            x1, y1, x2, y2 = o["box"]
            crop = image[y1 : y2 + 1, x1 : x2 + 1]
            own = (crop == COLOR_RGB[o["color"]]).all(axis=-1)
            assert own[0].any() and own[-1].any() and own[:, 0].any() and own[:, -1].any(), (r["id"], o["name"])


def test_placeholders_match_boxes_masks_and_region_types(records):
    for r in records:
        for turn, message in enumerate(r["conversations"]):
            found = [int(k) for k in PLACEHOLDER.findall(message["value"])]
            n = len(r["box_x1y1x2y2"][turn])
            assert sorted(found) == list(range(n)), (r["id"], turn, message["value"])
            assert len(r["masks"][turn]) == n and len(r["region_type"][turn]) == n, (r["id"], turn)
            expected_types = {"point", "box", "free_form"} if message["from"] == "human" else {"box"}
            assert set(r["region_type"][turn]) <= expected_types, (r["id"], turn)


def test_boxes_are_tight_around_visible_pixels_of_the_right_colour(world, records):
    folder, _ = world
    checked = 0
    for r in records:
        image = _image(folder, r)
        for turn in range(len(r["conversations"])):
            for box, rle in zip(r["box_x1y1x2y2"][turn], r["masks"][turn]):
                x1, y1, x2, y2 = box
                assert 0 <= x1 <= x2 < r["image_w"] and 0 <= y1 <= y2 < r["image_h"], (r["id"], box)
                mask = FreeForm.from_rle(rle).mask
                assert rle["size"] == [r["image_h"], r["image_w"]] and isinstance(rle["counts"], str)
                assert mask.shape == (r["image_h"], r["image_w"])
                assert _tight_box(mask) == box, (r["id"], turn, box)
                (obj,) = [o for o in r["objects"] if o["box"] == box]
                assert (image[mask] == COLOR_RGB[obj["color"]]).all(), (r["id"], obj["name"])
                checked += 1
    assert checked > 20


def test_describe_masks_are_exactly_the_painted_pixels(world, records):
    """A describe record grounds every object, so per colour the union of its masks is the painted area."""
    folder, _ = world
    describes = [r for r in records if r["task"] == "describe"]
    assert describes
    for r in describes:
        image = _image(folder, r)
        assert len(r["box_x1y1x2y2"][1]) == len(r["objects"])
        union: dict[str, np.ndarray] = {}
        for box, rle in zip(r["box_x1y1x2y2"][1], r["masks"][1]):
            (obj,) = [o for o in r["objects"] if o["box"] == box]
            mask = FreeForm.from_rle(rle).mask
            union[obj["color"]] = union.get(obj["color"], np.zeros_like(mask)) | mask
        for color, mask in union.items():
            painted = (image == COLOR_RGB[color]).all(axis=-1)
            assert np.array_equal(painted, mask), (r["id"], color)


def test_pixel_owners_are_the_describe_masks(world, records):
    """Read back from the PNG, each object's pixels are exactly its mask in a describe record."""
    folder, _ = world
    names = toy.WorldConfig().names
    for r in [r for r in records if r["task"] == "describe"]:
        owners = toy.pixel_owners(r, _image(folder, r), names)
        for box, rle in zip(r["box_x1y1x2y2"][1], r["masks"][1]):
            (obj,) = [o for o in r["objects"] if o["box"] == box]
            assert np.array_equal(owners == 1 + names.index(obj["name"]), FreeForm.from_rle(rle).mask), r["id"]
        assert (owners > 0).sum() == sum(FreeForm.from_rle(rle).mask.sum() for rle in r["masks"][1])


def test_patch_targets_by_hand():
    """A 16 px image with a red square on pixels 2..9, cut in 8 px patches."""
    image = np.full((16, 16, 3), 230, dtype=np.uint8)
    image[2:10, 2:10] = COLOR_RGB["red"]
    names = ["red square", "blue circle"]
    record = {"id": "r0", "image_w": 16, "image_h": 16,
              "objects": [{"name": "red square", "color": "red", "shape": "square", "box": [2, 2, 9, 9]}]}
    shares, boxes = toy.patch_targets(record, image, names, size=16, patch=8)
    # patch (row 0, col 0) holds 6x6 red pixels, (0, 1) and (1, 0) hold 6x2, (1, 1) holds 2x2
    np.testing.assert_allclose(shares[:, 1], [36 / 64, 12 / 64, 12 / 64, 4 / 64])
    np.testing.assert_allclose(shares.sum(axis=1), 1.0)
    assert (shares[:, 2] == 0).all()
    np.testing.assert_allclose(boxes[0], [2 / 16, 2 / 16, 10 / 16, 10 / 16])
    assert (boxes[1:] == 0).all()  # the background covers most of the other three patches

    # A model input twice the image size: the same shares, pooled from the upsampled owner map.
    big_shares, big_boxes = toy.patch_targets(record, image, names, size=32, patch=16)
    np.testing.assert_allclose(big_shares, shares)
    np.testing.assert_allclose(big_boxes, boxes)


def test_patch_targets_name_bad_input():
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    record = {"id": "r7", "image_w": 16, "image_h": 16,
              "objects": [{"name": "red star", "color": "red", "shape": "star", "box": [0, 0, 3, 3]}]}
    with pytest.raises(ValueError, match="r7.*'red star'"):
        toy.patch_targets(record, image, ["red square"], size=16, patch=8)
    with pytest.raises(ValueError, match="r7.*20x16"):
        toy.patch_targets({**record, "image_w": 20}, image, ["red star"], size=16, patch=8)
    with pytest.raises(ValueError, match="multiple of patch"):
        toy.patch_targets(record, image, ["red star"], size=16, patch=5)


def test_shapes_keep_most_of_their_area_and_some_overlap():
    config = WorldConfig()
    overlapping = 0
    for i in range(60):
        image, objects = toy.render_scene(np.random.default_rng(i), 112, config)
        for o in objects:
            assert o.mask.sum() >= 40, o.name
        boxes = [o.box for o in objects]
        overlapping += any(
            a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]
            for k, a in enumerate(boxes)
            for b in boxes[k + 1 :]
        )
    assert 3 <= overlapping <= 40


def test_every_task_present_in_stated_proportions(world):
    _, splits = world
    for split, recs in splits.items():
        counts = {t: sum(r["task"] == t for r in recs) for t in TASKS}
        assert all(c >= 1 for c in counts.values()), (split, counts)
    train = {t: sum(r["task"] == t for r in splits["train"]) for t in TASKS}
    # 30 records at weights .25/.1/.25/.2/.2, largest remainders to refer and ground (first in order).
    assert train == {"refer": 8, "refer_choice": 3, "ground": 7, "describe": 6, "yesno": 6}


def test_answers_match_the_scene(records):
    for r in records:
        question = r["conversations"][0]["value"][len("<image>\n") :]
        answer = r["conversations"][1]["value"]
        names = [o["name"] for o in r["objects"]]
        if r["task"] in ("refer", "refer_choice"):
            (box,) = r["box_x1y1x2y2"][0]
            (obj,) = [o for o in r["objects"] if o["box"] == box]
            assert answer == f"a {obj['name']}", r["id"]
            if r["task"] == "refer":
                assert question == "What is <bbox_location0>?"
            else:
                first, second = r["choices"]
                assert obj["name"] in r["choices"] and first != second
                assert question == f"Is the object <bbox_location0> of the image a {first} or a {second}?"
        elif r["task"] == "ground":
            (box,) = r["box_x1y1x2y2"][1]
            (obj,) = [o for o in r["objects"] if o["box"] == box]
            assert question == f"What is the location of the {obj['name']} in the image?"
            assert answer == f"a {obj['name']} <bbox_location0>"
        elif r["task"] == "describe":
            ordered = sorted(r["objects"], key=lambda o: (o["box"][0], o["box"][1]))
            assert r["box_x1y1x2y2"][1] == [o["box"] for o in ordered]
            parts = [f"a {o['name']} <bbox_location{k}>" for k, o in enumerate(ordered)]
            expected = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
            assert question == "Describe the image." and answer == expected
        else:
            asked = re.fullmatch(r"Is there a (\w+ \w+) in the image\?", question).group(1)
            assert answer in ("Yes", "No")
            assert (asked in names) == (answer == "Yes"), (r["id"], asked, names)


def test_yes_no_balanced_and_region_types_all_used(tmp_path):
    splits = make_world(tmp_path, num_train=60, num_val=0, num_test=0, image_size=96, seed=3)
    recs = splits["train"]
    answers = [r["conversations"][1]["value"] for r in recs if r["task"] == "yesno"]
    assert answers.count("Yes") == answers.count("No") == 6
    types = [t for r in recs for t in r["region_type"][0]]
    assert {types.count(t) for t in ("point", "box", "free_form")} == {7}
    assert all(r["image_w"] == r["image_h"] == 96 for r in recs)


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown colours"):
        WorldConfig(colors=("red", "mauve"))
    with pytest.raises(ValueError, match="no absent object"):
        WorldConfig(colors=("red",), shapes=("circle", "square"), max_objects=2)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, records) -> Path:
    return train_toy_tokenizer(tmp_path_factory.mktemp("tok"), world_corpus(records), vocab_size=400)


def test_corpus_renders_regions_as_coordinates(records):
    corpus = world_corpus(records)
    assert all("<bbox_location" not in t and "<image>" not in t and "<region_fea>" not in t for t in corpus)
    assert any(re.search(r"What is \[\d+, \d+\]\?", t) for t in corpus)  # a human region as a point
    assert any(re.search(r"What is \[\d+, \d+, \d+, \d+\]\?", t) for t in corpus)  # ... and as a box
    assert any(re.fullmatch(r"a \w+ \w+ \[\d+, \d+, \d+, \d+\]", t) for t in corpus)  # a grounded answer


def test_tokenizer_training_is_deterministic(tokenizer_dir, records, tmp_path):
    again = train_toy_tokenizer(tmp_path, world_corpus(records), vocab_size=400)
    assert (again / "tokenizer.model").read_bytes() == (tokenizer_dir / "tokenizer.model").read_bytes()
    config = json.loads((again / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and "local_files_only" not in config


def test_tokenizer_matches_sentencepiece_and_round_trips(tokenizer_dir, records):
    import sentencepiece as spm
    from transformers import AutoTokenizer, LlamaTokenizer

    from ferret.conversation import FERRET_SYSTEM

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.get_piece_size() == 400
    tok = LlamaTokenizer.from_pretrained(str(tokenizer_dir), add_bos_token=True)
    auto = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert len(tok) == len(auto) == 400
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)

    texts = world_corpus(records) + [FERRET_SYSTEM.strip(), "USER: What is [12, 450]", "ASSISTANT: Yes"]
    texts += [f"[{v}, {999 - v}]" for v in range(1000)]
    for text in texts:
        ids = sp.encode(text)
        assert sp.decode(ids) == text
        assert tok(text).input_ids == [1] + ids, text
        assert auto(text).input_ids == [1] + ids, text
        assert tok.decode([1] + ids, skip_special_tokens=True) == text
    digits = {sp.piece_to_id(str(d)) for d in range(10)}
    assert 0 not in digits  # every digit is a piece of its own, no byte fallback needed
    assert set(sp.encode("[987, 654]")) >= {sp.piece_to_id(d) for d in "987654"}


def test_region_token_added_later_leaves_the_text_before_it_unchanged(tokenizer_dir):
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    tok = LlamaTokenizer.from_pretrained(str(tokenizer_dir), add_bos_token=True)
    tok.add_tokens(["<region_fea>"], special_tokens=True)
    region_id = tok.convert_tokens_to_ids("<region_fea>")
    assert region_id == 400
    ids = tok("USER: What is [12, 450] <region_fea>?").input_ids
    cut = ids.index(region_id)
    assert ids[:cut] == [1] + sp.encode("USER: What is [12, 450] ")
    assert tok.decode(ids[cut + 1 :]) == "?"


def test_cli_writes_a_world(tmp_path, capsys):
    toy.main(["--out", str(tmp_path), "--num-train", "5", "--num-val", "2", "--num-test", "2", "--image-size", "96"])
    assert "train: 5 records" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "val.json").read_text())) == 2
    assert json.loads((tmp_path / "world.json").read_text())["image_size"] == 96
