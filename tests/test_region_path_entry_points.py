"""One image, one question with a box and a free-form region, and one answer, through every entry point that builds
model inputs (eval inference, the CLI, the model worker, the OpenAI API, the web UI's request, the GRIT training
data) in ``square_nocrop`` and ``pad``: the model receives identical ``input_ids`` and region masks, and every entry
point that reads an answer returns the same regions, in pixels of the user's image, computed here by hand."""

import types

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from serve_helpers import make_checkpoint, make_image, scripted_generate

from ferret import regions as R
from ferret.model.builder import load_pretrained_model

W, H = 80, 50  # not square, so that the pad frame shifts y by (80 - 50) / 2 = 15 px
QUESTION = "What is <region0> next to <region1>?"
ANSWER = "a red circle [100, 200, 500, 600] and a dot [700, 300]"
# int(v * side / 1000) on the model-input canvas, then back to the image (pad: y - 15):
#   square_nocrop (80 x 50): x = int(v * 80 / 1000), y = int(v * 50 / 1000)
#   pad (80 x 80 canvas, image at top 15): x = int(v * 80 / 1000), y = int(v * 80 / 1000) - 15
EXPECTED_ANSWER = {
    "square_nocrop": [("a red circle", R.Box(8, 10, 40, 30)), ("a dot", R.Point(56, 15))],
    "pad": [("a red circle", R.Box(8, 1, 40, 33)), ("a dot", R.Point(56, 9))],
}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, tokenizer_dir):
    return load_pretrained_model(make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-ferret", tokenizer_dir),
                                 device="cpu")


def regions_of_the_question():
    shape = np.zeros((H, W), dtype=bool)
    shape[30:38, 50:70] = True
    shape[30:34, 50:55] = False  # not a rectangle: its mask is not its box
    return R.Box(5, 6, 40, 30), R.FreeForm(shape)


def as_pairs(grounded):
    return [(g.phrase, g.region) for g in grounded]


def assert_same_inputs(features, expected, what):
    ids = features["input_ids"]
    ids = ids[0] if ids.dim() == 2 else ids
    assert ids.tolist() == expected["input_ids"].tolist(), what
    masks = features["region_masks"]
    masks = masks[0] if masks and isinstance(masks[0], (list, tuple)) else masks
    assert len(masks) == len(expected["region_masks"]) == 2, what
    for got, want in zip(masks, expected["region_masks"], strict=True):
        assert torch.equal(torch.as_tensor(got), want), what


