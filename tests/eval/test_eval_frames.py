"""Evaluation's region path: one encode per query, the original's Ferret-Bench numbers, scoring in the model's frame.

No model is needed: the processor fixture (a tiny tokenizer) is enough.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ferret.eval import ferret_bench, refexp
from ferret.eval.common import PredictionStream, StreamAlignment, answer_boxes
from ferret.eval.inference import Answer, Query, default_record, encode_query
from ferret.eval.metrics import box_iou
from ferret.regions import Box, Point, to_grid


def _image(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(width * 7 + height)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------------
# Ferret-Bench: the original's int(v * 1000)


def test_bench_writes_the_original_grid_numbers_where_pixels_would_not():
    # 0.011 of a 40-pixel-wide image is 0.44 px: 0..1 -> pixels -> grid gives 10, the original int(0.011*1000) 11.
    assert to_grid(0.011 * 40, 40) == 10
    assert to_grid(0.009 * 50, 50) == 8
    assert ferret_bench.original_grid_text((0.011, 0.009, 0.619, 1.0)) == "[11, 9, 619, 999]"
    assert ferret_bench.original_grid_text((0.5, 0.022)) == "[500, 22]"


def test_bench_question_through_the_processor(processor):
    image = _image(40, 50)
    [query] = ferret_bench.bench_queries(
        [{"question_id": 3, "image": "x.jpg", "text": "What is [0.011, 0.009, 0.619, 0.5] and [0.022, 0.018]?"}],
        "unused")
    prompt, encoded = encode_query(processor, query, image)
    assert prompt == "What is [11, 9, 619, 500] <region_fea> and [22, 18] <region_fea>?"
    # the masks are the original's: the box at int(v * W) pixels, the point's 11x11 window at int(v * W)
    box_mask, point_mask = (m.numpy() for m in encoded["region_masks"])
    ys, xs = np.nonzero(box_mask)
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == (int(0.011 * 40), int(0.009 * 50), int(0.619 * 40), 25)
    ys, xs = np.nonzero(point_mask)
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == (0, 0, int(0.022 * 40) + 5, int(0.018 * 50) + 5)
    # without region features the numbers stay the original's, with no <region_fea> and no mask
    prompt, encoded = encode_query(processor, query, image, region_feature=False)
    assert prompt == "What is [11, 9, 619, 500] and [22, 18]?"
    assert encoded["region_masks"] == []


def test_bench_question_in_pad_mode_uses_the_canvas(processor):
    processor.image_aspect_ratio = "pad"
    [query] = ferret_bench.bench_queries([{"question_id": 0, "image": "x.jpg", "text": "Is [0.5, 0.5] red?"}],
                                         "unused")
    prompt, _ = encode_query(processor, query, _image(1000, 500))
    assert prompt == "Is [500, 500] <region_fea> red?"  # (500, 250) px on the 1000x1000 canvas, 250 px down


# ---------------------------------------------------------------------------------------------------------
# One encode per query, identical to the processor's own batch path


@pytest.mark.parametrize("mode", ["square_nocrop", "pad"])
def test_encode_query_gives_the_processor_ids_and_masks(processor, mode):
    processor.image_aspect_ratio = mode
    image = _image(64, 40)
    regions = [Box(3, 4, 30, 20), Point(50, 10)]
    query = Query(image=image, prompt="What is <region0> next to <region1>?", output={"id": 1}, regions=regions)
    prompt, encoded = encode_query(processor, query, image)
    reference = processor([image], [query.prompt], regions=[regions])
    length = len(encoded["input_ids"])
    assert encoded["input_ids"].tolist() == reference["input_ids"][0, -length:].tolist()
    assert reference["attention_mask"][0, :-length].sum() == 0
    assert len(encoded["region_masks"]) == len(reference["region_masks"][0]) == 2
    canvas = (40, 64) if mode == "square_nocrop" else (64, 64)  # pad: masks on the padded square
    for ours, theirs in zip(encoded["region_masks"], reference["region_masks"][0]):
        assert ours.shape == canvas and bool((ours == theirs).all())
    assert prompt.count("<region_fea>") == 2


def test_encode_query_formats_once(processor, monkeypatch):
    calls = []
    original = type(processor).format_turn

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(processor), "format_turn", counting)
    image = _image(32, 32)
    encode_query(processor, Query(image=image, prompt="a <region0>", output={}, regions=[Box(1, 1, 9, 9)]), image)
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------------------
# Scoring in the model's frame


def test_perfect_answer_in_pad_mode_scores_iou_1(processor):
    """A 1000x500 image padded to a 1000x1000 canvas (250 px above and below): the truth (200, 300)-(400, 490)
    sits at (200, 550)-(400, 740) on the canvas, so a perfect answer says [200, 550, 400, 740]."""
    processor.image_aspect_ratio = "pad"
    text = "the dog [200, 550, 400, 740]"
    query = Query(image="dog.jpg", prompt="Where is the dog?", output={"image_id": 1, "width": 1000, "height": 500})
    record = default_record(Answer(query, "Where is the dog?", text, (1000, 500),
                                   processor.post_process(text, (1000, 500))[1]))
    assert record["regions"] == [{"phrase": "the dog", "box": [200.0, 300.0, 400.0, 490.0], "span": [8, 28]}]
    truth = (200.0, 300.0, 400.0, 490.0)
    assert box_iou(answer_boxes(record, 1000, 500)[0].box, truth) == 1.0
    # read in the original's square frame instead, y becomes 550 * 500 / 1000 = 275 .. 370: the boxes share
    # 200 x 70 px of 200 x 190 + 200 x 95 - 200 x 70, IoU 14000 / 43000
    assert answer_boxes(text, 1000, 500)[0].box == (200.0, 275.0, 400.0, 370.0)
    assert box_iou(answer_boxes(text, 1000, 500)[0].box, truth) == pytest.approx(14000 / 43000)

    annotations = {"images": [{"id": 1, "file_name": "dog.jpg", "caption": "the dog", "dataset_name": "refcoco",
                               "width": 1000, "height": 500}],
                   "annotations": [{"id": 1, "image_id": 1, "bbox": [200, 300, 200, 190]}]}
    metrics = refexp.score_refexp(annotations, [json.loads(json.dumps(record))])
    assert metrics["results"]["refcoco"]["acc@0.5"] == 1.0
    del record["regions"]  # the same answer without its stored regions is read in the square frame: a miss
    assert refexp.score_refexp(annotations, [record])["results"]["refcoco"]["acc@0.5"] == 0.0


def test_original_prediction_files_are_parsed_in_the_square_frame():
    # no "regions" field: the text is read on the image size, as the original's checkpoints answer
    [found] = answer_boxes({"text": "a cat [100, 200, 500, 600]"}, 200, 100)
    assert found.box == (20.0, 20.0, 100.0, 60.0) and found.phrase == "a cat"
    [point] = answer_boxes({"regions": [{"phrase": "x", "point": [3, 4]}]}, 10, 10)
    assert point.box == (3.0, 4.0, 3.0, 4.0) and point.is_point
    for bad in ([{"phrase": "x"}], [{"box": [1, 2, 3]}], "nope", [{"point": [1, "2"]}]):
        with pytest.raises(ValueError):
            answer_boxes({"text": "", "regions": bad}, 10, 10)


def test_prediction_stream_counts_unparseable_lines_by_kind(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": 1, "text": "a"}\nnot json\n[1, 2]\n{"text": "no id"}\n\n{"id": 1, "text": "dup"}\n'
                    '{"id": 9, "text": "stranger"}\n{"id": 2, "tex')
    stream = PredictionStream(path)
    alignment = StreamAlignment([{"id": 1}, {"id": 2}, {"id": 3}], lambda item: item["id"], "item")
    pairs = list(alignment.pairs(stream, lambda record: record["id"]))
    assert [(item["id"], record["text"]) for item, record in pairs] == [(1, "a")]
    assert stream.report() == {"read": 4, "unparseable": {"invalid_json": 2, "no_key": 1, "not_an_object": 1},
                               "unparseable_total": 4}
    assert alignment.report() == {"evaluated": 1, "missing": 2, "unexpected": 1, "duplicates": 1,
                                  "complete": False}
    assert alignment.missing == [2, 3]


def test_segmentations_are_checked_before_they_are_decoded():
    import time

    from ferret.eval.common import decode_segmentation
    from ferret.eval.lvis import free_shape_mask

    bomb = {"size": [1000000, 1000000], "counts": "0" * 148}
    start = time.perf_counter()
    declared = r"record 3: RLE size \[h, w\] = \[1000000, 1000000\] differs from the image's \[10, 20\]"
    with pytest.raises(ValueError, match=declared):
        decode_segmentation(bomb, 20, 10, "record 3")
    with pytest.raises(ValueError, match="RLE size"):
        free_shape_mask(bomb, 20, 10, "LVIS record 3")
    with pytest.raises(ValueError, match=r"shaped \[W, H\] = \[20, 10\]"):
        free_shape_mask([[0] * 10] * 21, 20, 10, "LVIS record 3")
    assert time.perf_counter() - start < 1.0
    square = decode_segmentation([[2, 2, 6, 2, 6, 6, 2, 6], [10, 1, 12, 1, 12, 3]], 20, 10)
    assert square.shape == (10, 20) and square[2:7, 2:7].all() and square[1, 10]
