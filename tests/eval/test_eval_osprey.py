"""Osprey's referring object classification: file format, Semantic IoU by hand, Semantic Similarity with a tiny
sentence encoder built here (no download)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ferret.eval import osprey
from ferret.eval.common import PredictionStream
from ferret.regions import Box, FreeForm

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "stop", "sign", "dog", "ear", "cat", "it", "is"]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A sentence-transformers folder: a 1-layer BERT at the root, mean pooling, like all-MiniLM-L6-v2."""
    from transformers import BertConfig, BertModel, BertTokenizer

    root = tmp_path_factory.mktemp("encoder")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=32)
    BertModel(config).eval().save_pretrained(root)
    BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(root)
    (root / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 8, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
         "pooling_mode_max_tokens": False}))
    return root


def test_semantic_iou_and_cleaning_by_hand():
    assert osprey.semantic_iou("a stop sign", "stop sign") == pytest.approx(2 / 3)
    assert osprey.clean_answer("Category: stop sign.") == " stop sign "
    assert osprey.clean_answer("It is a dog [10, 20, 30, 40].") == "It is a dog "
    assert osprey.clean_category("dog:ear") == "dog ear" and osprey.clean_category("stop_sign") == "stop sign"
    assert osprey.semantic_iou("Dog", "dog ear") == pytest.approx(1 / 2)
    assert osprey.semantic_iou("", "") == 0.0


def test_sentence_similarity_with_a_local_encoder(encoder_dir):
    from transformers import AutoTokenizer, BertModel

    encoder = osprey.SentenceEncoder(str(encoder_dir))
    assert encoder.pooling == "mean"
    same = encoder.similarity(["stop sign"], ["stop sign"])
    assert same[0] == pytest.approx(1.0, abs=1e-6)
    # by hand: mean of the last hidden states over [CLS] a dog [SEP] and [CLS] cat [SEP], then the cosine
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    model = BertModel.from_pretrained(encoder_dir).eval()
    with torch.no_grad():
        a = model(**tokenizer("a dog", return_tensors="pt")).last_hidden_state[0].mean(0).numpy()
        b = model(**tokenizer("cat", return_tensors="pt")).last_hidden_state[0].mean(0).numpy()
    expected = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert encoder.similarity(["a dog", "it is"], ["cat", "it is"]) == pytest.approx([expected, 1.0], abs=1e-5)


def test_score_osprey_predictions(encoder_dir, tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text(
        '{"id": "0_0", "category": "stop_sign", "text": "stop sign"}\n'
        '{"id": "0_1", "category": "dog:ear", "text": "a dog."}\n'
        '{"id": "0_1", "category": "dog:ear", "text": "ear"}\n'  # duplicate: ignored
        '{"id": "1_0", "text": "cat"}\n'  # no category
        "oops\n")
    metrics = osprey.score_osprey(PredictionStream(path), osprey.SentenceEncoder(str(encoder_dir)), "osprey_paco")
    r = metrics["results"]
    # IoU: {stop, sign} = {stop, sign} -> 1; {a, dog} vs {dog, ear} -> 1/3
    assert r["n"] == 2 and r["semantic_iou"] == pytest.approx(100 * (1 + 1 / 3) / 2)
    encoder = osprey.SentenceEncoder(str(encoder_dir))
    expected = encoder.similarity(["stop sign", "a dog "], ["stop sign", "dog ear"])
    assert r["semantic_similarity"] == pytest.approx(100 * sum(expected) / 2)
    assert metrics["predictions_read"]["unparseable"] == {"invalid_json": 1, "no_category": 1}
    assert metrics["duplicates"] == 1
    assert osprey.main(["score", "--predictions", str(path), "--dataset", "lvis"]) == 0  # IoU only, no encoder
    saved = json.loads((tmp_path / "answers.metrics.json").read_text())
    assert saved["benchmark"] == "osprey_lvis" and "semantic_similarity" not in saved["results"]


def test_osprey_queries_from_the_published_format(tmp_path):
    entries = [{"file_name": "000000000139.jpg", "height": 10, "width": 20, "categories": ["stop_sign", "dog"],
                "annotations": [{"segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]], "bbox": [2, 2, 4, 4]},
                                {"segmentation": {"size": [10, 20], "counts": [25, 3, 7, 3, 162]}}]}]
    Image.new("RGB", (20, 10)).save(tmp_path / "000000000139.jpg")
    image = Image.open(tmp_path / "000000000139.jpg")
    first, second = osprey.osprey_queries(entries, tmp_path)
    assert first.prompt == osprey.QUESTION
    assert first.output == {"id": "0_0", "file_name": "000000000139.jpg", "category": "stop_sign", "prompt": None,
                            "text": None}
    [region], _ = first.resolve_regions(image)
    ys, xs = np.nonzero(region.mask)
    assert isinstance(region, FreeForm) and (xs.min(), ys.min(), xs.max(), ys.max()) == (2, 2, 6, 6)
    [region], _ = second.resolve_regions(image)  # column-major RLE: columns 2 and 3, rows 5..7
    ys, xs = np.nonzero(region.mask)
    assert sorted(set(xs.tolist())) == [2, 3] and sorted(set(ys.tolist())) == [5, 6, 7]
    [box_first, box_second] = osprey.osprey_queries(entries, tmp_path, region_format="box")
    assert box_first.resolve_regions(image)[0] == [Box(2.0, 2.0, 6.0, 6.0)]
    assert box_second.resolve_regions(image)[0] == [Box(2.0, 5.0, 3.0, 7.0)]  # no bbox: the mask's
    entries[0]["categories"].append("cat")
    with pytest.raises(ValueError, match="3 categories but 2 annotations"):
        osprey.osprey_queries(entries, tmp_path)