@pytest.mark.parametrize("mode", ["square_nocrop", "pad"])
def test_every_entry_point_builds_the_same_inputs_and_reads_the_same_answer(loaded, mode, monkeypatch, tmp_path):
    import ferret.serve.gradio_web_server as gws
    from ferret.data.grit import DataOptions, GritDataset
    from ferret.eval.inference import Query, encode_query, generate_batches
    from ferret.serve.api import ChatServer
    from ferret.serve.cli import ChatSession
    from ferret.serve.inference import SamplingParams
    from ferret.serve.model_worker import ModelWorker
    from ferret.serve.protocol import build_chat_payload, chat_messages

    model, processor = loaded
    monkeypatch.setattr(processor, "image_aspect_ratio", mode)
    image = make_image(W, H)
    box, free = regions_of_the_question()
    turn = [{"from": "human", "value": QUESTION}]
    expected = processor.encode(turn, image, regions=[[box, free]], add_generation_prompt=True, truncate=False)
    canvas = (H, W) if mode == "square_nocrop" else (W, W)
    assert [tuple(m.shape) for m in expected["region_masks"]] == [canvas, canvas]
    # the free-form region's mask is its shape (on the canvas), not its box
    top = 0 if mode == "square_nocrop" else 15
    assert int(expected["region_masks"][1].sum()) == int(free.mask.sum())
    assert bool(expected["region_masks"][1][top + 31, 60]) and not bool(expected["region_masks"][1][top + 31, 51])

    # eval inference
    query = Query(image=image, prompt=QUESTION, output={"id": 0}, regions=[box, free])
    assert_same_inputs(encode_query(processor, query, image)[1], expected, "eval")

    # the command-line chat
    calls = []
    monkeypatch.setattr(model, "generate", scripted_generate(processor.tokenizer, ANSWER, calls))
    session = ChatSession(model, processor, image, SamplingParams(temperature=0.0, max_new_tokens=200),
                          out=open(tmp_path / "cli.txt", "w"))
    text, cli_grounded = session.ask(QUESTION, [box, free])
    assert text == ANSWER
    assert_same_inputs(calls[0], expected, "cli")

    # the model worker, the OpenAI API and the web UI's request
    messages = chat_messages(turn, image, [[box, free]])
    worker = ModelWorker(model, processor, "tiny-ferret", "http://127.0.0.1:1", None)
    assert_same_inputs(worker.prepare(build_chat_payload(messages, max_new_tokens=4))[0], expected, "worker")
    api = ChatServer(model, processor, "tiny-ferret")
    assert_same_inputs(api.prepare({"messages": messages}, {}), expected, "api")
    ui_messages = gws.build_messages([{"from": "human", "value": "What is [region0] next to [region1]?"}],
                                     [box, free], image)
    assert_same_inputs(worker.prepare(build_chat_payload(ui_messages, max_new_tokens=4))[0], expected, "web UI")

    # the training data: a GRIT record whose first region is referred to as a box and whose second is a box limited
    # by its segmentation (a free-form region), answered by ANSWER
    image.save(tmp_path / "img.png")
    rle = mask_utils.encode(np.asfortranarray(free.mask.astype(np.uint8)))
    record = {
        "image": "img.png", "image_w": W, "image_h": H,
        "conversations": [{"from": "human", "value": "<image>\nWhat is <bbox_location0> next to <bbox_location1>?"},
                          {"from": "gpt", "value": ANSWER}],
        "box_x1y1x2y2": [[[box.x1, box.y1, box.x2, box.y2], [50, 30, 69, 37]], []],
        "masks": [[None, {"size": [H, W], "counts": rle["counts"].decode("ascii")}], []],
        "refer_as": ["box", None],
    }
    import json

    (tmp_path / "vg_object.json").write_text(json.dumps([record]))
    train = GritDataset([str(tmp_path / "vg_object.json")], [str(tmp_path)], processor, DataOptions())[0]
    n = len(expected["input_ids"])
    assert train["input_ids"][:n].tolist() == expected["input_ids"].tolist()  # the prompt, then the answer
    assert (train["labels"][:n] == -100).all() and (train["labels"][n:] != -100).any()
    assert_same_inputs({"input_ids": train["input_ids"][:n], "region_masks": train["region_masks"]}, expected,
                       "training data")

    # the answer, read back by every entry point that reads one
    want = EXPECTED_ANSWER[mode]
    assert as_pairs(processor.post_process(ANSWER, image.size)[1]) == want
    assert as_pairs(cli_grounded) == want
    monkeypatch.setattr(model, "generate", scripted_generate(processor.tokenizer, ANSWER))
    [[answer]] = list(generate_batches(model, processor, [query], batch_size=1))
    assert answer.text == ANSWER and as_pairs(answer.regions) == want
    step = types.SimpleNamespace(text=ANSWER, finish_reason="stop", prompt_tokens=n, num_tokens=12)
    message = worker.final_message(step, "", image.size)
    assert as_pairs(gws.grounded_from_message(message, ANSWER, image.size)) == want
    clean, api_regions = api.grounding(ANSWER, image.size)
    assert clean == "a red circle and a dot"
    assert api_regions == message["regions"]
    assert [(r["phrase"], r["type"]) for r in api_regions] == [("a red circle", "box"), ("a dot", "point")]
