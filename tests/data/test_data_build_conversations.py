"""ferret data generate-conversations against a fake OpenAI-compatible server on 127.0.0.1 (started here):
replies become git_instruction records mapped back to the annotated pixel boxes, unparseable replies are kept
aside and counted, a 500 is retried, and a second run resumes without asking again."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

# Visual Genome fixtures: three images 60x40 (boxes on the grid: x * 1000 / 60, y * 1000 / 40, truncated)
#   image 1: dog [2, 3, 22, 18] -> [33, 75, 366, 450]; tree [30, 0, 59, 39] -> [500, 0, 983, 975]
#   image 2: cat [6, 4, 36, 24] -> [100, 100, 600, 600]
#   image 3: car [0, 0, 30, 20] -> [0, 0, 500, 500]; it is COCO image 7, an evaluation image (POPE)
GOOD = ("User: What is the object [33, 75, 366, 450] doing?\n"
        "Assistant: The dog [33, 75, 366, 450] is resting under the tree [500, 0, 983, 975].\n"
        "User: Is it in the shade?\nAssistant: Yes, the tree [500, 0, 983, 975] shades it.")
INVENTED = "User: What is at [1, 2, 3, 4]?\nAssistant: A cat [100, 100, 600, 600]."


class FakeOpenAI(BaseHTTPRequestHandler):
    calls: list = []
    failures_left = {"cat": 1}

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][1]["content"]
        FakeOpenAI.calls.append((self.path, body["model"], user))
        if "cat" in user and FakeOpenAI.failures_left["cat"]:
            FakeOpenAI.failures_left["cat"] -= 1
            self.send_response(500)
            self.end_headers()
            return
        reply = GOOD if "dog" in user else INVENTED
        payload = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                              "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                           "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    FakeOpenAI.calls = []
    FakeOpenAI.failures_left = {"cat": 1}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def box(x, y, w, h, name, object_id):
    return {"object_id": object_id, "x": x, "y": y, "w": w, "h": h, "names": [name], "synsets": []}


@pytest.fixture
def vg(tmp_path):
    root = tmp_path / "vg"
    root.mkdir()
    data = [{"image_id": i, "width": 60, "height": 40, "coco_id": 7 if i == 3 else None, "flickr_id": None,
             "url": f"https://cs.stanford.edu/people/rak248/VG_100K/{i}.jpg"} for i in (1, 2, 3)]
    (root / "image_data.json").write_text(json.dumps(data))
    dog, tree = box(2, 3, 20, 15, "dog", 1), box(30, 0, 29, 39, "tree", 2)
    (root / "objects.json").write_text(json.dumps([
        {"image_id": 1, "objects": [dog, tree]}, {"image_id": 2, "objects": [box(6, 4, 30, 20, "cat", 3)]},
        {"image_id": 3, "objects": [box(0, 0, 30, 20, "car", 4)]}]))
    (root / "relationships.json").write_text(json.dumps([
        {"image_id": 1, "relationships": [{"predicate": "under", "subject": dog, "object": tree}]}]))
    for i in (1, 2, 3):
        (root / "images/VG_100K").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(root / f"images/VG_100K/{i}.jpg")
    (tmp_path / "pope.jsonl").write_text(json.dumps({"image": "COCO_val2014_000000000007.jpg"}) + "\n")
    return root


def args(vg, out, endpoint, *extra):
    return ["--out", str(out), "--vg-dir", str(vg), "--vg-images", str(vg / "images"), "--endpoint", endpoint,
            "--model", "fake-gpt", "--api-key-env", "", "--retry-wait", "0", "--no-progress",
            "--exclude-eval", str(vg.parent / "pope.jsonl"), *extra]


def test_generate_convert_resume(server, vg, tmp_path):
    from ferret.data import validate as V
    from ferret.data.build.conversations import main

    out = tmp_path / "convs"
    assert main(args(vg, out, server, "--max-images", "1")) == 0
    assert len(FakeOpenAI.calls) == 1
    path, model, prompt = FakeOpenAI.calls[0]
    assert path == "/v1/chat/completions" and model == "fake-gpt"
    # the prompt lists the objects in the model's coordinate text, and the relationship by object number
    assert "1. dog [33, 75, 366, 450]\n2. tree [500, 0, 983, 975]" in prompt and "object 1 under object 2" in prompt

    assert main(args(vg, out, server)) == 0  # resumes: image 1 is not asked again; image 3 is an eval image
    prompts = [c[2] for c in FakeOpenAI.calls]
    assert len(prompts) == 3 and sum("dog" in p for p in prompts) == 1 and sum("cat" in p for p in prompts) == 2
    assert not any("car" in p for p in prompts)
    report = json.loads((out / "generate_report.json").read_text())
    assert (report["records"], report["unparseable"], report["unparseable_by_reason"]) == (1, 1, {"unknown_region": 1})
    assert report["answered_this_run"] == 1 and report["requests_this_run"] == 2  # the 500, then the answer
    assert report["skipped_already_answered"] == 1
    assert report["evaluation_images_left_out"] == {"vg": {"pope.jsonl (via VG coco_id)": 1}}
    aside = [json.loads(line) for line in (out / "unparseable.jsonl").read_text().splitlines()]
    assert [a["key"] for a in aside] == ["vg/2"] and "[1, 2, 3, 4]" in aside[0]["message"]

    (record,) = json.loads((out / "data/git_instruction_generated_vg_00000.json").read_text())
    assert record == {
        "id": "git_instruction/vg/1", "image": "VG_100K/1.jpg", "image_w": 60, "image_h": 40,
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is the object <bbox_location0> doing?"},
            {"from": "gpt", "value": "The dog <bbox_location0> is resting under the tree <bbox_location1>."},
            {"from": "human", "value": "Is it in the shade?"},
            {"from": "gpt", "value": "Yes, the tree <bbox_location0> shades it."}],
        "box_x1y1x2y2": [[[2, 3, 22, 18]], [[2, 3, 22, 18], [30, 0, 59, 39]], [], [[30, 0, 59, 39]]]}
    mix = json.loads((out / "train_mix.json").read_text())
    assert mix["data_multiple"] == [3.0] and mix["image_folder"] == [str(vg / "images")]
    checked = V.validate(mix["data_path"], mix["image_folder"])
    assert checked.records == 1 and checked.bad == 0

    assert main(args(vg, out, server)) == 0  # nothing left to ask
    assert len(FakeOpenAI.calls) == 3


def test_parallel_requests_give_the_same_records(server, vg, tmp_path):
    from ferret.data.build.conversations import main

    assert main(args(vg, tmp_path / "one", server, "--workers", "1")) == 0
    FakeOpenAI.failures_left = {"cat": 1}
    assert main(args(vg, tmp_path / "three", server, "--workers", "3")) == 0
    for name in ("data/git_instruction_generated_vg_00000.json", "unparseable.jsonl"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "three" / name).read_text()


def test_parse_reply_rejects_what_it_cannot_ground():
    from ferret.data.build.conversations import Unparseable, parse_reply

    context = {"key": "vg/1", "image": "1.jpg", "image_w": 60, "image_h": 40,
               "boxes": {"[33, 75, 366, 450]": [2, 3, 22, 18]}}
    for reply, reason in [("Assistant: hi\nUser: hello", "turn_order"),
                          ("User: where is the dog?", "no_turns"),
                          ("User: a?\nAssistant: b\nUser: c?", "unanswered_turn"),
                          ("User: what is [33, 75]?\nAssistant: a dog", "point_in_reply"),
                          ("User: anything?\nAssistant: nothing", "ungrounded"),
                          ("Sure! Here it is.\nUser: a?\nAssistant: b", "text_before_first_turn"),
                          ("User: <image> a?\nAssistant: b [33, 75, 366, 450]", "special_token")]:
        with pytest.raises(Unparseable) as err:
            parse_reply(reply, context)
        assert err.value.reason == reason, reply
    # markdown bold role names and continuation lines are fine
    record = parse_reply("**User:** what is\n[33, 75, 366, 450]?\n**Assistant:** a dog [33, 75, 366, 450].", context)
    assert record["conversations"][0]["value"] == "<image>\nwhat is <bbox_location0>?"
    assert record["box_x1y1x2y2"] == [[[2, 3, 22, 18]], [[2, 3, 22, 18]]]


def test_endpoint_errors_are_bounded(vg, tmp_path):
    from ferret.data.build.conversations import RequestFailed, chat

    with pytest.raises(RequestFailed, match="gave up after 3 attempts"):
        chat("http://127.0.0.1:9/v1", "m", "s", "u", None, timeout=2, max_retries=2, retry_wait=0, temperature=0)


def test_unreachable_endpoint_stops_after_max_failures(vg, tmp_path, capsys):
    from ferret.data.build.conversations import main

    assert main(args(vg, tmp_path / "out", "http://127.0.0.1:9/v1", "--max-retries", "0", "--max-failures", "1",
                     "--timeout", "2")) == 2
    assert "1 images failed to answer" in capsys.readouterr().err
    assert (tmp_path / "out" / "responses.jsonl").read_text() == ""  # nothing answered: a rerun asks again
