"""The evaluation suite end to end: every benchmark's `infer` and `score` on a tiny random checkpoint.

The fixtures are written in each benchmark's real format (MDETR COCO-style JSON for RefCOCO and Flickr30k,
LVIS-referring jsonl, POPE jsonl, Ferret-Bench question/context/answer jsonl + rule.json with a local judge, and
the toy world's test split). A random model answers garbage, so the checks are on structure and consistency:
fields, metric keys, counts, resuming, chunk merging, and that batch size does not change greedy answers.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ferret.eval import ferret_bench, flickr, inference, lvis, osprey, pope, refexp, toy
from ferret.eval import main as eval_main
from ferret.eval.common import load_predictions, metrics_path, read_jsonl
from ferret.eval.vqa import vqa_accuracy
from ferret.regions import Box, FreeForm, region_to_text

GEN = ["--max-new-tokens", "8", "--device", "cpu", "--no-progress"]


# --------------------------------------------------------------------------------------------------------
# Fixtures: a tiny checkpoint and benchmark files


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: a second OpenMP thread only adds synchronisation (10x slower on a busy 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tokenizer_dir, tmp_path_factory):
    """A tiny random Ferret saved the way a real one is (model + vision tower + processor)."""
    from transformers import AutoTokenizer

    from ferret.model.configs import build_model, small
    from ferret.processing import FerretProcessor

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    processor = FerretProcessor(tokenizer, image_size=56, num_image_tokens=16, model_max_length=512)
    model = build_model(small(len(processor.tokenizer), region_token=processor.region_token_id)).eval()
    out = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


def _write_image(path: Path, size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _texts(path) -> dict[str, str]:
    return {json.dumps(r.get("id", r.get("image_id"))): r["text"] for r in load_predictions(path)}


# --------------------------------------------------------------------------------------------------------
# Units: chunking and torchrun


def test_chunk_range_matches_the_original_split():
    assert [list(inference.chunk_range(10, 4, k)) for k in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert [list(inference.chunk_range(5, 4, k)) for k in range(4)] == [[0, 1], [2, 3], [4], []]
    assert list(inference.chunk_range(0, 3, 2)) == []
    with pytest.raises(ValueError, match="chunk_idx 4 is outside 0..3"):
        inference.chunk_range(10, 4, 4)


def test_shard_from_torchrun_environment(tmp_path):
    env = {"WORLD_SIZE": "8", "RANK": "3", "LOCAL_RANK": "3"}
    shard = inference.resolve_shard(1, 0, env)
    assert shard == inference.Shard(8, 3, 3)
    assert inference.answers_path(tmp_path / "out", shard) == tmp_path / "out" / "3_of_8.jsonl"
    assert inference.resolve_shard(2, 1, {}) == inference.Shard(2, 1, None)
    assert inference.answers_path(tmp_path / "a.jsonl", inference.Shard()) == tmp_path / "a.jsonl"
    with pytest.raises(ValueError, match="each rank runs one chunk"):
        inference.resolve_shard(4, 1, env)


# --------------------------------------------------------------------------------------------------------
# RefCOCO: infer, score, batch invariance, chunks, resume


def _refcoco(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "train2014"
    images.mkdir()
    entries, annotations = [], []
    for k, image_id in enumerate([31, 7, 12, 5, 20]):  # out of order: inference goes by id
        name = f"COCO_train2014_{image_id:012d}.jpg"
        _write_image(images / name, (48 + 8 * k, 40), seed=image_id)
        entries.append({"id": image_id, "file_name": name, "caption": f"the dog, left {k}", "dataset_name": "refcoco",
                        "height": 40, "width": 48 + 8 * k, "original_id": 100 + k})
        annotations.append({"id": k, "image_id": image_id, "bbox": [2, 3, 20, 15], "category_id": 1, "area": 300,
                            "iscrowd": 0})
    ann_file = tmp_path / "finetune_refcoco_val.json"
    ann_file.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": [{"id": 1}]}))
    return ann_file, images


def test_refexp_infer_score_chunks_resume_and_batch_invariance(checkpoint, tmp_path, capsys):
    ann_file, images = _refcoco(tmp_path)
    common = ["--model-path", checkpoint, "--annotation-file", str(ann_file), "--image-folder", str(images), *GEN]
    single = tmp_path / "refcoco_val.jsonl"
    assert refexp.main(["infer", *common, "--answers-file", str(single), "--batch-size", "4"]) == 0
    lines = read_jsonl(single)
    assert [r["image_id"] for r in lines] == [5, 7, 12, 20, 31]
    assert list(lines[0]) == ["image_id", "file_name", "prompt", "text", "width", "height", "regions"]
    assert lines[0]["prompt"] == "What is the location of the dog left 3 in the image?"
    assert (lines[0]["width"], lines[0]["height"]) == (72, 40)  # the image's own size

    # batch size 1 gives the same greedy answers
    one = tmp_path / "refcoco_val_b1.jsonl"
    refexp.main(["infer", *common, "--answers-file", str(one), "--batch-size", "1"])
    assert _texts(one) == _texts(single)

    # two chunks into a folder, merged back in order
    folder = tmp_path / "refcoco_val_chunks"
    for k in range(2):
        refexp.main(["infer", *common, "--answers-file", str(folder), "--num-chunks", "2", "--chunk-idx", str(k)])
    assert sorted(p.name for p in folder.iterdir()) == ["0_of_2.jsonl", "1_of_2.jsonl"]
    assert len(read_jsonl(folder / "0_of_2.jsonl")) == 3
    assert load_predictions(folder) == lines

    # resume: a killed run left two answers missing and a half-written line
    body = single.read_text().splitlines(keepends=True)
    single.write_text("".join(body[:3]) + body[3][:25])
    capsys.readouterr()
    refexp.main(["infer", *common, "--answers-file", str(single)])
    assert "2 answered, 3 already there" in capsys.readouterr().out
    assert read_jsonl(single) == lines
    refexp.main(["infer", *common, "--answers-file", str(single)])
    assert "0 answered, 5 already there" in capsys.readouterr().out

    # score: through the package dispatcher, metrics beside the predictions
    assert eval_main(["refcoco", "score", "--predictions", str(folder), "--annotation-file", str(ann_file)]) == 0
    metrics = json.loads(metrics_path(folder).read_text())
    result = metrics["results"]["refcoco_val"]
    assert result["n"] == 5 and metrics["alignment"]["complete"]
    for key in ("acc@0.5", "acc@0.5_mean_box", "acc@0.5_upper_bound"):
        assert 0.0 <= result[key] <= 1.0
    assert result["acc@0.5"] <= result["acc@0.5_upper_bound"]


# --------------------------------------------------------------------------------------------------------
# Flickr30k Entities


def test_flickr_infer_and_score(checkpoint, tmp_path):
    images = tmp_path / "flickr_test"
    images.mkdir()
    caption = "A man in a red shirt, sits ."
    entries, annotations = [], []
    for k, (original, sentence) in enumerate([("1000", 0), ("1000", 1), ("2000", 0)]):
        name = f"{original}.jpg"
        if not (images / name).exists():
            _write_image(images / name, (50, 40), seed=int(original))
        entries.append({"id": k, "file_name": name, "caption": caption, "original_img_id": original,
                        "sentence_id": sentence, "height": 40, "width": 50, "dataset_name": "flickr",
                        "tokens_positive_eval": [[[0, 5]], [[9, 20]]]})
        annotations.append({"id": 2 * k, "image_id": k, "bbox": [1, 1, 20, 30], "tokens_positive": [[0, 5]]})
        annotations.append({"id": 2 * k + 1, "image_id": k, "bbox": [5, 10, 30, 20], "tokens_positive": [[9, 20]]})
    ann_file = tmp_path / "final_flickr_mergedGT_test.json"
    ann_file.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": []}))
    out = tmp_path / "flickr_test.jsonl"
    flickr.main(["infer", "--model-path", checkpoint, "--annotation-file", str(ann_file), "--image-folder",
                 str(images), "--answers-file", str(out), *GEN])
    lines = read_jsonl(out)
    assert [(r["image_id"], r["sentence_id"]) for r in lines] == [("1000", 0), ("1000", 1), ("2000", 0)]
    assert lines[0]["prompt"] == "What are the locations of a man, a red shirt?"
    assert set(lines[0]) == {"image_id", "sentence_id", "file_name", "prompt", "text", "width", "height", "regions"}
    flickr.main(["score", "--predictions", str(out), "--annotation-file", str(ann_file)])
    metrics = json.loads(metrics_path(out).read_text())
    row = metrics["results"]["all"]
    assert row["n"] == 6 and set(row) == {"n", "recall@1", "recall@5", "recall@10", "upper_bound"}
    assert row["recall@1"] <= row["recall@5"] <= row["recall@10"] <= row["upper_bound"] <= 1.0
    assert sum(metrics["phrase_matching"].values()) == 6


# --------------------------------------------------------------------------------------------------------
# LVIS referring classification, three region formats


def test_lvis_infer_region_formats_and_score(checkpoint, tmp_path):
    images = tmp_path / "val2017"
    images.mkdir()
    width, height = 40, 30
    records = []
    for k in range(4):
        name = f"{k:012d}.jpg"
        _write_image(images / name, (width, height), seed=k)
        mask = np.zeros((height, width), dtype=bool)
        mask[5 + k:20, 10:30 - k] = True
        dense = mask.T.astype(int).tolist()  # the original's [W, H] layout
        records.append({
            "id": 10 + k, "image_path": f"/somewhere/else/{name}", "width": width, "height": height,
            "name": "dog", "synonyms": ["puppy"], "neg_class": "cat", "sample_point": [12 + k, 9],
            "bbox": [10, 5 + k, 20 - k, 15 - k], "bbox_norm": [0.25, (5 + k) / 30, (30 - k) / 40, 20 / 30],
            "free_shape_bbox_raw": [10, 5 + k, 29 - k, 19],
            "free_shape_segment_mask": FreeForm(mask).to_rle() if k == 3 else dense,  # an RLE variant too
        })
    assert lvis.free_shape_mask(records[0]["free_shape_segment_mask"], width, height).shape == (height, width)
    assert np.array_equal(lvis.free_shape_mask(records[0]["free_shape_segment_mask"], width, height),
                          lvis.free_shape_mask(FreeForm(np.array(records[0]["free_shape_segment_mask"]).T).to_rle(),
                                               width, height))
    ann = _jsonl(tmp_path / "lvis_eval.jsonl", records)
    base = ["--model-path", checkpoint, "--annotation-file", str(ann), "--image-folder", str(images), *GEN]
    prompts = {}
    for fmt in ("point", "box", "free_shape"):
        out = tmp_path / f"lvis_{fmt}.jsonl"
        lvis.main(["infer", *base, "--region-format", fmt, "--answers-file", str(out)])
        lines = read_jsonl(out)
        assert [r["id"] for r in lines] == [10, 11, 12, 13]
        assert {"id", "image_path", "prompt", "text", "name", "synonyms", "bbox", "bbox_norm", "width",
                "height"} <= set(lines[0])
        assert lines[0]["image_path"] == str(images / "000000000000.jpg")
        prompts[fmt] = [r["prompt"] for r in lines]
        lvis.main(["score", "--predictions", str(out), "--annotation-file", str(ann)])
        metrics = json.loads(metrics_path(out).read_text())
        assert set(metrics["results"]) == {"all", fmt}
        assert metrics["results"]["all"]["n"] == 4 and metrics["alignment"]["complete"]
    assert prompts["point"][0] == "Is the object [300, 300] <region_fea> of the image a dog or a cat?"
    assert prompts["point"][1] == "Is the object [325, 300] <region_fea> of the image a cat or a dog?"
    assert prompts["box"][0] == "Is the object [250, 166, 750, 666] <region_fea> of the image a dog or a cat?"
    assert prompts["free_shape"][1] == "Is the object [250, 200, 700, 633] <region_fea> of the image a cat or a dog?"
    out = tmp_path / "lvis_nocoor.jsonl"
    lvis.main(["infer", *base, "--region-format", "box", "--no-coor", "--answers-file", str(out)])
    assert read_jsonl(out)[0]["prompt"] == "Is the object <region_fea> of the image a dog or a cat?"


# --------------------------------------------------------------------------------------------------------
# POPE: 11 chunks (torchrun ranks) merged in numeric order, aligned by order


def test_pope_torchrun_chunks_merge_in_numeric_order(checkpoint, tmp_path, monkeypatch):
    images = tmp_path / "val2014"
    images.mkdir()
    questions = []
    for k in range(11):
        name = f"COCO_val2014_{k:012d}.jpg"
        _write_image(images / name, (32, 32), seed=50 + k)
        questions.append({"image": name, "text": f"Is there a dog number {k} in the image?",
                          "label": "yes" if k % 3 else "no"})  # no question_id: aligned by order
    ann = _jsonl(tmp_path / "coco_pope_adversarial.json", questions)
    folder = tmp_path / "pope_adversarial"
    for rank in range(11):
        monkeypatch.setenv("WORLD_SIZE", "11")
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        pope.main(["infer", "--model-path", checkpoint, "--annotation-file", str(ann), "--image-folder",
                   str(images), "--answers-file", str(folder), *GEN])
    monkeypatch.delenv("WORLD_SIZE")
    assert len(list(folder.iterdir())) == 11 and (folder / "10_of_11.jsonl").exists()
    merged = load_predictions(folder)
    assert [r["question"] for r in merged] == [q["text"] for q in questions]  # 2_of_11 before 10_of_11
    assert all(r["answer"] == r["text"].lower() for r in merged)
    pope.main(["score", "--predictions", str(folder), "--annotation-file", str(ann)])
    metrics = json.loads(metrics_path(folder).read_text())
    r = metrics["results"]
    assert metrics["aligned_by"] == "order" and r["n"] == 11
    assert r["TP"] + r["FP"] + r["TN"] + r["FN"] == 11 and r["TP"] + r["FN"] == 7
    assert r["accuracy"] == pytest.approx((r["TP"] + r["TN"]) / 11)


# --------------------------------------------------------------------------------------------------------
# Ferret-Bench with a local judge


class _Judge:
    """An OpenAI-style chat-completions endpoint on 127.0.0.1 that always scores "8 6"."""

    def __enter__(self):
        self.prompts = []
        prompts = self.prompts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompts.append(body["messages"][-1]["content"])
                reply = json.dumps({"choices": [{"message": {"content": "8 6\nclose enough"}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def test_ferret_bench_answer_review_summarize(checkpoint, tmp_path):
    images = tmp_path / "val2017"
    images.mkdir()
    for k in range(3):
        _write_image(images / f"{k:012d}.jpg", (40, 50), seed=70 + k)
    questions = [
        {"question_id": 0, "image": "000000000000.jpg", "category": "refer_desc",
         "text": "Describe the region [0.250, 0.500, 0.750, 1.000] in detail."},
        {"question_id": 1, "image": "000000000001.jpg", "category": "refer_desc",
         "text": "What is at [0.5, 0.5] and near [0.1, 0.2, 0.3, 0.4]?"},
        {"question_id": 2, "image": "000000000002.jpg", "category": "ground_conv",
         "text": "Where is the cat? [see below]"},
    ]
    qfile = _jsonl(tmp_path / "question.jsonl", questions)
    context = _jsonl(tmp_path / "context.jsonl", [{"question_id": q["question_id"], "image": q["image"],
                                                   "text": "dog: [0.1, 0.2, 0.3, 0.4]"} for q in questions])
    reference = _jsonl(tmp_path / "answer.jsonl", [{"question_id": q["question_id"], "text": "a dog"}
                                                   for q in questions])
    rule = tmp_path / "rule.json"
    rule.write_text(json.dumps({c: {"role": "Assistant", "prompt": f"Rate the {c} answers."}
                                for c in ("refer_desc", "ground_conv")}))
    answers = tmp_path / "bench_answers.jsonl"
    ferret_bench.main(["answer", "--model-path", checkpoint, "--questions", str(qfile), "--image-folder",
                       str(images), "--answers-file", str(answers), *GEN])
    lines = read_jsonl(answers)
    assert [r["question_id"] for r in lines] == [0, 1, 2]
    assert set(lines[0]) == {"question_id", "image_path", "prompt", "text", "category", "regions"}
    assert lines[0]["prompt"] == "Describe the region [250, 500, 750, 999] <region_fea> in detail."
    assert lines[1]["prompt"] == "What is at [500, 500] <region_fea> and near [100, 200, 300, 400] <region_fea>?"
    assert lines[2]["prompt"] == "Where is the cat? [see below]"

    reviews = tmp_path / "reviews" / "review_bench.jsonl"
    with _Judge() as url:
        ferret_bench.main(["review", "--questions", str(qfile), "--context", str(context), "--reference",
                           str(reference), "--answers", str(answers), "--rule", str(rule), "--output", str(reviews),
                           "--judge-base-url", url, "--judge-model", "stub", "--max-tries", "1"])
    assert [r["tuple"] for r in read_jsonl(reviews)] == [[8.0, 6.0]] * 3
    out = tmp_path / "summary.json"
    ferret_bench.main(["score", "--dir", str(reviews.parent), "--output", str(out)])
    scores = json.loads(out.read_text())["files"]["review_bench"]["scores"]
    assert scores == {"ground_conv": 75.0, "refer_desc": 75.0, "all": 75.0}


# --------------------------------------------------------------------------------------------------------
# The toy world


@pytest.fixture(scope="module")
def toy_world(tmp_path_factory):
    from ferret.data.toy import make_world

    out = tmp_path_factory.mktemp("toy")
    records = make_world(out, num_train=0, num_val=0, num_test=20, image_size=56, seed=3)["test"]
    return out, records


def _perfect_answer(record) -> str:
    """The record's reference answer with its boxes written as coordinates."""
    text = record["conversations"][1]["value"]
    for k, box in enumerate(record["box_x1y1x2y2"][1]):
        text = text.replace(f"<bbox_location{k}>", region_to_text(Box(*box), record["image_w"], record["image_h"]))
    return text


