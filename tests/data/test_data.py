"""GRIT data: dataset types, record checking, point sampling, mixing, GritDataset, collation and the validator."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from ferret.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from ferret.data import validate as V
from ferret.data.grit import (
    DATASET_TYPES,
    DataOptions,
    FerretCollator,
    GritDataset,
    check_record,
    infer_dataset_type,
    load_records,
    mix,
    mix_indices,
    resolve_dataset_type,
    sample_point,
)
from ferret.regions import Box, Point, region_to_text

W, H = 80, 60  # non-square, so a W/H mix-up shows


def rle(mask):
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def blob(x1, y1, x2, y2, w=W, h=H):
    mask = np.zeros((h, w), dtype=bool)
    mask[y1:y2 + 1, x1:x2 + 1] = True
    return mask


def write_image(folder, name="img.png", size=(W, H)):
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    pixels[..., 0] = (np.arange(size[0]) * 3)[None, :]
    pixels[..., 1] = (np.arange(size[1]) * 4)[:, None]
    Image.fromarray(pixels).save(folder / name)
    return name


def write_json(path, records):
    path.write_text(json.dumps(records))
    return str(path)


def record(human, gpt, human_boxes=(), gpt_boxes=(), human_masks=None, image="img.png", **extra):
    out = {
        "id": extra.pop("id", "r"),
        "image": image,
        "image_w": W,
        "image_h": H,
        "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}],
        "box_x1y1x2y2": [[list(b) for b in human_boxes], [list(b) for b in gpt_boxes]],
    }
    if human_masks is not None:
        out["masks"] = [[rle(m) for m in human_masks], [None] * len(gpt_boxes)]
    out.update(extra)
    return out


def text_of(processor, ids):
    return processor.tokenizer.decode([t for t in ids.tolist() if t >= 0], skip_special_tokens=False)


def find_example(dataset, predicate):
    for i in range(len(dataset)):
        example = dataset.example(i)
        if predicate(example):
            return i, example
    raise AssertionError("no item matched")


# ----------------------------------------------------------------------------------------------------------
# Dataset types


def test_file_name_rule_explicit_type_and_directories():
    assert infer_dataset_type("data/vg_objects_train.json") == "vg_object"
    assert infer_dataset_type("git_instruction.json") == "git_instruction"
    assert infer_dataset_type("grounded_llava_boxes_detail.json") == "grounded_llava_boxes"
    assert infer_dataset_type("/x/llava_instruct_150k.json") == "llava_instruct"
    # Only the file name counts: a directory named after another tag cannot misroute the file.
    assert infer_dataset_type("/data/vg_object/flickr_train.json") == "flickr"
    with pytest.raises(ValueError, match="train.json"):
        infer_dataset_type("/data/refexp_all/train.json")
    # An explicit type wins over the name.
    assert resolve_dataset_type("/data/flickr_train.json", "vg_object").name == "vg_object"
    assert resolve_dataset_type("/data/flickr_train.json", "auto").name == "flickr"
    with pytest.raises(ValueError, match="unknown dataset type 'vg_objects'"):
        resolve_dataset_type("x.json", "vg_objects")
    assert not DATASET_TYPES["llava_instruct"].location_instruction
    assert not DATASET_TYPES["cc3m_595k"].location_instruction
    assert DATASET_TYPES["toy"].location_instruction and DATASET_TYPES["grit"].location_instruction
    assert DATASET_TYPES["git_instruction"].default_multiple == 3


def test_dataset_uses_the_file_name_not_the_folder(tmp_path, processor):
    folder = tmp_path / "llava_instruct_stuff"
    folder.mkdir()
    write_image(folder)
    path = write_json(folder / "refexp_small.json",
                      [record("<image>\nWhere is the dog?", "<bbox_location0>", gpt_boxes=[(1, 2, 30, 40)])])
    dataset = GritDataset([path], [str(folder)], processor, DataOptions())
    assert dataset.files[0].dtype.name == "refexp"
    assert "[12, 33, 375, 666]" in text_of(processor, dataset[0]["input_ids"])
    # llava_instruct (explicit) has no boxes, so the same record's placeholder is an error there.
    bad = check_record(load_records(path)[0], "llava_instruct", (W, H))
    assert [p.reason for p in bad.errors] == ["placeholder_out_of_range"]


# ----------------------------------------------------------------------------------------------------------
# Loaders


def test_each_loader_style_encodes(tmp_path, processor):
    write_image(tmp_path)
    dog = (10, 5, 39, 34)
    vg = [record("<image>\nWhat is <bbox_location0>?", "a dog", human_boxes=[dog],
                 human_masks=[blob(15, 10, 30, 30)])]
    refexp = [record("<image>\nWhere is the dog on the left?", "<bbox_location0>", gpt_boxes=[dog])]
    flickr = [record("<image>\nDescribe the image.", "A dog <bbox_location0> and a cat <bbox_location1>.",
                     gpt_boxes=[dog, (50, 20, 79, 59)])]
    llava = [{"id": "l", "image": "img.png", "conversations": [
        {"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A dog."},
        {"from": "human", "value": "Is it big?"}, {"from": "gpt", "value": "No."}]}]
    paths = [write_json(tmp_path / f"{name}_train.json", recs) for name, recs in
             [("vg_object", vg), ("refexp", refexp), ("flickr", flickr), ("llava_instruct", llava)]]
    collator = FerretCollator(processor)
    expected = {
        "vg_object": lambda t: t.count("<region_fea>") == 1,
        "refexp": lambda t: "ASSISTANT: " + region_to_text(Box(*dog), W, H) + "</s>" in t,
        "flickr": lambda t: f"A dog {region_to_text(Box(*dog), W, H)} and a cat [625, 333, 987, 983]." in t,
        "llava_instruct": lambda t: "<region_fea>" not in t and "Is it big?" in t and t.count("</s>") == 2,
    }
    for path in paths:
        dataset = GritDataset([path], [str(tmp_path)], processor, DataOptions())
        item = dataset[0]
        assert set(item) == {"input_ids", "labels", "images", "region_masks", "image_size"}
        assert item["image_size"] == (W, H) and item["images"].shape == (3, 56, 56)
        n_regions = int((item["input_ids"] == processor.region_token_id).sum())
        assert n_regions == len(item["region_masks"])
        for mask in item["region_masks"]:
            assert mask.dtype == torch.bool and mask.shape == (H, W) and mask.any()
        text = text_of(processor, item["input_ids"])
        name = dataset.files[0].dtype.name
        assert expected[name](text), (name, text)
        assert int((item["input_ids"] == IMAGE_TOKEN_INDEX).sum()) == processor.num_image_tokens
        assert dataset.bad_records == 0
        batch = collator([item, item])
        assert set(batch) == {"input_ids", "labels", "attention_mask", "images", "region_masks"}
        assert batch["images"].shape == (2, 3, 56, 56) and len(batch["region_masks"]) == 2


def test_vg_region_feature_mask_is_box_or_point_within_segmentation(tmp_path, processor):
    write_image(tmp_path)
    box, seg = (10, 5, 39, 34), blob(15, 10, 30, 30)
    path = write_json(tmp_path / "vg_object.json",
                      [record("<image>\nWhat is <bbox_location0>?", "a dog", human_boxes=[box], human_masks=[seg])])
    dataset = GritDataset([path], [str(tmp_path)], processor, DataOptions(), data_multiple=[8])
    i, example = find_example(dataset, lambda e: isinstance(e.regions[0][0], Box))
    assert np.array_equal(dataset[i]["region_masks"][0].numpy(), seg)  # box ∩ segmentation
    i, example = find_example(dataset, lambda e: isinstance(e.regions[0][0], Point))
    point = example.regions[0][0]
    mask = dataset[i]["region_masks"][0].numpy()
    assert seg[int(point.y), int(point.x)] and mask[int(point.y), int(point.x)]
    assert not (mask & ~seg).any() and mask.sum() <= 121


def test_toy_world_records_load(tmp_path, processor):
    from ferret.data.toy import make_world

    records = make_world(tmp_path, num_train=6, num_val=0, num_test=0, image_size=56, seed=3)["train"]
    dataset = GritDataset([str(tmp_path / "train.json")], [None], processor, DataOptions(), dataset_types=["toy"])
    assert len(dataset) == 6
    for i in range(len(dataset)):
        item = dataset[i]
        _, k = dataset.source(i)
        human_regions = len(records[k]["box_x1y1x2y2"][0])
        assert len(item["region_masks"]) == human_regions
        assert item["image_size"] == (56, 56)
    assert dataset.bad_records == 0


# ----------------------------------------------------------------------------------------------------------
# Points


def test_point_sampling_modes():
    box = Box(10, 10, 49, 49)  # centre (29.5, 29.5)
    mask = np.zeros((H, W), dtype=bool)
    mask[10:50, 10:16] = True  # an L shape that misses the centre
    mask[44:50, 10:50] = True
    rng = np.random.default_rng(0)
    assert sample_point(box, mask, "center", rng) == Point(29.5, 29.5)
    ys, xs = np.nonzero(mask)
    nearest = np.argmin((xs - 29.5) ** 2 + (ys - 29.5) ** 2)  # < 1000 pixels: every one is a candidate
    assert sample_point(box, mask, "segment_mask|center", rng) == Point(float(xs[nearest]), float(ys[nearest]))
    uniform = {sample_point(box, mask, "segment_mask|uniform", rng) for _ in range(30)}
    gaussian_seg = [sample_point(box, mask, "segment_mask|gaussian", rng) for _ in range(30)]
    for p in list(uniform) + gaussian_seg:
        assert mask[int(p.y), int(p.x)] and p.x == int(p.x) and p.y == int(p.y)
    assert len(uniform) > 20
    gaussian = [sample_point(box, mask, "gaussian", rng) for _ in range(30)]  # the mask is ignored
    no_mask = [sample_point(box, None, "segment_mask|uniform", rng) for _ in range(30)]  # jittered centre
    for p in gaussian + no_mask:
        assert 10 <= p.x <= 49 and 10 <= p.y <= 49
    assert max(abs(p.x - 29.5) for p in gaussian) > 1
    assert any(not mask[int(p.y), int(p.x)] for p in gaussian)
    # A mask larger than the candidate limit still gives a mask pixel near the centre.
    big = blob(0, 0, 79, 59)
    big[25:35, 35:45] = False
    p = sample_point(Box(0, 0, 79, 59), big, "segment_mask|center", rng)
    assert big[int(p.y), int(p.x)] and abs(p.x - 39.5) + abs(p.y - 29.5) < 15


def test_center_mode_through_the_dataset(tmp_path, processor):
    write_image(tmp_path)
    box, seg = (10, 10, 49, 49), blob(10, 10, 15, 49)  # the centre lies outside the segmentation
    path = write_json(tmp_path / "vg_object.json",
                      [record("<image>\nWhat is <bbox_location0>?", "a dog", human_boxes=[box], human_masks=[seg])])
    dataset = GritDataset([path], [str(tmp_path)], processor, DataOptions(point_input_sample="center"),
                          data_multiple=[8])
    i, example = find_example(dataset, lambda e: isinstance(e.regions[0][0], Point))
    assert example.regions[0][0] == Point(29.5, 29.5)
    assert example.within[0][0] == Box(*box)  # the window misses the segmentation, so the box limits it
    mask = dataset[i]["region_masks"][0].numpy()
    assert mask.sum() == 121 and mask[29, 29]
    # decoded ids: the original token stream has no "▁" before <region_fea>, its next piece starts with one
    assert "[368, 491]<region_fea> ?" in text_of(processor, dataset[i]["input_ids"])


def test_refer_previous_point(tmp_path, processor):
    write_image(tmp_path)
    box, seg = (5, 5, 74, 54), blob(5, 5, 74, 54)
    rec = record("<image>\nCompare <bbox_location0> with <bbox_location1>.", "<bbox_location0> is the same.",
                 human_boxes=[box, box], gpt_boxes=[box], human_masks=[seg, seg])
    path = write_json(tmp_path / "vg_object.json", [rec])
    options = DataOptions(point_input_sample="segment_mask|uniform", refer_previous_point=True)
    dataset = GritDataset([path], [str(tmp_path)], processor, options, data_multiple=[8])
    i, example = find_example(dataset, lambda e: isinstance(e.regions[0][0], Point))
    point = example.regions[0][0]
    assert example.regions == [[point, point], [point]]
    text = text_of(processor, dataset[i]["input_ids"])
    point_text = region_to_text(point, W, H)
    assert text.count(f"{point_text}<region_fea>") == 2  # decoded: no "▁" before <region_fea>
    assert f"ASSISTANT: {point_text} is the same.</s>" in text
    # A human turn given as boxes leaves the gpt turn's box a box.
    i, example = find_example(dataset, lambda e: isinstance(e.regions[0][0], Box))
    assert example.regions[1] == [Box(*box)]

    options = DataOptions(point_input_sample="segment_mask|uniform", refer_previous_point=False)
    dataset = GritDataset([path], [str(tmp_path)], processor, options, data_multiple=[8])
    i, example = find_example(dataset, lambda e: isinstance(e.regions[0][0], Point))
    first, second = example.regions[0]
    assert first != second and example.regions[1] == [Box(*box)]
    assert f"ASSISTANT: {region_to_text(Box(*box), W, H)} is the same.</s>" in text_of(
        processor, dataset[i]["input_ids"])


def test_no_coor(tmp_path, processor):
    write_image(tmp_path)
    rec = record("<image>\nWhat is <bbox_location0>?", "a dog <bbox_location0>", human_boxes=[(10, 5, 39, 34)],
                 gpt_boxes=[(10, 5, 39, 34)])
    path = write_json(tmp_path / "vg_object.json", [rec])
    item = GritDataset([path], [str(tmp_path)], processor, DataOptions(no_coor=True))[0]
    text = text_of(processor, item["input_ids"])
    assert "What is<region_fea> ?" in text and "ASSISTANT: a dog </s>" in text  # decoded original ids
    assert len(item["region_masks"]) == 1
    with pytest.raises(ValueError, match="no_coor needs add_region_feature"):
        DataOptions(no_coor=True, add_region_feature=False)
    plain = GritDataset([path], [str(tmp_path)], processor, DataOptions(add_region_feature=False))[0]
    assert "<region_fea>" not in text_of(processor, plain["input_ids"]) and plain["region_masks"] == []


def test_label_masking_is_exact(tmp_path, processor):
    write_image(tmp_path)
    dog, cat = (10, 5, 39, 34), (50, 20, 79, 59)
    rec = record("<image>\nWhere is the dog?", "The dog <bbox_location0>.", gpt_boxes=[dog])
    rec["conversations"] += [{"from": "human", "value": "And <bbox_location0>?"}, {"from": "gpt", "value": "a cat"}]
    rec["box_x1y1x2y2"] += [[list(cat)], []]
    path = write_json(tmp_path / "vg_object.json", [rec])
    item = GritDataset([path], [str(tmp_path)], processor, DataOptions())[0]
    ids, labels = item["input_ids"], item["labels"]
    supervised = labels != IGNORE_INDEX
    assert torch.equal(labels[supervised], ids[supervised])
    answers = processor.tokenizer.decode(labels[supervised], skip_special_tokens=False).split("</s>")
    assert [a.strip() for a in answers] == [f"The dog {region_to_text(Box(*dog), W, H)}.", "a cat", ""]
    assert not supervised[ids == processor.region_token_id].any()


# ----------------------------------------------------------------------------------------------------------
# Mixing


def test_data_multiple_arithmetic_and_seeding():
    order = mix_indices([4], [2.5], seed=0)
    assert order.shape == (10, 2)
    counts = np.bincount(order[:, 1], minlength=4)
    assert counts.sum() == 10 and counts.min() >= 2
    assert np.array_equal(order, mix_indices([4], [2.5], seed=0))
    assert not np.array_equal(order, mix_indices([4], [2.5], seed=1))
    # 5 * 0.2 is 1.0000000000000002 in floats; it still means one pick.
    assert len(mix_indices([4, 5], [1, 0.2], seed=0)) == 4 + 1
    assert len(mix_indices([3, 7], [0, 0.5], seed=0)) == 4
    # None: concatenate (git_instruction x3), then shuffle.
    assert len(mix_indices([2, 5], None, dataset_types=["git_instruction", "flickr"])) == 6 + 5
    items = mix([["a", "b"], ["c"]], None, seed=0)
    assert sorted(items) == ["a", "b", "c"]
    assert mix([["a", "b"], ["c"]], [2, 3], seed=4) == mix([["a", "b"], ["c"]], [2, 3], seed=4)
    with pytest.raises(ValueError, match="2 dataset"):
        mix_indices([1, 2], [1.0])


def test_identical_order_on_every_rank(tmp_path, processor):
    write_image(tmp_path)
    recs = [record(f"<image>\nWhat is <bbox_location0>? ({k})", "a dog", human_boxes=[(k, k, 30 + k, 30 + k)],
                   id=f"r{k}") for k in range(4)]
    path = write_json(tmp_path / "vg_object.json", recs)
    ranks = [GritDataset([path], [str(tmp_path)], processor, DataOptions(seed=7), data_multiple=[2.5])
             for _ in range(2)]
    assert len(ranks[0]) == 10
    assert np.array_equal(ranks[0].order, ranks[1].order)
    for i in range(len(ranks[0])):
        a, b = ranks[0][i], ranks[1][i]
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert all(torch.equal(x, y) for x, y in zip(a["region_masks"], b["region_masks"]))
    other = GritDataset([path], [str(tmp_path)], processor, DataOptions(seed=8), data_multiple=[2.5])
    assert not np.array_equal(ranks[0].order, other.order)
    # A new epoch re-draws the point/box choices, identically on every rank.
    before = [ranks[0].example(i).regions for i in range(len(ranks[0]))]
    for rank in ranks:
        rank.set_epoch(1)
    after = [ranks[0].example(i).regions for i in range(len(ranks[0]))]
    assert after == [ranks[1].example(i).regions for i in range(len(ranks[1]))] and after != before


# ----------------------------------------------------------------------------------------------------------
# Bad records: the validator and the dataset


def broken_corpus(folder):
    """A vg_object file with one record per kind of problem (and 3 good ones), plus a non-list file."""
    write_image(folder)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    box, seg = (10, 5, 39, 34), blob(15, 10, 30, 30)
    q = "<image>\nWhat is <bbox_location0>?"

    def make(rec_id, **changes):
        rec = record(q, "a dog", human_boxes=[box], human_masks=[seg], id=rec_id)
        rec.update(changes)
        return rec

    off_mask = rle(blob(60, 40, 70, 50))
    small = rle(np.ones((10, 10), dtype=bool))
    records = [
        make("good-mask"),                                                            # 0
        record(q, "a dog", human_boxes=[box], id="good-nomask"),                      # 1
        make("missing", image="nope.png"),                                            # 2 missing_image
        make("corrupt", image="corrupt.png"),                                         # 3 unreadable_image
        record(q, "a dog", human_boxes=[box], id="size", image_w=100),                # 4 image_size_mismatch
        record(q, "a dog", human_boxes=[(200, 200, 250, 250)], id="outside"),         # 5 box_outside_image
        record(q, "a dog", human_boxes=[(50, 10, 20, 40)], id="degenerate"),          # 6 degenerate_box
        record("<image>\nWhat is <bbox_location1>?", "a dog", human_boxes=[box], id="range"),  # 7 placeholder
        record(q, "a dog", human_boxes=[box, box], id="unused"),                      # 8 unused_box (warning)
        make("nesting", masks=[[rle(seg)]]),                                          # 9 mask_nesting
        make("rle-garbage", masks=[[{"size": [H, W], "counts": "!!!!"}], []]),        # 10 bad_rle
        make("rle-size", masks=[[small], []]),                                        # 11 bad_rle
        make("rle-short", masks=[[{"size": [H, W], "counts": "0"}], []]),             # 12 bad_rle
        make("empty", masks=[[off_mask], []]),                                        # 13 empty_region
        {"id": "order", "image": "img.png", "image_w": W, "image_h": H, "box_x1y1x2y2": [[], []],
         "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "human", "value": "again"}]},  # 14
        record("What is it?", "a dog", id="no-image-token"),                          # 15 missing_image_token
        ["not", "a", "record"],                                                       # 16 not_a_record
    ]
    expected = {2: "missing_image", 3: "unreadable_image", 4: "image_size_mismatch", 5: "box_outside_image",
                6: "degenerate_box", 7: "placeholder_out_of_range", 9: "mask_nesting", 10: "bad_rle",
                11: "bad_rle", 12: "bad_rle", 13: "empty_region", 14: "turn_order", 15: "missing_image_token",
                16: "not_a_record"}
    path = write_json(folder / "vg_object_broken.json", records)
    not_list = write_json(folder / "vg_object_dict.json", {"records": records[:1]})
    return path, not_list, expected


def test_validator_reports_every_problem(tmp_path, capsys):
    path, not_list, expected = broken_corpus(tmp_path)
    code = V.main([path, not_list])
    out = capsys.readouterr().out
    assert code == 1
    for index, reason in expected.items():
        assert f"{path}:{index} " in out and f"error [{reason}]" in out
    assert f"{path}:8 id=unused warning [unused_box]" in out
    assert f"{not_list}:- error [not_a_list]" in out

    report = V.validate([path, not_list])
    errors = {(f.index, f.reason) for f in report.findings if f.severity == "error" and f.file == path}
    assert errors == set(expected.items())
    assert (report.files, report.records, report.ok, report.bad) == (2, 17, 3, 14)
    assert dict(report.errors_by_reason) == {
        "missing_image": 1, "unreadable_image": 1, "image_size_mismatch": 1, "box_outside_image": 1,
        "degenerate_box": 1, "placeholder_out_of_range": 1, "mask_nesting": 1, "bad_rle": 3, "empty_region": 1,
        "turn_order": 1, "missing_image_token": 1, "not_a_record": 1, "not_a_list": 1,
    }
    assert dict(report.warnings_by_reason) == {"unused_box": 2}  # records 7 (box 0 is never named) and 8
    assert "17 record(s): 3 ok, 14 bad" in out

    assert V.main([path, "--json"]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["records"] == 17 and summary["bad"] == 14 and summary["errors_by_reason"]["bad_rle"] == 3
    good = write_json(tmp_path / "vg_object_good.json", load_records(path)[:2])
    assert V.main([good]) == 0
    assert V.main(["train.json"]) == 1  # no type in the name: reported, not a crash
    assert "unknown_dataset_type" in capsys.readouterr().out


def test_dataset_skips_and_counts_bad_records(tmp_path, processor, caplog):
    path, _, expected = broken_corpus(tmp_path)
    dataset = GritDataset([path], [str(tmp_path)], processor, DataOptions())
    records = load_records(path)
    bad_records = set(expected)
    skipped = 0
    with caplog.at_level(logging.WARNING, logger="ferret.data.grit"):
        for i in range(len(dataset)):
            item = dataset[i]
            j = i  # the item actually returned: the first good one at or after i
            while dataset.source(j)[1] in bad_records:
                j, skipped = (j + 1) % len(dataset), skipped + 1
            k = dataset.source(j)[1]
            assert records[k]["id"] in ("good-mask", "good-nomask", "unused")
            assert torch.equal(item["input_ids"], dataset.encode(dataset.example(j))["input_ids"])
    assert dataset.bad_records == skipped > len(bad_records)
    assert sum(dataset.bad_by_reason.values()) == skipped and dataset.bad_by_reason["bad_rle"] >= 3
    assert f"{path} record 10: [bad_rle]" in caplog.text and "bad record(s) so far" in caplog.text

    strict = GritDataset([path], [str(tmp_path)], processor, DataOptions(max_bad_fraction=0.2))
    with pytest.raises(RuntimeError, match="more than max_bad_fraction=0.2"):
        for _ in range(20):
            for i in range(len(strict)):
                strict[i]
    assert strict.tried >= 200

    all_bad = write_json(tmp_path / "vg_object_allbad.json", [records[k] for k in sorted(bad_records)])
    dataset = GritDataset([all_bad], [str(tmp_path)], processor, DataOptions(max_consecutive_bad=3))
    with pytest.raises(RuntimeError, match="4 records in a row are bad"):
        dataset[0]
    assert dataset.bad_records == 4


def test_jsonl_bad_line_is_one_bad_record(tmp_path, processor):
    write_image(tmp_path)
    good = record("<image>\nWhat is <bbox_location0>?", "a dog", human_boxes=[(10, 5, 39, 34)])
    path = tmp_path / "vg_object.jsonl"
    path.write_text(json.dumps(good) + "\n{not json\n\n" + json.dumps(good) + "\n")
    dataset = GritDataset([str(path)], [str(tmp_path)], processor, DataOptions(seed=1))
    assert len(dataset) == 3
    for i in range(3):
        dataset[i]
    assert dataset.bad_by_reason == {"bad_json": dataset.bad_records} and dataset.bad_records == 1
    with pytest.raises(ValueError, match="line 2"):
        load_records(str(path))
    report = V.validate([str(path)])
    assert [(f.index, f.reason) for f in report.findings] == [(1, "bad_json")]


def test_length_estimates_follow_the_records(tmp_path, processor):
    from ferret.data.toy import make_world

    make_world(tmp_path, num_train=12, num_val=0, num_test=0, image_size=56, seed=1)
    dataset = GritDataset([str(tmp_path / "train.json")], [str(tmp_path)], processor, DataOptions(),
                          dataset_types=["toy"])
    lengths = dataset.lengths
    assert len(lengths) == len(dataset)
    actual = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    # Estimates are cheap (no tokenizer, no image) but must rank items like the real lengths do.
    order = np.argsort(lengths)
    assert np.corrcoef(lengths, actual)[0, 1] > 0.8
    assert actual[order[-1]] > actual[order[0]]


# ----------------------------------------------------------------------------------------------------------
# Hostile records: each is one named bad record for the validator AND the loader, never a dead process


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


def bomb_rle() -> dict:
    """An RLE declaring a 10^6 x 10^6 mask in a 141-byte counts string whose runs cover all 10^12 pixels (decoding
    it mallocs 10^12 bytes)."""
    from test_regions_decode import bomb

    return bomb()


def loader_verdicts(dataset) -> dict[int, str]:
    """What GritDataset decides about each record: {record index: reason} for those it rejects."""
    from ferret.data.grit import RecordError

    verdicts = {}
    for i in range(len(dataset)):
        try:
            dataset.encode(dataset.example(i))
        except RecordError as err:
            verdicts[dataset.source(i)[1]] = err.reason
    return verdicts


def test_no_image_record_with_a_referred_region_fails_validation_as_in_the_loader(tmp_path, processor):
    no_image = record("What is <bbox_location0>?", "a dog", human_boxes=[(10, 5, 39, 34)], image=None)
    gpt_only = record("Where is the dog?", "a dog <bbox_location0>", gpt_boxes=[(10, 5, 39, 34)], image=None)
    path = write_json(tmp_path / "vg_object.json", [no_image, gpt_only])
    report = V.validate([path])
    assert {(f.index, f.reason) for f in report.findings if f.severity == "error"} == {(0, "region_without_image")}
    dataset = GritDataset([path], [str(tmp_path)], processor, DataOptions(seed=0))
    assert loader_verdicts(dataset) == {0: "region_without_image"}
    # Without region features the region is only coordinates: both accept it.
    assert not V.validate([path], region_feature=False).has_errors
    assert V.main([path, "--no-region-feature"]) == 0
    coords = GritDataset([path], [str(tmp_path)], processor, DataOptions(add_region_feature=False))
    assert loader_verdicts(coords) == {}


def test_deeply_nested_json_is_one_named_bad_record(tmp_path, processor, capsys):
    write_image(tmp_path)
    good = record("<image>\nWhat is <bbox_location0>?", "a dog", human_boxes=[(10, 5, 39, 34)])
    text = json.dumps(good)
    field = text[:-1] + ', "extra": ' + deep(100_000) + "}"
    # a .json list whose record 1 holds a 100,000-level field, and a .json file that is one deep list
    listed = tmp_path / "vg_object_list.json"
    listed.write_text("[" + text + ", " + field + ", " + text + "]")
    whole = tmp_path / "vg_object_whole.json"
    whole.write_text(deep(100_000))
    lines = tmp_path / "vg_object.jsonl"
    lines.write_text(text + "\n" + deep(100_000) + "\n" + field + "\n" + text + "\n")

    code = V.main([str(listed), str(whole), str(lines)])
    out = capsys.readouterr().out
    assert code == 1 and "Traceback" not in out and "RecursionError" not in out
    report = V.validate([str(listed), str(whole), str(lines)])
    errors = {(f.file, f.index, f.reason) for f in report.findings}
    assert errors == {(str(listed), 1, "too_deep"), (str(whole), 0, "too_deep"), (str(lines), 1, "too_deep"),
                      (str(lines), 2, "too_deep")}
    assert f"{listed}:1 error [too_deep] the JSON is nested deeper than" in out

    for path, bad in ((listed, {1}), (lines, {1, 2})):
        dataset = GritDataset([str(path)], [str(tmp_path)], processor, DataOptions(seed=0))
        assert set(loader_verdicts(dataset)) == bad
        assert set(loader_verdicts(dataset).values()) == {"too_deep"}
        for i in range(len(dataset)):
            assert dataset[i]["input_ids"].numel() > 0
        assert len(dataset.lengths) == len(dataset)
    with pytest.raises(ValueError, match="line 2: the JSON is nested deeper"):
        load_records(str(lines))
    obj = tmp_path / "vg_object_obj.json"
    obj.write_text('{"a": ' + deep(100_000) + "}")
    assert [(f.index, f.reason) for f in V.validate([str(obj)]).findings] == [(None, "bad_json")]
    with pytest.raises(ValueError, match="not a JSON list"):
        GritDataset([str(obj)], [str(tmp_path)], processor, DataOptions())


def test_length_estimates_skip_what_the_loader_skips(tmp_path, processor):
    write_image(tmp_path)
    good = record("<image>\nWhat is <bbox_location0>?", "a dog", human_boxes=[(10, 5, 39, 34)])
    malformed = [
        {**good, "conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "x"}]},
        {**good, "conversations": 7},
        {**good, "box_x1y1x2y2": 3},
        {**good, "box_x1y1x2y2": [3, [1]]},
        {**good, "conversations": [7, 8]},
        [1, 2],
        "text",
    ]
    path = tmp_path / "vg_object.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good, *malformed]) + "\n{broken\n")
    dataset = GritDataset([str(path)], [str(tmp_path)], processor, DataOptions(seed=0))
    lengths = [dataset.lengths[dataset.order[:, 1].tolist().index(k)] for k in range(len(dataset))]
    assert lengths[0] == processor.num_image_tokens + (len(good["conversations"][0]["value"]) + 5) // 4 + 18
    assert lengths[1:] == [0] * 8
    assert set(loader_verdicts(dataset)) == set(range(1, 9))


def test_rle_bomb_and_huge_declared_image_are_named_bad_records_in_milliseconds(tmp_path, processor):
    import time

    write_image(tmp_path)
    with_bomb = record("<image>\nWhat is <bbox_location0>?", "a dog", human_boxes=[(10, 5, 39, 34)])
    with_bomb["masks"] = [[bomb_rle()], []]
    # no image, a box in the answer: the declared size alone sets the frame
    huge = record("Where is the dog?", "a dog <bbox_location0>", gpt_boxes=[(10, 5, 39, 34)], image=None,
                  image_w=1_000_000, image_h=1_000_000)
    bomb_no_image = {**huge, "image_w": 100, "image_h": 100, "masks": [[], [bomb_rle()]]}
    fraction = record("<image>\nWhat is <bbox_location0>?", "a dog", human_boxes=[(10, 5, 39, 34)])
    fraction["masks"] = [[{"size": [H, W], "counts": [3136.5, W * H - 3136.5]}], []]
    good = record("<image>\nWhat is <bbox_location0>?", "a dog", human_boxes=[(10, 5, 39, 34)],
                  human_masks=[blob(12, 8, 30, 30)])
    path = write_json(tmp_path / "vg_object.json", [with_bomb, huge, bomb_no_image, fraction, good])

    start = time.perf_counter()
    report = V.validate([path])
    elapsed = time.perf_counter() - start
    found = {(f.index, f.reason) for f in report.findings if f.severity == "error"}
    assert found == {(0, "bad_rle"), (1, "image_too_large"), (2, "bad_rle"), (3, "bad_rle")}
    messages = {f.index: f.message for f in report.findings if f.reason in ("bad_rle", "image_too_large")}
    assert "differs from the image's [60, 80]" in messages[0]
    assert "1000000x1000000 is 1000000000000 pixels" in messages[1]
    assert "differs from the image's [100, 100]" in messages[2]
    assert "must be integers, run 0 is 3136.5" in messages[3]
    assert elapsed < 1.0  # a guard: nothing the declared size is allocated

    dataset = GritDataset([path], [str(tmp_path)], processor, DataOptions(seed=0))
    start = time.perf_counter()
    verdicts = loader_verdicts(dataset)
    assert verdicts == {0: "bad_rle", 1: "image_too_large", 2: "bad_rle", 3: "bad_rle"}
    assert time.perf_counter() - start < 2.0


def test_skips_are_counted_per_distinct_record(tmp_path, processor):
    write_image(tmp_path)
    good = record("<image>\nWhat is <bbox_location0>?", "a dog", human_boxes=[(10, 5, 39, 34)])
    bad = {**good, "image": "missing.png"}
    path = write_json(tmp_path / "vg_object.json", [good, bad, bad, good])
    dataset = GritDataset([path], [str(tmp_path)], processor, DataOptions(seed=0), data_multiple=[3])
    for _ in range(2):
        for i in range(len(dataset)):
            dataset[i]
    # each bad record is tried many times (3 copies, replaced by the next item, 2 passes), named once
    assert dataset.bad_records > 2
    assert dataset.bad_seen == {(path, 1): "missing_image", (path, 2): "missing_image"}


def test_refer_as_decides_the_form_of_each_human_turn(tmp_path, processor, capsys):
    write_image(tmp_path)
    box, seg = (10, 10, 49, 49), blob(20, 12, 40, 45)
    records = [
        record("<image>\nWhat is <bbox_location0>?", "a dog", human_boxes=[box], human_masks=[seg], id=form,
               refer_as=[form, None])
        for form in ("point", "box", "free_form")
    ]
    path = write_json(tmp_path / "vg_object.json", records)
    dataset = GritDataset([path], [str(tmp_path)], processor, DataOptions(point_input_sample="center"))
    forms = {dataset.example(i).record["id"]: dataset.example(i) for i in range(len(dataset))}
    assert forms["point"].regions[0] == [Point(29.5, 29.5)]  # the box centre, as point_input_sample says
    assert forms["box"].regions[0] == [Box(*box)]
    # a free-form region is its box limited by its segmentation: the feature mask is the segmentation
    free = forms["free_form"]
    assert free.regions[0] == [Box(*box)]
    i = [dataset.example(j).record["id"] for j in range(len(dataset))].index("free_form")
    assert np.array_equal(dataset[i]["region_masks"][0].numpy(), seg)

    bad = record("<image>\nWhat is <bbox_location0>?", "a dog", human_boxes=[box], refer_as=["scribble", None])
    checked = check_record(bad, "vg_object", (W, H))
    assert [p.reason for p in checked.errors] == ["bad_refer_as"]
    assert "'point'" in checked.errors[0].message and "scribble" in checked.errors[0].message
