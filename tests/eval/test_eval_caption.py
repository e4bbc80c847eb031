"""Captioning (COCO Karpathy test, RefCOCOg and Visual Genome regions): file formats, CIDEr by hand, METEOR."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ferret.eval import caption
from ferret.eval.common import PredictionStream
from ferret.regions import Box, FreeForm


def test_simple_tokenize_is_ptb_like():
    assert caption.simple_tokenize("A dog's ball.") == "a dog 's ball"
    assert caption.simple_tokenize("Don't run, kid!") == "do n't run kid"
    assert caption.simple_tokenize("A well-known 3.5 m sign...") == "a well-known 3.5 m sign"


def _karpathy(tmp_path):
    data = {"images": [
        {"filepath": "val2014", "filename": "a.jpg", "cocoid": 1, "split": "test",
         "sentences": [{"raw": "A dog runs.", "tokens": ["a", "dog", "runs"]}]},
        {"filepath": "val2014", "filename": "b.jpg", "cocoid": 2, "split": "test",
         "sentences": [{"raw": "A cat sleeps.", "tokens": ["a", "cat", "sleeps"]}]},
        {"filepath": "train2014", "filename": "c.jpg", "cocoid": 3, "split": "train", "sentences": [{"raw": "x"}]},
    ]}
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(data))
    return path


def test_cider_by_hand(tmp_path, monkeypatch):
    """Two images, one reference each. IDF = log(2 images / document frequency): "a" is in both references
    (weight 0), every other n-gram in one (weight log 2). Image 1 is answered word for word: cosine 1 for
    n = 1, 2, 3 and 0 for n = 4 (no 4-gram), no length penalty: (1 + 1 + 1 + 0) / 4 * 10 = 7.5. Image 2 shares
    only "a" (weight 0): 0. CIDEr = (7.5 + 0) / 2 = 3.75, reported x100."""
    monkeypatch.setattr(caption.shutil, "which", lambda name: None)  # no Java: simple tokenizer, METEOR skipped
    items = caption.load_items("coco", _karpathy(tmp_path))
    assert [(i.key, i.image, i.references) for i in items] == [("1", "val2014/a.jpg", ["A dog runs."]),
                                                               ("2", "val2014/b.jpg", ["A cat sleeps."])]
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"image_id": "1", "text": "A dog runs [10, 20, 300, 400]."}\n'
                     '{"image_id": "2", "text": "A bird flies."}\n{"image_id": "2"\n')
    metrics = caption.score_captions(items, PredictionStream(preds))
    assert metrics["results"]["CIDEr"] == pytest.approx(375.0)
    assert "METEOR" not in metrics["results"] and metrics["notes"] == [caption.METEOR_SKIPPED]
    assert metrics["tokenizer"] == "simple"
    assert metrics["predictions_read"]["unparseable"] == {"invalid_json": 1}
    with pytest.raises(RuntimeError, match="default-jre-headless"):
        caption.score_captions(items, [{"image_id": "1", "text": "a"}], meteor=True)


@pytest.mark.skipif(not caption.java_available(), reason="the PTB tokenizer needs a Java runtime")
def test_ptb_tokenizer_agrees_with_the_hand_computation(tmp_path):
    items = caption.load_items("coco", _karpathy(tmp_path))
    exact = caption.score_captions(items, [{"image_id": "1", "text": "A dog runs."},
                                           {"image_id": "2", "text": "A cat, sleeping"}], meteor=False)
    assert exact["tokenizer"] == "ptb"
    # image 1: 7.5 as above. Image 2, "a cat sleeping" against "a cat sleeps": unigrams {cat, sleeping} vs {cat,
    # sleeps} at weight log 2 each (and "a" at 0): cosine 1/2; bigrams {a cat, cat sleeping} vs {a cat, cat
    # sleeps}: 1/2; no common 3-gram; same length: (1/2 + 1/2 + 0 + 0) / 4 * 10 = 2.5. CIDEr (7.5 + 2.5) / 2 x100.
    assert exact["results"]["CIDEr"] == pytest.approx(500.0)


@pytest.mark.slow
@pytest.mark.skipif(not caption.java_available(), reason="METEOR needs a Java runtime")
def test_meteor_of_an_exact_caption_is_100():
    """METEOR 1.5: an answer equal to its reference has precision = recall = 1 and no fragmentation penalty."""
    item = caption.CaptionItem("1", "a.jpg", ["A dog runs on the beach."])
    metrics = caption.score_captions([item], [{"image_id": "1", "text": "a dog runs on the beach"}])
    assert metrics["results"]["METEOR"] == pytest.approx(100.0)
    assert metrics["notes"] == []


def test_coco_refcocog_and_vg_formats(tmp_path):
    coco = {"images": [{"id": 9, "file_name": "COCO_val2014_000000000009.jpg"}],
            "annotations": [{"image_id": 9, "id": 1, "caption": "one"}, {"image_id": 9, "id": 2, "caption": "two"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    [item] = caption.load_items("coco", tmp_path / "coco.json")
    assert (item.key, item.references) == ("9", ["one", "two"])

    refcocog = {"images": [{"id": 5, "file_name": "img.jpg", "width": 20, "height": 10, "caption": "the left cup"}],
                "annotations": [{"id": 77, "image_id": 5, "bbox": [2, 2, 4, 4],
                                 "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]]}]}
    (tmp_path / "refcocog.json").write_text(json.dumps(refcocog))
    [item] = caption.load_items("refcocog", tmp_path / "refcocog.json")
    assert (item.key, item.references, item.region["bbox"]) == ("77", ["the left cup"], [2, 2, 4, 4])
    Image.new("RGB", (20, 10)).save(tmp_path / "img.jpg")
    image = Image.open(tmp_path / "img.jpg")
    [box_query] = caption.caption_queries([item], tmp_path)
    assert box_query.prompt == caption.REGION_QUESTION and box_query.output["id"] == "77"
    assert box_query.resolve_regions(image)[0] == [Box(2.0, 2.0, 6.0, 6.0)]
    [mask_query] = caption.caption_queries([item], tmp_path, region_format="mask")
    [region], _ = mask_query.resolve_regions(image)
    assert isinstance(region, FreeForm)
    ys, xs = np.nonzero(region.mask)
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == (2, 2, 6, 6)  # the filled square polygon

    vg = [{"id": 1, "regions": [{"region_id": 11, "image_id": 1, "phrase": "a red kite", "x": 1, "y": 2,
                                 "width": 3, "height": 4}]}]
    (tmp_path / "vg.json").write_text(json.dumps(vg))
    [item] = caption.load_items("vg", tmp_path / "vg.json")
    assert (item.key, item.image, item.references, item.region) == ("11", "1.jpg", ["a red kite"],
                                                                   {"bbox": [1, 2, 3, 4]})
    with pytest.raises(ValueError, match="no coco item found in split 'val'"):
        caption.load_items("coco", _karpathy(tmp_path), split="val")