def test_toy_scores_of_perfect_and_wrong_answers(toy_world):
    _, records = toy_world
    tasks = {r["task"] for r in records}
    assert tasks == {"refer", "refer_choice", "ground", "describe", "yesno"}
    perfect = [{"id": r["id"], "text": _perfect_answer(r)} for r in records]
    metrics = toy.score_toy(records, perfect)
    assert all(value == 1.0 for value in metrics["summary"].values() if value is not None), metrics["summary"]
    assert metrics["results"]["describe"]["precision@0.5"] == 1.0

    def wrong(record):
        if record["task"] == "yesno":
            return "No" if record["conversations"][1]["value"] == "Yes" else "Yes, there is."
        if record["task"] in ("refer", "refer_choice"):  # the right name plus another one is wrong too
            return _perfect_answer(record) + " or a purple cross"
        return "a purple cross [0, 0, 10, 10]"

    metrics = toy.score_toy(records, [{"id": r["id"], "text": wrong(r)} for r in records])
    assert all(value == 0.0 for value in metrics["summary"].values() if value is not None), metrics["summary"]
    counts = metrics["results"]
    assert (counts["refer"]["all"]["n"] + counts["refer_choice"]["all"]["n"] + counts["ground"]["n"]
            + counts["describe"]["records"] + counts["yesno"]["n"]) == len(records)


