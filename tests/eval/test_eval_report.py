"""`python -m ferret.eval report`: metrics files of several runs in one table beside the papers' numbers."""

from __future__ import annotations

import csv
import io
import json

from ferret.eval import main as eval_main
from ferret.eval import pope, refexp, report, vqa
from ferret.eval.common import write_json


def _refcoco_metrics(hit: bool) -> dict:
    annotations = {"images": [{"id": 1, "file_name": "a.jpg", "caption": "dog", "dataset_name": "refcoco",
                               "width": 100, "height": 100}],
                   "annotations": [{"id": 1, "image_id": 1, "bbox": [10, 10, 50, 50]}]}
    text = "dog [100, 100, 600, 600]" if hit else "dog [700, 700, 990, 990]"
    return refexp.score_refexp(annotations, [{"image_id": 1, "text": text}], split="val")


def test_report_table_of_two_runs(tmp_path, capsys):
    for run, hit in (("base", False), ("tuned", True)):
        folder = tmp_path / run
        write_json(_refcoco_metrics(hit), folder / "refcoco_val.metrics.json")
        questions = [{"question_id": i, "text": "Is there a dog?", "label": l} for i, l in enumerate(["yes", "no"])]
        answers = [{"question_id": 0, "text": "Yes"}, {"question_id": 1, "text": "Yes" if not hit else "No"}]
        metrics = pope.score_pope(questions, answers)
        metrics["annotation_file"] = "data/pope/coco_pope_adversarial.json"
        write_json(metrics, folder / "sub" / "pope_adv.metrics.json")
        gt = [{"question_id": 1, "answers": ["2"] * 3 + ["3"] * 7, "answer_type": "number"}]
        write_json(vqa.score_vqa("vqav2", gt, [{"question_id": 1, "text": "2"}]), folder / "vqa.metrics.json")
    (tmp_path / "tuned" / "broken.metrics.json").write_text("{not json")

    assert eval_main(["report", str(tmp_path / "base"), str(tmp_path / "tuned")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == ("| benchmark | metric | base | tuned | Ferret-7B (paper) | Ferret-13B (paper) | "
                        "Ferret-v2-7B (paper) | Ferret-v2-13B (paper) | Osprey-7B (paper) | Prismer-Base (paper) | "
                        "Prismer-Large (paper) |")
    assert "| RefCOCO val | Acc@0.5 | 0.00 | 100.00 | 87.49 | 89.48 | 92.79 | 92.64 | – | – | – |" in table
    # POPE: base says yes twice (1 of 2 right), tuned gets both; Osprey's published adversarial accuracy beside
    assert "| POPE adversarial | accuracy | 50.00 | 100.00 | – | – | – | – | 85.33 | – | – |" in table
    # VQAv2: "2" said by 3 of 10 humans -> 90 in both runs
    vqa_row = "| VQAv2 (papers: test-dev) | accuracy | 90.00 | 90.00 | – | – | 81.50 | 81.80 | – | 76.84 | 78.42 |"
    assert vqa_row in table

    out = tmp_path / "table.csv"
    assert report.main([str(tmp_path / "tuned"), "--format", "csv", "--no-papers", "--output", str(out)]) == 0
    rows = list(csv.reader(io.StringIO(out.read_text())))
    assert rows[0] == ["benchmark", "metric", "tuned"]
    assert ["POPE adversarial", "F1", "100.00"] in rows and ["RefCOCO val", "Acc@0.5", "100.00"] in rows


def test_headline_rows_of_each_benchmark():
    caption = {"benchmark": "refcocog_region_caption", "results": {"n": 3, "CIDEr": 101.0}}
    assert report.headline_rows(caption) == [(("RefCOCOg region caption", "CIDEr"), 101.0),
                                            (("RefCOCOg region caption", "METEOR"), None)]
    osprey = {"benchmark": "osprey_paco", "results": {"semantic_similarity": 70.0, "semantic_iou": 50.0}}
    assert report.headline_rows(osprey) == [(("Osprey PACO", "Semantic Similarity"), 70.0),
                                           (("Osprey PACO", "Semantic IoU"), 50.0)]
    lvis = {"benchmark": "lvis_referring", "results": {"all": {"accuracy": 0.5}, "free_shape": {"accuracy": 0.25}}}
    assert report.headline_rows(lvis) == [(("LVIS referring free-form", "accuracy"), 25.0)]
    flickr = {"benchmark": "flickr30k_entities", "annotation_file": "x/final_flickr_mergedGT_test.json",
              "results": {"all": {"recall@1": 0.8}}}
    assert report.headline_rows(flickr) == [(("Flickr30k Entities test", "R@1"), 80.0)]
    bench = {"benchmark": "ferret_bench", "files": {"review_x": {"scores": {"refer_desc": 70.1, "all": 70.1}}}}
    assert report.headline_rows(bench) == [(("Ferret-Bench refer_desc", "score"), 70.1),
                                          (("Ferret-Bench all", "score"), 70.1)]
    toy = {"benchmark": "toy", "results": {}, "summary": {"refer_accuracy": 0.5, "yesno_accuracy": None}}
    assert report.headline_rows(toy) == [(("toy world", "refer_accuracy"), 50.0),
                                         (("toy world", "yesno_accuracy"), None)]
    assert report.headline_rows({"benchmark": "unknown", "results": {}}) == []
    assert json.dumps(report.PUBLISHED[("Osprey LVIS", "Semantic IoU")]) == '{"Osprey-7B": 38.2}'
