"""The toy evaluation's name-swap probe (ferret.eval.toy): its questions, its scoring on hand-made answers, and the
total-variation distance on hand-made distributions. The model-facing part runs in test_eval_e2e.py."""

from __future__ import annotations

import math

import pytest
import torch

from ferret.eval import toy
from ferret.regions import Box, region_to_text

SIZE = 56


def _record(record_id: str, *objects: tuple[str, list[int]]) -> dict:
    return {"id": record_id, "task": "ground", "image": f"images/{record_id}.png", "image_w": SIZE, "image_h": SIZE,
            "objects": [{"name": name, "box": box} for name, box in objects]}


TWO = _record("two", ("red circle", [5, 5, 20, 20]), ("blue star", [30, 30, 50, 50]))
THREE = _record("three", ("green square", [0, 0, 15, 15]), ("yellow triangle", [20, 0, 35, 15]),
                ("red star", [40, 40, 55, 55]))
ONE = _record("one", ("green square", [10, 10, 30, 30]))
TWINS = _record("twins", ("red circle", [0, 0, 10, 10]), ("red circle", [30, 30, 40, 40]))


def _grounded(name: str, box: list[int]) -> str:
    return f"a {name} " + region_to_text(Box(*box), SIZE, SIZE)


def _ground_line(record: dict, asked: str, answer: str, tv: dict | None = None) -> dict:
    line = {"id": f"{record['id']}/ground/{asked}", "record": record["id"], "probe": "ground", "name": asked,
            "text": answer}
    return {**line, "name_swap_tv": tv} if tv is not None else line


def test_probe_queries_ask_every_object_and_a_present_absent_pair(tmp_path):
    records = [TWO, ONE, TWINS, THREE]
    probe = toy.probe_queries(records, tmp_path, max_images=10)
    ids = [q.output["id"] for q in probe.queries]
    ground = [i for i in ids if "/ground/" in i]
    # Two or more differently named objects: TWO and THREE; ONE has one object, TWINS two of the same name.
    assert ground == ["two/ground/red circle", "two/ground/blue star", "three/ground/green square",
                      "three/ground/yellow triangle", "three/ground/red star"]
    by_id = dict(zip(ids, zip(probe.queries, probe.answers)))
    query, answer = by_id["two/ground/blue star"]
    assert query.prompt == "What is the location of the blue star in the image?" and answer == "a blue star"
    assert query.image == tmp_path / "images/two.png" and list(query.regions) == []
    pairs = {(ids[a], ids[b]) for a, b in probe.pairs}
    assert ("two/ground/red circle", "two/ground/blue star") in pairs
    assert sum("three/ground" in a for a, _ in pairs) == 3  # every pair of the three names
    # One yes/no pair per record (TWINS too): a name of the image, then one of the split absent from it.
    split_names = {o["name"] for r in records for o in r["objects"]}
    yesno = [(probe.queries[a], probe.queries[b], probe.answers[a], probe.answers[b]) for a, b in probe.pairs
             if probe.queries[a].output["probe"] == "yesno"]
    assert [q.output["record"] for q, *_ in yesno] == ["two", "one", "twins", "three"]
    for present, absent, yes, no in yesno:
        names = {o["name"] for r in records if r["id"] == present.output["record"] for o in r["objects"]}
        assert present.output["name"] in names and absent.output["name"] in split_names - names
        assert present.prompt == f"Is there a {present.output['name']} in the image?" and (yes, no) == ("Yes", "No")
    assert [q.output["id"] for q in toy.probe_queries(records, tmp_path, 10).queries] == ids  # deterministic

    one_each = toy.probe_queries(records, tmp_path, max_images=1)
    assert [q.output["id"].split("/", 1)[0] for q in one_each.queries] == ["two"] * 4
    assert toy.probe_queries(records, tmp_path, max_images=0).queries == []
    with pytest.raises(ValueError, match=r"toy record #0 \(id=bare\) has no 'objects'"):
        toy.probe_queries([{"id": "bare", "image": "x.png"}], tmp_path)


