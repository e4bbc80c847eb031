"""The evaluation suite's metrics, parsers and file handling, on hand-computed examples (no model, no network)."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ferret.eval import common, ferret_bench, flickr, lvis, metrics, pope, refexp

# --------------------------------------------------------------------------------------------------------
# IoU and friends


@pytest.mark.parametrize(
    "box1, box2, expected",
    [
        ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),  # identical
        ([0, 0, 10, 10], [20, 20, 30, 30], 0.0),  # disjoint
        ([0, 0, 10, 10], [10, 0, 20, 10], 0.0),  # touching along an edge: continuous convention
        ([0, 0, 10, 10], [2, 2, 7, 7], 25 / 100),  # contained
        ([0, 0, 10, 10], [5, 0, 15, 10], 50 / 150),  # half overlap
        ([5, 5, 5, 5], [0, 0, 10, 10], 0.0),  # zero-area (a point) inside a box
        ([0, 0, 0, 0], [0, 0, 0, 0], 0.0),  # two zero-area boxes: union 0, no NaN
        ([0, 0, 10, 0], [0, 0, 10, 10], 0.0),  # zero height
    ],
)
def test_box_iou_edge_cases(box1, box2, expected):
    value = metrics.box_iou(box1, box2)
    assert not math.isnan(value)
    assert value == pytest.approx(expected)
    assert metrics.box_iou(box2, box1) == pytest.approx(expected)


def test_box_iou_matrix_shape_and_values():
    ious = metrics.box_iou_matrix([[0, 0, 10, 10], [0, 0, 0, 0]], [[0, 0, 10, 10], [5, 0, 15, 10], [1, 1, 1, 1]])
    assert ious.shape == (2, 3)
    assert ious.ravel().tolist() == pytest.approx([1.0, 1 / 3, 0.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        metrics.box_iou_matrix([[0, 0, 1]], [[0, 0, 1, 1]])


def test_box_helpers():
    assert metrics.xywh_to_xyxy([1, 2, 3, 4]) == (1, 2, 4, 6)
    assert metrics.mean_box([[0, 0, 10, 10], [10, 20, 30, 40]]) == (5, 10, 20, 25)
    assert metrics.merge_boxes([[10, 5, 20, 30], [0, 10, 15, 40]]) == (0, 5, 20, 40)
    assert metrics.accuracy([0.5, 0.49, 0.9, 0.0]) == 0.5
    ranked = [[0.1, 0.6], [0.7], [0.2], []]
    assert metrics.recall_at_k(ranked, 1) == 1 / 4
    assert metrics.recall_at_k(ranked, 5) == 2 / 4
    assert metrics.recall_at_k(ranked, None) == 2 / 4


def test_answer_boxes_points_and_no_box():
    found = common.answer_boxes("a dog [100, 200, 300, 400] and its nose [500, 500].", 1000, 500)
    assert [b.box for b in found] == [(100, 100, 300, 200), (500, 250, 500, 250)]
    assert [b.is_point for b in found] == [False, True]
    assert found[0].phrase == "a dog"
    assert common.answer_boxes("I cannot tell.", 640, 480) == []


# --------------------------------------------------------------------------------------------------------
# RefCOCO


def _refexp_gt():
    images = []
    annotations = []

    def add(image_id, dataset, xywh, size=(1000, 1000)):
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "caption": "the thing", "dataset_name": dataset,
                       "width": size[0], "height": size[1]})
        annotations.append({"id": 100 + image_id, "image_id": image_id, "bbox": xywh, "category_id": 1})

    add(1, "refcoco", [10, 10, 40, 40], size=(100, 100))  # GT [10, 10, 50, 50] on a 100x100 image
    add(2, "refcoco", [100, 100, 200, 200])  # GT [100, 100, 300, 300]
    add(3, "refcoco", [100, 100, 200, 200])
    add(4, "refcoco", [100, 100, 200, 200])
    add(5, "refcoco", [100, 100, 200, 200])
    add(6, "refcoco", [100, 100, 200, 200])  # no prediction
    add(7, "refcoco+", [100, 100, 200, 200])
    annotations.reverse()  # annotations are matched to images by image_id, not position
    return {"images": images, "annotations": annotations}


REFEXP_PREDICTIONS = [
    # in shuffled order: alignment is by image_id
    {"image_id": 3, "text": "it [100, 100, 300, 300] and [700, 700, 900, 900]"},  # first hit, mean miss, any hit
    # first [60,60,90,90] IoU 0; second [10,10,50,50] IoU 1; mean [35,35,70,70] IoU 225/2600
    {"image_id": 1, "text": "the thing [600, 600, 900, 900], the thing [100, 100, 500, 500]."},
    # first IoU 16000/40000 = 0.4; second [140,100,320,300] IoU 32000/44000; mean [120,100,250,300] IoU 0.65
    {"image_id": 2, "text": "[100, 100, 180, 300] [140, 100, 320, 300]"},
    {"image_id": 4, "text": "Sorry, I cannot find it."},  # no box: zero box, kept in the denominator
    {"image_id": 5, "text": "the thing [200, 200]"},  # a point: zero-size box, IoU 0
    {"image_id": 7, "text": "[100, 100, 300, 300]"},
    {"image_id": 7, "text": "[0, 0, 1, 1]"},  # a duplicate: the first one is kept
]


def test_refexp_first_mean_upper_bound_differ():
    result = refexp.score_refexp(_refexp_gt(), REFEXP_PREDICTIONS, split="val")
    r = result["results"]["refcoco_val"]
    assert r["n"] == 5
    assert r["acc@0.5"] == pytest.approx(1 / 5)  # image 3
    assert r["acc@0.5_mean_box"] == pytest.approx(1 / 5)  # image 2
    assert r["acc@0.5_upper_bound"] == pytest.approx(3 / 5)  # images 1, 2, 3
    assert r["no_box"] == 1 and r["point_answers"] == 1
    plus = result["results"]["refcoco+_val"]
    assert (plus["n"], plus["acc@0.5"]) == (1, 1.0)
    assert result["alignment"] == {"evaluated": 6, "missing": 1, "unexpected": 0, "duplicates": 1,
                                   "complete": False}


def test_refexp_rejects_image_with_two_annotations():
    gt = _refexp_gt()
    gt["annotations"].append({"id": 999, "image_id": 2, "bbox": [0, 0, 1, 1]})
    with pytest.raises(ValueError, match="image id 2 .* 2 annotations"):
        refexp.score_refexp(gt, REFEXP_PREDICTIONS)


def test_refexp_split_from_filename():
    assert refexp.split_from_filename("data/finetune_refcoco+_testA.json") == "testA"
    assert refexp.split_from_filename("finetune_refcocog_val.json") == "val"
    assert refexp.split_from_filename("other.json") is None


# --------------------------------------------------------------------------------------------------------
# Flickr30k Entities

CAPTION = "A man in a red shirt holds two dogs ."


def _span(text):
    start = CAPTION.index(text)
    return [[start, start + len(text)]]


def _flickr_gt():
    image = {"id": 0, "file_name": "1000.jpg", "caption": CAPTION, "original_img_id": 1000, "sentence_id": 0,
             "width": 1000, "height": 1000,
             "tokens_positive_eval": [_span("A man"), _span("a red shirt"), _span("two dogs")]}
    annotations = [
        {"id": 1, "image_id": 0, "bbox": [10, 10, 90, 190], "tokens_positive": _span("A man")},
        {"id": 2, "image_id": 0, "bbox": [30, 50, 40, 50], "tokens_positive": _span("a red shirt")},
        # two boxes for one phrase: merged into [200, 300, 500, 400]
        {"id": 3, "image_id": 0, "bbox": [200, 300, 100, 100], "tokens_positive": _span("two dogs")},
        {"id": 4, "image_id": 0, "bbox": [400, 300, 100, 100], "tokens_positive": _span("two dogs")},
    ]
    return {"images": [image], "annotations": annotations}


# The dogs: the first box covers one dog only (IoU 1/3 with the merged box), the second the merged box.
FLICKR_ANSWER = ("A man [10, 10, 100, 200] in a red shirt [30, 50, 70, 100] holds two dogs "
                 "[200, 300, 300, 400] [200, 300, 500, 400].")


def test_flickr_merged_gt_and_phrase_matching():
    predictions = [{"image_id": 1000, "sentence_id": 0, "text": FLICKR_ANSWER}]
    result = flickr.score_flickr(_flickr_gt(), predictions)
    assert list(result["results"]) == ["all"]
    r = result["results"]["all"]
    assert r["n"] == 3
    assert r["recall@1"] == pytest.approx(2 / 3)
    assert r["recall@5"] == r["recall@10"] == r["upper_bound"] == 1.0
    # "A man" matches exactly; the parser's "in a red shirt" and "holds two dogs" match by whole words.
    assert result["phrase_matching"] == {"exact": 1, "fallback": 2, "none": 0}

    strict = flickr.score_flickr(_flickr_gt(), predictions, strict=True)
    assert strict["results"]["all"]["recall@1"] == pytest.approx(1 / 3)
    assert strict["phrase_matching"] == {"exact": 1, "fallback": 0, "none": 2}


def test_flickr_no_box_answer_scores_zero_and_is_kept():
    result = flickr.score_flickr(_flickr_gt(), [{"image_id": "1000", "sentence_id": 0, "text": "I see nothing."}])
    assert result["results"]["all"]["n"] == 3
    assert result["results"]["all"]["upper_bound"] == 0.0
    assert result["phrase_matching"]["none"] == 3


def test_flickr_sentence_parsing():
    sentence, phrases = flickr.parse_sentence(
        "[/EN#18/people A man] in [/EN#19/clothing/other a red  shirt] holds [/EN#20/animals two dogs] ."
    )
    assert sentence == CAPTION
    assert [(p.phrase, p.phrase_id, p.phrase_types, p.first_word_index) for p in phrases] == [
        ("A man", "18", ("people",), 0),
        ("a red shirt", "19", ("clothing", "other"), 3),
        ("two dogs", "20", ("animals",), 7),
    ]


def test_flickr_phrase_types_from_entities_folder(tmp_path):
    (tmp_path / "Sentences").mkdir()
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Sentences" / "1000.txt").write_text(
        "Another sentence about [/EN#18/people a man] .\n"
        "[/EN#18/people A man] in [/EN#19/clothing a red shirt] holds [/EN#20/animals two dogs] .\n"
    )
    objects = "".join(
        f"<object><name>{pid}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax>"
        f"<ymax>{y2}</ymax></bndbox></object>"
        for pid, (x1, y1, x2, y2) in [("18", (10, 10, 100, 200)), ("19", (30, 50, 70, 100)),
                                      ("20", (200, 300, 300, 400)), ("20", (400, 300, 500, 400))]
    )
    (tmp_path / "Annotations" / "1000.xml").write_text(
        f"<annotation><size><width>1000</width><height>1000</height><depth>3</depth></size>{objects}"
        "<object><name>21</name><nobndbox>1</nobndbox><scene>1</scene></object></annotation>"
    )
    assert flickr.read_entity_boxes(tmp_path / "Annotations" / "1000.xml")["20"] == [
        (200, 300, 300, 400), (400, 300, 500, 400)]
    gt = _flickr_gt()
    gt["images"][0]["sentence_id"] = 1
    predictions = [{"image_id": 1000, "sentence_id": 1, "text": FLICKR_ANSWER}]
    result = flickr.score_flickr(gt, predictions, entities=flickr.FlickrEntities(tmp_path))
    r = result["results"]
    assert list(r) == ["all", "animals", "clothing", "people"]
    assert (r["people"]["n"], r["people"]["recall@1"]) == (1, 1.0)
    assert (r["animals"]["recall@1"], r["animals"]["recall@5"]) == (0.0, 1.0)
    assert r["all"]["recall@1"] == pytest.approx(2 / 3)
    assert result["phrases_without_type"] == 0


# --------------------------------------------------------------------------------------------------------
# LVIS referring classification


@pytest.mark.parametrize(
    "text, name, expected",
    [
        ("It is not a cat, it is a dog.", "dog", True),
        ("It is not a cat, it is a dog.", "cat", False),
        ("No, it is not a dog.", "dog", False),
        ("It is a dog, not a cat.", "cat", False),
        ("It isn't a cat; it's a dog", "cat", False),
        ("The object facing north is a cat.", "cat", True),  # "north" is not a negation
        ("It is a notebook.", "book", False),  # whole words only
        ("It is a notebook, not a book.", "notebook", True),
        ("This is a category label.", "cat", False),
        ("Two dogs.", "dog", True),  # plural
        ("A Teddy Bear.", "teddy_bear", True),
    ],
)
def test_lvis_negation_and_whole_words(text, name, expected):
    assert lvis.is_correct(text, name, []) is expected


def test_lvis_names_and_original_regex_contrast():
    assert lvis.class_names("bow_(weapon)", ["Sports_Ball", "bow"]) == ["bow", "weapon", "sports ball"]
    # the original's r"\s+no[^,.]*[,.]" removed " north is a cat." entirely
    assert "cat" in lvis.remove_negations("The object facing north is a cat.")
    assert lvis.remove_negations("It is not a cat, it is a dog.") == "It is  , it is a dog."


def test_lvis_accuracy_per_region_type():
    predictions = [
        {"id": 1, "name": "dog", "synonyms": ["pup"], "neg_class": "cat", "region_format": "point",
         "text": "It is a pup."},
        {"id": 2, "name": "dog", "synonyms": [], "neg_class": "cat", "region_format": "point",
         "text": "It is a cat."},
        {"id": 3, "name": "dog", "synonyms": [], "neg_class": "cat", "region_format": "box",
         "text": "It is a dog or a cat."},
        {"id": 4, "name": "book", "synonyms": [], "neg_class": "cup", "text": "A notebook."},
    ]
    result = lvis.score_lvis(predictions, region_format="free_shape")
    r = result["results"]
    assert (r["all"]["n"], r["all"]["correct"], r["all"]["accuracy"]) == (4, 2, 0.5)
    assert r["point"]["accuracy"] == 0.5
    assert r["box"] == {"n": 1, "accuracy": 1.0, "correct": 1, "both_mentioned": 1}
    assert r["free_shape"]["accuracy"] == 0.0
    # with annotations: matched by id, missing ones reported
    annotations = [{"id": i, "name": "dog", "synonyms": []} for i in (1, 2, 5)]
    aligned = lvis.score_lvis(predictions, annotations)
    assert aligned["alignment"]["missing"] == 1 and aligned["results"]["all"]["n"] == 2


# --------------------------------------------------------------------------------------------------------
# POPE

POPE_CASES = [  # (label, answer, decided)
    ("yes", "Yes, there is a dog in the image.", "yes"),  # TP
    ("yes", "There is a dog in the image.", "yes"),  # TP
    ("yes", "No, there is no dog.", "no"),  # FN
    ("no", "There isn't a cat.", "no"),  # TN (the original said yes)
    ("no", "No!", "no"),  # TN (the original said yes)
    ("no", "Yes, there is a cat, not a dog.", "yes"),  # FP (the original said no)
    ("yes", "The image shows a notebook. There is no pen.", "yes"),  # TP: first sentence only, "notebook"
    ("yes", "I cannot see a bus", "no"),  # FN
]


def test_pope_decisions_and_confusion_matrix():
    assert [pope.decide_yes_no(a) for _, a, _ in POPE_CASES] == [d for _, _, d in POPE_CASES]
    questions = [{"question_id": i, "text": "Is there a ...?", "label": label} for i, (label, _, _) in
                 enumerate(POPE_CASES)]
    predictions = [{"question_id": i, "answer": a} for i, (_, a, _) in enumerate(POPE_CASES)]
    result = pope.score_pope(questions, list(reversed(predictions)))
    r = result["results"]
    assert result["aligned_by"] == "question_id"
    assert (r["TP"], r["FP"], r["TN"], r["FN"]) == (3, 1, 2, 2)
    assert r["accuracy"] == pytest.approx(5 / 8)
    assert r["precision"] == pytest.approx(3 / 4)
    assert r["recall"] == pytest.approx(3 / 5)
    assert r["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert r["yes_ratio"] == pytest.approx(4 / 8)


def test_pope_order_alignment_needs_equal_lengths():
    questions = [{"label": "yes"}, {"label": "no"}]
    assert pope.score_pope(questions, [{"text": "Yes"}, {"text": "No"}])["results"]["accuracy"] == 1.0
    with pytest.raises(ValueError, match="1 predictions for 2 questions"):
        pope.score_pope(questions, [{"text": "Yes"}])


def test_pope_degenerate_ratios_are_zero():
    r = pope.confusion_metrics(["no", "no"], ["no", "no"])
    assert (r["precision"], r["recall"], r["f1"], r["accuracy"]) == (0.0, 0.0, 0.0, 1.0)


# --------------------------------------------------------------------------------------------------------
# Prediction files and metric files


def _write_jsonl(path: Path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_chunks_merge_in_numeric_order(tmp_path, caplog):
    folder = tmp_path / "preds"
    folder.mkdir()
    for k in (10, 2, 1):
        _write_jsonl(folder / f"{k}_of_12.jsonl", [{"chunk": k}])
    (folder / "notes.txt").write_text("not a prediction")
    assert [r["chunk"] for r in common.load_predictions(folder)] == [1, 2, 10]
    assert "missing" in caplog.text  # chunks 0, 3..9, 11 are absent
    _write_jsonl(folder / "0_of_8.jsonl", [{"chunk": 0}])
    with pytest.raises(ValueError, match="different totals"):
        common.load_predictions(folder)


def test_incomplete_last_line_is_skipped_but_middle_errors_raise(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3')
    assert common.read_jsonl(path) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\nnot json\n{"a": 3}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2"):
        common.read_jsonl(path)


def test_metrics_file_goes_beside_predictions(tmp_path):
    assert common.metrics_path(tmp_path / "runs" / "refcoco_val") == tmp_path / "runs" / "refcoco_val.metrics.json"
    assert common.metrics_path(str(tmp_path / "runs" / "refcoco_val") + "/") == \
        tmp_path / "runs" / "refcoco_val.metrics.json"
    assert common.metrics_path(tmp_path / "pope.jsonl") == tmp_path / "pope.metrics.json"


def test_refexp_cli_twice_never_reads_its_metrics(tmp_path):
    annotation = tmp_path / "finetune_refcoco_val.json"
    annotation.write_text(json.dumps(_refexp_gt()))
    folder = tmp_path / "refcoco_val"
    folder.mkdir()
    _write_jsonl(folder / "0_of_2.jsonl", REFEXP_PREDICTIONS[:3])
    _write_jsonl(folder / "1_of_2.jsonl", REFEXP_PREDICTIONS[3:])
    for _ in range(2):
        assert refexp.main(["score", "--predictions", str(folder), "--annotation-file", str(annotation)]) == 0
    written = json.loads((tmp_path / "refcoco_val.metrics.json").read_text())
    assert written["results"]["refcoco_val"]["acc@0.5_upper_bound"] == pytest.approx(0.6)
    assert sorted(p.name for p in folder.iterdir()) == ["0_of_2.jsonl", "1_of_2.jsonl"]


# --------------------------------------------------------------------------------------------------------
# Ferret-Bench


def test_judge_prompt_text():
    prompt = ferret_bench.build_judge_prompt("Objects:\nObject 0 : dog", "What is it?", "ref", "ours", "Assistant",
                                             "Rate them.")
    assert prompt == (
        "[Context]\nObjects:\nObject 0 : dog\n\n[Question]\nWhat is it?\n\n[Assistant 1]\nref\n\n[End of Assistant 1]"
        "\n\n[Assistant 2]\nours\n\n[End of Assistant 2]\n\n[System]\nRate them.\n\n"
    )
    assert "\\" not in prompt


def test_answer_postprocessing():
    assert ferret_bench.postprocess_answer("A dog [100, 200, 300, 400] on grass [0, 0, 999, 999].",
                                           "refer_desc") == "A dog on grass."
    assert ferret_bench.postprocess_answer("A dog [100, 200, 300, 400] and a cat [5, 999].", "ground_conv") == \
        "A dog [0.100, 0.200, 0.300, 0.400] and a cat [0.005, 0.999]."
    assert ferret_bench.postprocess_answer("keep [1, 2]", "other") == "keep [1, 2]"


def test_score_parsing():
    assert ferret_bench.parse_scores("8 6\nAssistant 1 is better.") == [8.0, 6.0]
    assert ferret_bench.parse_scores("8, 6.5") == [8.0, 6.5]
    assert ferret_bench.parse_scores("Assistant 1: 8\nAssistant 2: 6") is None
    assert ferret_bench.parse_scores("") is None


def test_summary_numbers(tmp_path):
    reviews = [
        {"question_id": 0, "category": "refer_desc", "tuple": [8, 6]},
        {"question_id": 1, "category": "refer_desc", "tuple": [6, 6]},
        {"question_id": 2, "category": "ground_conv", "tuple": [10, 5]},
        {"question_id": 3, "category": "ground_conv", "tuple": [-1, -1]},  # unparsed: counted, not averaged
        {"question_id": 4, "category": "ground_conv", "tuple": [1, 10]},  # ignored below
    ]
    _write_jsonl(tmp_path / "review_a.jsonl", reviews)
    (tmp_path / "a.metrics.json").write_text("{}")
    files = ferret_bench.find_review_files(tmp_path)
    assert [f.name for f in files] == ["review_a.jsonl"]
    summary = ferret_bench.summarize(files, ignore=[4])
    block = summary["files"]["review_a"]
    assert block["scores"] == {"ground_conv": 50.0, "refer_desc": 85.7, "all": 70.8}
    assert block["details"]["ground_conv"]["failed"] == 1
    assert block["details"]["all"]["n"] == 3
    assert "combined" not in summary


class _StubJudge:
    """A chat-completions endpoint on 127.0.0.1 that fails `fail_first` times, then answers from `reply`."""

    def __init__(self, fail_first=0, reply=lambda content: "7 9\nfine", fail_status=500):
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.reply = reply
        self.requests = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if len(stub.requests) <= stub.fail_first:
                    payload, status = b'{"error": "overloaded"}', stub.fail_status
                else:
                    content = stub.reply(body["messages"][-1]["content"])
                    payload, status = json.dumps({"choices": [{"message": {"content": content}}]}).encode(), 200
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(autouse=False)
def no_proxy(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


def test_judge_client_retries_then_succeeds(no_proxy):
    with _StubJudge(fail_first=2) as stub:
        with ferret_bench.JudgeClient(stub.base_url, "judge-x", api_key="sk-test", backoff_s=0.01) as client:
            assert client.complete("hello") == "7 9\nfine"
    assert len(stub.requests) == 3
    request = stub.requests[-1]
    assert request["path"] == "/v1/chat/completions"
    assert request["auth"] == "Bearer sk-test"
    assert request["body"]["model"] == "judge-x"
    assert request["body"]["temperature"] == 0.2 and request["body"]["max_tokens"] == 1024
    assert request["body"]["messages"][0]["role"] == "system"
    assert request["body"]["messages"][1] == {"role": "user", "content": "hello"}


def test_judge_client_gives_up_after_max_tries(no_proxy):
    with _StubJudge(fail_first=100) as stub:
        with ferret_bench.JudgeClient(stub.base_url, "judge-x", max_tries=3, backoff_s=0.01) as client:
            with pytest.raises(ferret_bench.JudgeError, match="failed 3 times"):
                client.complete("hello")
    assert len(stub.requests) == 3


def test_judge_client_does_not_retry_a_client_error(no_proxy):
    with _StubJudge(fail_first=100, fail_status=401) as stub:
        with ferret_bench.JudgeClient(stub.base_url, "judge-x", backoff_s=0.01) as client:
            with pytest.raises(ferret_bench.JudgeError, match="HTTP 401"):
                client.complete("hello")
    assert len(stub.requests) == 1


def test_review_resumes_and_aligns_by_question_id(tmp_path, no_proxy):
    questions = [{"question_id": q, "image": f"{q}.jpg", "category": "ground_conv", "text": f"Q{q}?"}
                 for q in (1, 2, 3)]
    contexts = [{"question_id": q, "image": f"{q}.jpg", "text": f"context {q}"} for q in (3, 2, 1)]
    references = [{"question_id": q, "text": f"reference {q}"} for q in (2, 1, 3)]
    answers = [{"question_id": 3, "text": "a dog [0, 500, 999, 1000]"}, {"question_id": 2, "text": "answer 2"}]
    rules = {"ground_conv": {"role": "Assistant", "prompt": "Rate."}}
    output = tmp_path / "review_ground_conv.jsonl"
    output.write_text(json.dumps({"question_id": 1, "category": "ground_conv", "tuple": [5, 5]}) + "\n")

    with _StubJudge(reply=lambda content: "8 4" if "context 3" in content else "unparseable") as stub:
        with ferret_bench.JudgeClient(stub.base_url, "judge-x", backoff_s=0.01) as client:
            counts = ferret_bench.review_answers(questions, contexts, references, answers, rules, output, client)
            assert counts == {"reviewed": 2, "skipped": 1, "failed_parse": 1, "missing_answer": 0,
                              "missing_reference": 0}
            again = ferret_bench.review_answers(questions, contexts, references, answers, rules, output, client)
            assert again["reviewed"] == 0 and again["skipped"] == 3
    assert len(stub.requests) == 2
    sent = [r["body"]["messages"][1]["content"] for r in stub.requests]
    assert sent[1].startswith("[Context]\ncontext 3\n\n[Question]\nQ3?\n\n[Assistant 1]\nreference 3\n")
    assert "a dog [0.000, 0.500, 0.999, 0.999]" in sent[1]
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["question_id"] for line in lines] == [1, 2, 3]
    assert lines[1]["tuple"] == [-1.0, -1.0] and lines[2]["tuple"] == [8.0, 4.0]
    assert lines[2]["answer1"] == "reference 3" and lines[2]["category"] == "ground_conv"


# --------------------------------------------------------------------------------------------------------
# The other command lines, end to end on tiny files


def test_score_command_lines_write_beside_predictions(tmp_path):
    pope_questions = tmp_path / "coco_pope_random.json"
    _write_jsonl(pope_questions, [{"question_id": 0, "label": "yes"}, {"question_id": 1, "label": "no"}])
    _write_jsonl(tmp_path / "pope.jsonl", [{"question_id": 1, "answer": "No."}, {"question_id": 0, "answer": "Yes."}])
    assert pope.main(["score", "--predictions", str(tmp_path / "pope.jsonl"),
                      "--annotation-file", str(pope_questions)]) == 0
    assert json.loads((tmp_path / "pope.metrics.json").read_text())["results"]["accuracy"] == 1.0

    (tmp_path / "lvis").mkdir()
    _write_jsonl(tmp_path / "lvis" / "0_of_1.jsonl", [{"id": 0, "name": "dog", "synonyms": [], "text": "A dog."}])
    assert lvis.main(["score", "--predictions", str(tmp_path / "lvis"), "--region-format", "box"]) == 0
    lvis_metrics = json.loads((tmp_path / "lvis.metrics.json").read_text())
    assert lvis_metrics["results"]["box"]["accuracy"] == 1.0

    flickr_gt = tmp_path / "final_flickr_mergedGT_test.json"
    flickr_gt.write_text(json.dumps(_flickr_gt()))
    _write_jsonl(tmp_path / "flickr.jsonl", [{"image_id": 1000, "sentence_id": 0, "text": FLICKR_ANSWER}])
    assert flickr.main(["score", "--predictions", str(tmp_path / "flickr.jsonl"),
                        "--annotation-file", str(flickr_gt)]) == 0
    assert json.loads((tmp_path / "flickr.metrics.json").read_text())["results"]["all"]["upper_bound"] == 1.0

    reviews = tmp_path / "reviews"
    reviews.mkdir()
    _write_jsonl(reviews / "review_refer_desc.jsonl", [{"question_id": 0, "category": "refer_desc", "tuple": [8, 6]}])
    _write_jsonl(reviews / "review_ground_conv.jsonl", [{"question_id": 0, "category": "ground_conv",
                                                         "tuple": [10, 5]}])
    assert ferret_bench.main(["summarize", "--dir", str(reviews), "--save"]) == 0
    summary = json.loads((tmp_path / "reviews.metrics.json").read_text())
    assert summary["files"]["review_refer_desc"]["scores"] == {"refer_desc": 75.0, "all": 75.0}
    assert summary["combined"]["scores"] == {"ground_conv": 50.0, "refer_desc": 75.0, "all": 61.1}


# --------------------------------------------------------------------------------------------------------
# Hard cases: a phrase is a span, a POPE answer's polarity, the longest LVIS class


def test_flickr_repeated_phrase_text_is_two_phrases():
    caption = "A girl hands a girl a flower ."
    first, second, flower = (0, 6), (13, 19), (20, 28)
    gt = {"images": [{"id": 0, "file_name": "7.jpg", "caption": caption, "original_img_id": 7, "sentence_id": 0,
                      "width": 1000, "height": 1000,
                      "tokens_positive_eval": [[list(first)], [list(second)], [list(flower)]]}],
          "annotations": [{"id": 1, "image_id": 0, "bbox": [0, 0, 100, 100], "tokens_positive": [list(first)]},
                          {"id": 2, "image_id": 0, "bbox": [500, 500, 400, 400], "tokens_positive": [list(second)]},
                          {"id": 3, "image_id": 0, "bbox": [300, 300, 50, 50], "tokens_positive": [list(flower)]}]}
    # each girl grounded once, in caption order: both right at rank 1
    answer = "A girl [0, 0, 100, 100] hands a girl [500, 500, 900, 900] a flower [300, 300, 350, 350]."
    result = flickr.score_flickr(gt, [{"image_id": 7, "sentence_id": 0, "text": answer}])
    assert result["results"]["all"]["recall@1"] == 1.0
    assert result["phrase_matching"] == {"exact": 2, "fallback": 1, "none": 0}  # "hands a girl" by whole words
    # the original's string matching would hand the second girl the first girl's box first: recall@1 2/3
    boxes = common.answer_boxes(answer, 1000, 1000)
    assert [b.mention for b in boxes] == [0, 1, 2]
    # one mention for two girls: the second occurrence gets nothing (zero box), not the first girl's box
    once = "A girl [0, 0, 100, 100] holds a flower [300, 300, 350, 350]."
    result = flickr.score_flickr(gt, [{"image_id": 7, "sentence_id": 0, "text": once}])
    assert result["results"]["all"]["upper_bound"] == pytest.approx(2 / 3)
    # regions written after one mention stay that mention's: "two dogs [..] [..]"
    assert [b.mention for b in common.answer_boxes("two dogs [1, 1, 5, 5] [6, 6, 9, 9]", 10, 10)] == [0, 0]


def test_flickr_repeated_phrase_uses_the_kth_entity(tmp_path):
    (tmp_path / "Sentences").mkdir()
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Sentences" / "7.txt").write_text(
        "[/EN#1/people A girl] hands [/EN#2/people a girl] [/EN#3/other a flower] .\n")
    entities = flickr.FlickrEntities(tmp_path)
    assert entities.find_phrase("7", 0, "a girl", 0).phrase_id == "1"
    assert entities.find_phrase("7", 0, "a girl", 1).phrase_id == "2"
    assert entities.find_phrase("7", 0, "a girl", 2) is None


POPE_PHRASINGS = [  # (answer as VLMs phrase it, decision)
    ("Yes, the cup is on the table, not the shelf.", "yes"),
    ("There is a cup on the table, not on the shelf.", "yes"),
    ("The image features a man holding an umbrella, not a bag.", "yes"),
    ("In the image, there is a dog.", "yes"),
    ("Certainly, a person is visible.", "yes"),
    ("There is no cup, but there is a glass.", "no"),
    ("Unfortunately, there is no cup in the image.", "no"),
    ("I don't see a cup in the image.", "no"),
    ("There's no dog here.", "no"),
    ("Nothing like that appears in the image.", "no"),
    ("A dog is not visible in the image.", "no"),
    ("The image does not contain a dog.", "no"),
    ("There are no people in the picture.", "no"),
    ("Nope.", "no"),
]


@pytest.mark.parametrize("answer, decision", POPE_PHRASINGS)
def test_pope_decides_by_polarity(answer, decision):
    assert pope.decide_yes_no(answer) == decision


def test_pope_original_files_without_ids_align_by_order_and_count_bad_lines(tmp_path):
    questions = [{"question_id": i, "text": "Is there a dog?", "label": label} for i, label in
                 enumerate(["yes", "no", "yes"])]
    path = tmp_path / "answers.jsonl"
    path.write_text('{"answer": "yes"}\n{"answer": "there is no dog."}\n{"answer": "no"}\n')
    r = pope.score_pope(questions, common.PredictionStream(path))
    assert r["aligned_by"] == "order" and (r["results"]["TP"], r["results"]["TN"], r["results"]["FN"]) == (1, 1, 1)
    path.write_text('{"question_id": 2, "answer": "No."}\n{"oops": 1}\n{"question_id": 0, "text": "Yes"}\nbroken\n')
    r = pope.score_pope(questions, common.PredictionStream(path))
    assert r["predictions_read"]["unparseable"] == {"invalid_json": 1, "no_key": 1}
    assert r["alignment"]["missing"] == 1 and r["results"]["n"] == 2 and r["results"]["accuracy"] == 0.5


@pytest.mark.parametrize(
    "text, name, negative, correct, both",
    [
        ("It is a stop sign.", "sign", "stop_sign", False, False),
        ("It is a stop sign.", "stop_sign", "sign", True, False),
        ("Two stop signs.", "stop_sign", "sign", True, False),  # plural of the longer class
        ("A sign next to a stop sign.", "sign", "stop_sign", True, True),
        ("It is a teddy bear.", "bear", "teddy_bear", False, False),
        ("A bear, not a teddy bear.", "bear", "teddy_bear", True, False),
    ],
)
def test_lvis_longest_class_wins(text, name, negative, correct, both):
    assert lvis.classify(text, name, [], negative) == (correct, both)
