"""FerretProcessor: template, image expansion, region placeholders, label masking, padding, post-processing."""

import numpy as np
import pytest
import torch
from PIL import Image

from ferret.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from ferret.conversation import FERRET_SYSTEM, get_template
from ferret.processing import FerretProcessor
from ferret.regions import Box, FreeForm, Point, strip_regions


def _image(w=200, h=100, colour=(200, 30, 30)):
    return Image.new("RGB", (w, h), colour)


def test_ferret_v1_template_is_the_original():
    conv = get_template("ferret_v1")
    conv.append_message("USER", "<image>\nWhat is this?")
    conv.append_message("ASSISTANT", "A dog.")
    conv.append_message("USER", "Where?")
    conv.append_message("ASSISTANT", None)
    assert conv.get_prompt() == (
        FERRET_SYSTEM + " USER: <image>\nWhat is this? ASSISTANT: A dog.</s>USER: Where? ASSISTANT:"
    )
    assert FERRET_SYSTEM.endswith("Follow instructions. ")


def test_image_is_expanded_and_only_answers_are_supervised(processor):
    turns = [{"from": "human", "value": "What is this?"}, {"from": "gpt", "value": "a red circle"},
             {"from": "human", "value": "Where is the dog?"}, {"from": "gpt", "value": "a dog"}]
    out = processor.encode(turns, _image())
    ids, labels = out["input_ids"], out["labels"]
    assert ids[0] == processor.tokenizer.bos_token_id
    assert int((ids == IMAGE_TOKEN_INDEX).sum()) == processor.num_image_tokens
    image_start = int((ids == IMAGE_TOKEN_INDEX).nonzero()[0])
    # The image sits right after "SYS  USER: " and is never supervised.
    assert processor.tokenizer.decode(ids[1:image_start]).strip().endswith("USER:")
    assert (labels[ids == IMAGE_TOKEN_INDEX] == IGNORE_INDEX).all()
    supervised = labels[labels != IGNORE_INDEX]
    eos = processor.tokenizer.eos_token_id
    # Exactly the two answers, each with its </s>.
    assert int((supervised == eos).sum()) == 2
    pieces = processor.tokenizer.decode(supervised, skip_special_tokens=False).split("</s>")
    assert [p.strip() for p in pieces[:2]] == ["a red circle", "a dog"]
    # Supervised tokens are exactly the input tokens at those positions.
    assert torch.equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
    assert out["images"].shape == (3, 56, 56)


def test_labels_equal_tokenizing_answer_separately(processor):
    turns = [{"from": "human", "value": "Describe the image."}, {"from": "gpt", "value": "a dog [1, 2, 3, 4]"}]
    out = processor.encode(turns, _image())
    supervised = out["labels"][out["labels"] != IGNORE_INDEX].tolist()
    expected = processor.tokenizer(" a dog [1, 2, 3, 4]</s>", add_special_tokens=False)["input_ids"]
    # SentencePiece gives the answer's first word its leading-space piece in both cases.
    assert supervised[-len(expected) + 1:] == expected[1:] or supervised == expected


def test_region_placeholders_in_user_and_assistant_turns(processor):
    image = _image(200, 100)
    turns = [{"from": "human", "value": "What is <region0> next to <region1>?"},
             {"from": "gpt", "value": "a dog <bbox_location0>"}]
    regions = [[Box(20, 10, 99, 49), Point(150, 50)], [Box(0, 0, 199, 99)]]
    out = processor.encode(turns, image, regions=regions)
    text = processor.tokenizer.decode([t for t in out["input_ids"].tolist() if t >= 0])
    # The original's token stream: no "▁" token before <region_fea>, so the decoded text has no space there.
    assert "[100, 100, 495, 490]<region_fea> next to [750, 500]<region_fea> ?" in text
    assert "a dog [0, 0, 995, 990]" in text
    assert int((out["input_ids"] == processor.region_token_id).sum()) == 2
    box_mask, point_mask = out["region_masks"]
    assert box_mask.shape == (100, 200) and box_mask.dtype == torch.bool
    assert int(box_mask.sum()) == 80 * 40
    assert int(point_mask.sum()) == 121 and bool(point_mask[50, 150])


