"""VQAv2 / TextVQA / GQA accuracy on fixtures in the published file formats, with values computed by hand."""

from __future__ import annotations

import json

import pytest

from ferret.eval import vqa
from ferret.eval.common import PredictionStream


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Two dogs.", "2 dogs"),
        ("The cat's toy!", "cat's toy"),  # "!" touches no space: becomes a space, then stripped by the split
        ("1,000", "1000"),  # a comma between digits: every punctuation mark is removed
        ("yes, it is", "yes it is"),  # ", " touches a space: removed
        ("dont know", "don't know"),
        ("3.5 inches", "3.5 inches"),  # a period before a digit stays
        ("an apple\n", "apple"),
        ("left-hand", "left hand"),
    ],
)
def test_normalize_answer(raw, normalized):
    assert vqa.normalize_answer(raw) == normalized


def test_ten_choose_nine_accuracy_by_hand():
    # "2" given by 3 of 10 humans: leaving out one of those 3 leaves 2 matches (2/3), any other leaves 3 (1)
    humans = ["2"] * 3 + ["3"] * 7
    assert vqa.vqa_accuracy("2", humans) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # 0.9
    assert vqa.vqa_accuracy("two", humans) == pytest.approx(0.9)  # number words become digits
    # one human said it: 0 when that human is left out, 1/3 otherwise
    assert vqa.vqa_accuracy("yes", ["yes"] + ["no"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    assert vqa.vqa_accuracy("Yes.", ["yes"] * 10) == 1.0
    assert vqa.vqa_accuracy("maybe", ["yes"] * 10) == 0.0
    # the official rule leaves unanimous human answers as they are (articles and all): "the red one" != "red one";
    # TextVQA's evaluation normalises the humans too
    assert vqa.vqa_accuracy("the red one", ["the red one"] * 10, "official") == 0.0
    assert vqa.vqa_accuracy("the red one", ["the red one"] * 10, "full") == 1.0
    assert vqa.exact_match_accuracy("The table.", "table") == 1.0
    assert vqa.exact_match_accuracy("chair", "table") == 0.0


def _vqav2_files(tmp_path):
    questions = {"questions": [{"question_id": 1, "image_id": 42, "question": "How many dogs?"},
                               {"question_id": 2, "image_id": 42, "question": "Is it sunny?"},
                               {"question_id": 3, "image_id": 7, "question": "What color?"}]}
    answers = [["2"] * 3 + ["3"] * 7, ["yes"] * 10, ["red"] * 4 + ["dark red"] * 6]
    types = ["number", "yes/no", "other"]
    annotations = {"annotations": [
        {"question_id": qid, "image_id": 42, "answer_type": t, "question_type": "what",
         "multiple_choice_answer": a[0], "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": k + 1}
                                                     for k, x in enumerate(a)]}
        for qid, a, t in zip((1, 2, 3), answers, types)]}
    qfile = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    afile = tmp_path / "v2_mscoco_val2014_annotations.json"
    qfile.write_text(json.dumps(questions))
    afile.write_text(json.dumps(annotations))
    return qfile, afile


def test_vqav2_files_and_score(tmp_path):
    qfile, afile = _vqav2_files(tmp_path)
    questions = vqa.load_questions("vqav2", qfile)
    assert questions[0] == {"question_id": 1, "question": "How many dogs?", "image": "COCO_val2014_000000000042.jpg"}
    queries = vqa.vqa_queries(questions, tmp_path)
    assert queries[1].prompt == "Is it sunny?\nAnswer the question using a single word or phrase."
    preds = tmp_path / "answers.jsonl"
    preds.write_text('{"question_id": 1, "text": "Two"}\n{"question_id": 2, "text": "No"}\nnot json\n'
                     '{"question_id": 3, "text": "red"}\n{"question_id": 3, "text": "dark red"}\n')
    metrics = vqa.score_vqa("vqav2", vqa.load_ground_truth("vqav2", afile), PredictionStream(preds))
    # q1 0.9, q2 0, q3: "red" said by 4: (4 * 3/3 + 6 * 1) / 10 = 1.0 (the duplicate line is ignored)
    r = metrics["results"]
    assert r["overall"] == {"n": 3, "accuracy": pytest.approx(100 * (0.9 + 0 + 1.0) / 3)}
    assert r["number"]["accuracy"] == pytest.approx(90.0) and r["yes/no"]["accuracy"] == 0.0
    assert metrics["predictions_read"]["unparseable"] == {"invalid_json": 1}
    assert metrics["alignment"]["duplicates"] == 1
    # the same answers as a results list for the server read the same
    results = tmp_path / "results.json"
    assert vqa.main(["export", "--predictions", str(preds), "--output", str(results)]) == 0
    assert json.loads(results.read_text())[0] == {"question_id": 1, "answer": "Two"}
    assert vqa.main(["score", "--dataset", "vqav2", "--predictions", str(results), "--annotation-file",
                     str(afile)]) == 0
    scored = json.loads((tmp_path / "results.json.metrics.json").read_text())
    assert scored["results"]["overall"]["accuracy"] == pytest.approx(100 * 1.9 / 3)


def test_textvqa_and_gqa_files(tmp_path):
    textvqa = {"dataset_name": "textvqa", "data": [
        {"question_id": 5, "image_id": "abc", "question": "What brand?", "answers": ["Nike"] * 2 + ["nike."] * 8},
        {"question_id": 6, "image_id": "abd", "question": "What number?", "answers": ["12"] * 10}]}
    tfile = tmp_path / "TextVQA_0.5.1_val.json"
    tfile.write_text(json.dumps(textvqa))
    assert vqa.load_questions("textvqa", tfile)[0]["image"] == "abc.jpg"
    preds = [{"question_id": 5, "text": "NIKE"}, {"question_id": 6, "text": "twelve"}]
    r = vqa.score_vqa("textvqa", vqa.load_ground_truth("textvqa", tfile), preds)["results"]["overall"]
    assert r == {"n": 2, "accuracy": pytest.approx(50.0)}  # all 10 humans normalise to "nike"; "twelve" != "12"

    gqa = {"201": {"imageId": "n1", "question": "Is the cup red?", "answer": "yes", "types": {"structural": "verify"}},
           "202": {"imageId": "n2", "question": "What is on the table?", "answer": "cup",
                   "types": {"structural": "query"}}}
    gfile = tmp_path / "testdev_balanced_questions.json"
    gfile.write_text(json.dumps(gqa))
    assert vqa.load_questions("gqa", gfile)[1] == {"question_id": "202", "question": "What is on the table?",
                                                  "image": "n2.jpg"}
    submission = [{"questionId": "201", "prediction": "Yes."}, {"questionId": "202", "prediction": "a mug"}]
    result = vqa.score_vqa("gqa", vqa.load_ground_truth("gqa", gfile), submission)
    assert result["results"]["overall"]["accuracy"] == 50.0
    assert result["results"]["verify"]["accuracy"] == 100.0 and result["results"]["query"]["accuracy"] == 0.0