def test_toy_evaluate_and_batch_invariance(checkpoint, toy_world, tmp_path):
    world, records = toy_world
    common = ["--model-path", checkpoint, "--annotation-file", str(world / "test.json"), *GEN]
    out4 = tmp_path / "toy_b4.jsonl"
    assert toy.main(["evaluate", *common, "--answers-file", str(out4), "--batch-size", "4"]) == 0
    lines = read_jsonl(out4)
    assert [r["id"] for r in lines] == [r["id"] for r in records]
    assert {r["region_type"] for r in lines if r["task"] == "refer"} == {"point", "box", "free_form"}
    refer = next(r for r in lines if r["task"] == "refer" and r["region_type"] == "point")
    assert refer["prompt"].startswith("What is [") and refer["prompt"].endswith("] <region_fea>?")
    metrics = json.loads(metrics_path(out4).read_text())
    probe_keys = {"probe_ground_reads_name", "probe_ground_same_box", "probe_yesno_consistent", "probe_name_token_tv"}
    assert set(metrics["summary"]) == {"refer_accuracy", "refer_point_accuracy", "refer_box_accuracy",
                                       "refer_free_form_accuracy", "refer_choice_accuracy", "ground_acc@0.5",
                                       "describe_recall@0.5", "yesno_accuracy"} | probe_keys
    assert metrics["alignment"]["evaluated"] == 20
    # The name-swap probe ran on every record (fewer than --probe-images): its answers beside the answers file.
    assert all(0.0 <= metrics["summary"][key] <= 1.0 for key in probe_keys), metrics["summary"]
    probe = read_jsonl(toy.probe_path(out4))
    asked = toy.probe_queries(records, world)
    assert [line["id"] for line in probe] == [q.output["id"] for q in asked.queries]
    assert metrics["results"]["probe"]["tv_pairs"] == len(asked.pairs) > 0
    assert metrics["results"]["probe"]["yesno"]["pairs"] == 20

    out1 = tmp_path / "toy_b1.jsonl"
    toy.main(["infer", *common, "--answers-file", str(out1), "--batch-size", "1"])
    assert _texts(out1) == _texts(out4)
    probe1 = read_jsonl(toy.probe_path(out1))
    assert [line["text"] for line in probe1] == [line["text"] for line in probe]
    for one, four in zip(probe1, probe):
        assert one.get("name_swap_tv", {}).keys() == four.get("name_swap_tv", {}).keys()
        for key, value in one.get("name_swap_tv", {}).items():
            assert value == pytest.approx(four["name_swap_tv"][key], abs=1e-5)

    # Without the probe, no probe numbers, and an earlier run's probe answers are not scored as this run's.
    assert toy.main(["evaluate", *common, "--answers-file", str(out4), "--probe-images", "0", "--overwrite"]) == 0
    assert not toy.probe_path(out4).exists()
    assert not set(json.loads(metrics_path(out4).read_text())["summary"]) & probe_keys