def test_score_probe_perfect_and_name_blind_answers():
    records = [TWO, THREE]
    perfect = [_ground_line(r, o["name"], _grounded(o["name"], o["box"])) for r in records for o in r["objects"]]
    probe = toy.score_probe(records, perfect)
    assert probe["summary"]["probe_ground_reads_name"] == 1.0
    assert probe["summary"]["probe_ground_same_box"] == 0.0
    ground = probe["results"]["ground"]
    assert (ground["images"], ground["questions"], ground["pairs"]) == (2, 5, 4)
    assert ground["answer_names_it"] == 1.0
    # At most one right answer per image when the name is ignored: 2 images / 5 questions.
    assert ground["ignoring_name_at_most"] == pytest.approx(2 / 5)

    # A model that ignores the name answers with the image's first object whatever is asked: right once per
    # image (2 of 5), and every pair of names gets the same box.
    blind = [_ground_line(r, o["name"], _grounded(r["objects"][0]["name"], r["objects"][0]["box"]))
             for r in records for o in r["objects"]]
    probe = toy.score_probe(records, blind)
    assert probe["summary"]["probe_ground_reads_name"] == pytest.approx(2 / 5)
    assert probe["summary"]["probe_ground_same_box"] == 1.0
    assert probe["results"]["ground"]["answer_names_it"] == pytest.approx(2 / 5)

    # No box, and a box that overlaps the named object well but another one better, are misses.
    between = [_ground_line(TWO, "red circle", "a red circle"),
               _ground_line(TWO, "blue star", _grounded("blue star", [5, 5, 20, 20]))]
    probe = toy.score_probe([TWO], between)
    assert probe["summary"]["probe_ground_reads_name"] == 0.0
    assert probe["summary"]["probe_ground_same_box"] == 0.0  # one answer has no box
    assert probe["summary"]["probe_yesno_consistent"] is None and probe["summary"]["probe_name_token_tv"] is None


def test_score_probe_yesno_pairs_and_distances():
    def yesno(record, name, text, tv=None):
        line = {"id": f"{record['id']}/yesno/{name}", "record": record["id"], "probe": "yesno", "name": name,
                "text": text}
        return {**line, "name_swap_tv": tv} if tv is not None else line

    lines = [
        yesno(TWO, "red circle", "Yes", {"two/yesno/green star": 0.75}), yesno(TWO, "green star", "No"),
        yesno(THREE, "red star", "Yes", {"three/yesno/blue circle": 0.25}), yesno(THREE, "blue circle", "Yes."),
        _ground_line(TWO, "red circle", _grounded("red circle", [5, 5, 20, 20]), {"two/ground/blue star": 0.1}),
        _ground_line(TWO, "blue star", _grounded("red circle", [5, 5, 20, 20])),
    ]
    probe = toy.score_probe([TWO, THREE], lines)
    results = probe["results"]
    assert results["yesno"] == {"pairs": 2, "consistent": 0.5, "same_answer": 0.5, "name_token_tv": 0.5}
    assert results["ground"]["name_token_tv"] == pytest.approx(0.1)
    assert results["tv_pairs"] == 3 and results["name_token_tv"] == pytest.approx((0.75 + 0.25 + 0.1) / 3)
    assert probe["summary"] == {"probe_ground_reads_name": 0.5, "probe_ground_same_box": 1.0,
                                "probe_yesno_consistent": 0.5, "probe_name_token_tv": results["name_token_tv"]}

    # score_toy carries the probe's numbers in its summary when given the probe's lines, and only then.
    answers = [{"id": "two", "text": _grounded("red circle", [5, 5, 20, 20])}]
    record = {**TWO, "conversations": [{"from": "human", "value": "<image>\nWhat is the location of the red "
                                        "circle in the image?"}, {"from": "gpt", "value": "a red circle"}],
              "box_x1y1x2y2": [[], [[5, 5, 20, 20]]]}
    assert "probe_yesno_consistent" not in toy.score_toy([record], answers)["summary"]
    with_probe = toy.score_toy([record, THREE], answers, probe=lines)
    assert with_probe["summary"]["probe_yesno_consistent"] == 0.5
    assert with_probe["results"]["probe"] == results


def test_score_probe_names_bad_lines():
    with pytest.raises(ValueError, match=r"probe answer #0 \(id='x'\): no toy record 'gone'"):
        toy.score_probe([TWO], [{"id": "x", "record": "gone", "probe": "ground", "name": "red circle", "text": ""}])
    with pytest.raises(ValueError, match="'purple cross' is not an object of toy record two"):
        toy.score_probe([TWO], [_ground_line(TWO, "purple cross", "a purple cross")])
    with pytest.raises(ValueError, match="'name_swap_tv' must map question ids to distances in"):
        toy.score_probe([TWO], [_ground_line(TWO, "red circle", "", {"two/ground/blue star": 1.5})])


def test_total_variation_of_hand_made_distributions():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    # 1/2 * sum |p - q|: (0.5 + 0 + 0.5) / 2, identical rows, disjoint supports. Logits: log-probabilities
    # (shifted by a constant per row, which softmax ignores).
    tv = toy.total_variation(torch.log(p) + 3.0, torch.log(q) - 1.0)
    torch.testing.assert_close(tv, torch.tensor([0.5, 0.0, 1.0]))
    logits_a, logits_b = torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[math.log(3.0), 0.0]])
    torch.testing.assert_close(toy.total_variation(logits_a, logits_b), torch.tensor([0.5]))  # 1/4,3/4 vs 3/4,1/4