def test_no_coor_and_coordinates_only(processor):
    turns = [{"from": "human", "value": "What is <region0>?"}, {"from": "gpt", "value": "it is <region0>"}]
    regions = [[Box(0, 0, 9, 9)], [Box(0, 0, 9, 9)]]
    out = processor.encode(turns, _image(), regions=regions, no_coor=True)
    text = processor.tokenizer.decode([t for t in out["input_ids"].tolist() if t >= 0])
    assert "What is<region_fea> ?" in text and "[0, 0, 45, 90]" not in text
    out = processor.encode(turns, _image(), regions=regions, region_feature=False)
    assert out["region_masks"] == [] and int((out["input_ids"] == processor.region_token_id).sum()) == 0


def test_repeated_placeholder_gets_one_mask_per_token(processor):
    turns = [{"from": "human", "value": "Is <region0> the same as <region0>?"}]
    out = processor.encode(turns, _image(), regions=[[Box(0, 0, 9, 9)]], add_generation_prompt=True)
    assert int((out["input_ids"] == processor.region_token_id).sum()) == len(out["region_masks"]) == 2


@pytest.mark.parametrize(
    "turns, regions, message",
    [
        ([{"from": "human", "value": "What is <region1>?"}], [[Box(0, 0, 5, 5)]], "refers to region 1"),
        ([{"from": "human", "value": "What is <region_fea>?"}], None, "placeholders"),
        ([{"from": "gpt", "value": "hi"}], None, "alternate"),
        ([{"from": "human", "value": "What is <region0>?"}], [[Box(500, 500, 600, 600)]], "outside"),
        ([{"from": "human", "value": "What is <region0>?"}], [[FreeForm(np.zeros((100, 200), bool))]], "empty"),
    ],
)
def test_clear_errors(processor, turns, regions, message):
    with pytest.raises(ValueError, match=message):
        processor.encode(turns, _image(), regions=regions, where="rec 7: ")
    with pytest.raises(ValueError, match="rec 7"):
        processor.encode(turns, _image(), regions=regions, where="rec 7: ")


def test_truncation_keeps_tokens_and_masks_paired(processor):
    question = " ".join(f"<region{k}> and" for k in range(12))
    regions = [[Box(k, k, k + 10, k + 10) for k in range(12)]]
    turns = [{"from": "human", "value": question}]
    full = processor.encode(turns, _image(), regions=regions, add_generation_prompt=True, truncate=False)
    sixth = int((full["input_ids"] == processor.region_token_id).nonzero()[5])
    processor.model_max_length = sixth + 2  # cuts between the 6th and the 7th region
    out = processor.encode(turns, _image(), regions=regions, add_generation_prompt=True)
    assert len(out["input_ids"]) == sixth + 2
    assert len(out["region_masks"]) == 6
    assert int((out["input_ids"] == processor.region_token_id).sum()) == 6
    assert all(torch.equal(a, b) for a, b in zip(out["region_masks"], full["region_masks"][:6]))
    processor.model_max_length = 20
    with pytest.raises(ValueError, match="image does not fit"):
        processor.encode([{"from": "human", "value": "hi"}], _image(), add_generation_prompt=True)


def test_batch_call_left_pads(processor):
    batch = processor([_image(), _image(50, 80)], ["What is <region0>?", "Describe the image."],
                      regions=[[Box(1, 1, 20, 20)], []])
    ids, attention = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[0] == 2 and batch["images"].shape == (2, 3, 56, 56)
    assert attention[:, -1].all()  # left padding: every row ends with a real token
    short = int(attention[1].sum())
    assert (ids[1, : ids.shape[1] - short] == processor.tokenizer.pad_token_id).all()
    assert [len(m) for m in batch["region_masks"]] == [1, 0]
    assert batch["image_sizes"] == [(200, 100), (50, 80)]


def test_image_preprocessing_values(processor):
    image = Image.new("RGB", (30, 10), (255, 0, 128))
    pixels = processor.preprocess_image(image)
    assert pixels.shape == (3, 56, 56)
    expected = (np.array([255, 0, 128]) / 255.0 - np.array(processor.image_mean)) / np.array(processor.image_std)
    assert np.allclose(pixels[:, 28, 28].numpy(), expected, atol=1e-5)