def test_toy_name_swap_tv_reads_the_eval_prompt_positions(checkpoint, toy_world):
    """The probe's batched, right-padded forward gives the logits of the unpadded prompt it stands for: the eval's
    own generation prompt (``encode_query``), followed by the right answer's tokens before the one compared."""
    import torch

    from ferret.constants import IGNORE_INDEX

    world, records = toy_world
    model, processor = inference.load_model(checkpoint, device="cpu")
    probe = toy.probe_queries(records, world, max_images=3)
    counts = [len(r["objects"]) for r in records if len({o["name"] for o in r["objects"]}) >= 2][:3]
    assert len(probe.pairs) == 3 + sum(k * (k - 1) // 2 for k in counts)  # 3 yes/no pairs, every pair of names
    reads = toy.probe_reads(processor, probe)
    kinds = [(probe.queries[k].output["probe"], d) for k, d in reads]
    # Each pair is read at one answer token: the first where its right answers differ (with this small
    # tokenizer "Yes" and "No" may share a leading piece, and colours be spelt in several).
    assert all(reads[i][1] == reads[i + 1][1] for i in range(0, len(reads), 2))
    assert {kind for kind, _ in kinds} == {"ground", "yesno"}
    logits = toy.answer_token_logits(model, processor, probe, reads, batch_size=4)
    assert logits.shape == (len(reads), model.config.vocab_size)

    def unpadded(k: int, d: int) -> torch.Tensor:
        query = probe.queries[k]
        image = query.load_image()
        prompt = inference.encode_query(processor, query, image)[1]
        full = processor.encode([{"from": "human", "value": query.prompt},
                                 {"from": "gpt", "value": probe.answers[k]}], image)
        answer = full["input_ids"][full["labels"] != IGNORE_INDEX]
        batch = processor.pad([{**prompt, "input_ids": torch.cat([prompt["input_ids"], answer[:d]]), "labels": None}])
        batch.pop("labels")
        with torch.inference_mode():
            return model(**processor.model_inputs(batch, model)).logits[0, -1]

    for row in sorted({kinds.index(kind) for kind in set(kinds)}):  # one read of each kind and position
        torch.testing.assert_close(logits[row], unpadded(*reads[row]), atol=1e-4, rtol=1e-4)
    distances = toy.name_swap_tv(model, processor, probe, batch_size=4)
    assert distances == pytest.approx(toy.total_variation(logits[0::2], logits[1::2]).tolist(), abs=1e-6)
    assert toy.name_swap_tv(model, processor, probe, batch_size=1) == pytest.approx(distances, abs=1e-5)


# --------------------------------------------------------------------------------------------------------
# VQA, captioning and Osprey's referring classification: infer + score on the tiny checkpoint


def test_vqa_caption_osprey_infer_and_score(checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for image_id in (42, 7):
        _write_image(images / f"COCO_val2014_{image_id:012d}.jpg", (48, 40), seed=image_id)
    questions = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    questions.write_text(json.dumps({"questions": [{"question_id": 1, "image_id": 42, "question": "How many?"},
                                                   {"question_id": 2, "image_id": 7, "question": "What color?"}]}))
    annotations = tmp_path / "v2_mscoco_val2014_annotations.json"
    annotations.write_text(json.dumps({"annotations": [
        {"question_id": q, "image_id": 0, "answer_type": "other", "question_type": "what",
         "answers": [{"answer": "2", "answer_id": k} for k in range(10)]} for q in (1, 2)]}))
    answers = tmp_path / "vqa.jsonl"
    assert eval_main(["vqa", "infer", "--dataset", "vqav2", "--model-path", checkpoint, "--questions",
                      str(questions), "--image-folder", str(images), "--answers-file", str(answers), *GEN]) == 0
    lines = read_jsonl(answers)
    assert [r["question_id"] for r in lines] == [1, 2]
    assert lines[0]["prompt"] == "How many?\nAnswer the question using a single word or phrase."
    assert eval_main(["vqa", "score", "--dataset", "vqav2", "--predictions", str(answers), "--annotation-file",
                      str(annotations)]) == 0
    metrics = json.loads(metrics_path(answers).read_text())
    expected = sum(100.0 * (vqa_accuracy(r["text"], ["2"] * 10)) for r in lines) / 2
    assert metrics["results"]["overall"]["accuracy"] == pytest.approx(expected)

    refcocog = tmp_path / "finetune_refcocog_val_with_mask.json"
    refcocog.write_text(json.dumps({
        "images": [{"id": 5, "file_name": "COCO_val2014_000000000042.jpg", "width": 48, "height": 40,
                    "caption": "the red cup"}],
        "annotations": [{"id": 70, "image_id": 5, "bbox": [2, 2, 10, 10], "segmentation": [[2, 2, 12, 2, 12, 12]]},
                        {"id": 71, "image_id": 5, "bbox": [20, 5, 8, 8], "segmentation": [[20, 5, 28, 5, 28, 13]]}]}))
    captions = tmp_path / "refcocog_captions.jsonl"
    assert eval_main(["caption", "infer", "--dataset", "refcocog", "--region-format", "mask", "--model-path",
                      checkpoint, "--annotation-file", str(refcocog), "--image-folder", str(images),
                      "--answers-file", str(captions), *GEN]) == 0
    lines = read_jsonl(captions)
    assert [r["id"] for r in lines] == ["70", "71"]
    assert lines[0]["prompt"].startswith("Please give me a short description of [")
    assert "<region_fea>" in lines[0]["prompt"]
    assert eval_main(["caption", "score", "--dataset", "refcocog", "--predictions", str(captions),
                      "--annotation-file", str(refcocog), "--tokenizer", "simple", "--no-meteor"]) == 0
    metrics = json.loads(metrics_path(captions).read_text())
    assert metrics["benchmark"] == "refcocog_region_caption" and metrics["results"]["n"] == 2
    assert metrics["results"]["CIDEr"] >= 0 and "METEOR" not in metrics["results"]

    osprey_file = tmp_path / "paco_val_1k_category.json"
    osprey_file.write_text(json.dumps([{"file_name": "COCO_val2014_000000000007.jpg", "height": 40, "width": 48,
                                        "categories": ["dog:ear", "cup"],
                                        "annotations": [{"segmentation": [[2, 2, 12, 2, 12, 12]],
                                                         "bbox": [2, 2, 10, 10]},
                                                        {"segmentation": [[20, 5, 28, 5, 28, 13]]}]}]))
    classes = tmp_path / "osprey.jsonl"
    assert eval_main(["osprey", "infer", "--model-path", checkpoint, "--annotation-file", str(osprey_file),
                      "--image-folder", str(images), "--answers-file", str(classes), *GEN]) == 0
    lines = read_jsonl(classes)
    assert [(r["id"], r["category"]) for r in lines] == [("0_0", "dog:ear"), ("0_1", "cup")]
    assert eval_main(["osprey", "score", "--predictions", str(classes), "--dataset", "paco"]) == 0
    metrics = json.loads(metrics_path(classes).read_text())
    expected = sum(100 * osprey.semantic_iou(osprey.clean_answer(r["text"]), osprey.clean_category(r["category"]))
                   for r in lines) / 2
    assert metrics["results"]["semantic_iou"] == pytest.approx(expected)