def test_pad_mode_regions_round_trip(processor):
    processor.image_aspect_ratio = "pad"
    image = _image(200, 100)  # padded to 200x200 with 50 px above and below
    out = processor.encode([{"from": "human", "value": "What is <region0>?"}], image,
                           regions=[[Box(0, 0, 99, 49)]], add_generation_prompt=True)
    text = processor.tokenizer.decode([t for t in out["input_ids"].tolist() if t >= 0])
    assert "[0, 250, 495, 495]<region_fea> ?" in text
    # The mask lies on the padded square the sampler reads: rows 50..99 there are the image's rows 0..49.
    mask = out["region_masks"][0]
    assert mask.shape == (200, 200) and int(mask.sum()) == 100 * 50
    assert bool(mask[50, 0]) and bool(mask[99, 99]) and not bool(mask[49, 0]) and not bool(mask[100, 0])
    # A segmentation limiting the box moves with it; a raw prompt's image-sized mask is placed the same way.
    seg = np.zeros((100, 200), bool)
    seg[0:10, 0:10] = True
    limited = processor.encode([{"from": "human", "value": "What is <region0>?"}], image,
                               regions=[[Box(0, 0, 99, 49)]], within=[[seg]], add_generation_prompt=True)
    assert torch.equal(limited["region_masks"][0].nonzero().min(0).values, torch.tensor([50, 0]))
    assert int(limited["region_masks"][0].sum()) == 100
    raw = processor.encode_prompt("USER: <image>\nWhat is [0, 250, 495, 495] <region_fea>? ASSISTANT:", image,
                                  [(np.arange(100)[:, None] < 50) & (np.arange(200)[None, :] < 100)])
    assert torch.equal(raw["region_masks"][0], mask)
    clean, found = processor.post_process("a dog [0, 250, 495, 495].", (200, 100))
    assert clean == "a dog."
    assert found[0].region == Box(0, 0, 99, 49)
    # Mean-colour padding: the top row of the model input is the normalised mean, i.e. ~0.
    assert processor.preprocess_image(image)[:, 0, 28].abs().max() < 0.02


def test_post_process_pixels(processor):
    clean, found = processor.post_process("There is a dog [100, 200, 500, 600] and a cat [10, 20].", (640, 480))
    assert clean == "There is a dog and a cat."
    assert [g.phrase for g in found] == ["There is a dog", "a cat"]
    assert found[0].region == Box(64, 96, 320, 288)
    assert found[1].region == Point(6, 9)


def test_save_and_load(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = FerretProcessor.from_pretrained(str(tmp_path))
    assert loaded.to_dict() == processor.to_dict()
    assert loaded.region_token_id == processor.region_token_id
    turns = [{"from": "human", "value": "What is <region0>?"}, {"from": "gpt", "value": "a dog"}]
    a = processor.encode(turns, _image(), regions=[[Box(0, 0, 9, 9)]])
    b = loaded.encode(turns, _image(), regions=[[Box(0, 0, 9, 9)]])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_encode_prompt_matches_encode(processor):
    image = _image()
    via_turns = processor.encode([{"from": "human", "value": "What is <region0>?"}], image,
                                 regions=[[Box(10, 10, 50, 50)]], add_generation_prompt=True)
    conv = get_template("ferret_v1")
    conv.append_message("USER", "<image>\nWhat is [50, 100, 250, 500] <region_fea>?")
    conv.append_message("ASSISTANT", None)
    raw = processor.encode_prompt(conv.get_prompt(), image, via_turns["region_masks"])
    assert torch.equal(raw["input_ids"], via_turns["input_ids"])
    with pytest.raises(ValueError, match="1 <region_fea> but 0 mask"):
        processor.encode_prompt(conv.get_prompt(), image, [])


def test_readme_inference_snippet(model, processor):
    image = _image(120, 90)
    batch = processor(image, "What is <region0> doing?", regions=[[Box(12, 4, 30, 40)]])
    output = model.generate(**processor.model_inputs(batch, model), max_new_tokens=4, do_sample=False,
                            pad_token_id=processor.tokenizer.pad_token_id)
    answer = processor.decode(output[0])
    text, grounded = processor.post_process(answer, image.size)
    assert output.shape[0] == 1 and 1 <= output.shape[1] <= 4
    assert text == strip_regions(answer)
    assert all(isinstance(g.region, (Box, Point)) for g in grounded)
