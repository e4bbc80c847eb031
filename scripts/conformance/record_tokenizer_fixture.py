"""Record the ids and labels the original Ferret stack gives for a set of conversations with regions.

Runs in a throwaway virtual environment holding the original's tokenizer stack (it does not import ferret):

    python3 -m venv /tmp/oldstack
    /tmp/oldstack/bin/pip install torch==2.13.0 transformers==4.31.0 tokenizers==0.13.3 \
        sentencepiece==0.1.99 protobuf==3.20.3 "numpy<2"
    /tmp/oldstack/bin/python scripts/conformance/record_tokenizer_fixture.py \
        --model tests/fixtures/llama_test_tokenizer.model --out tests/fixtures/tokenizer_conformance.json

What it does, step by step, the way the original code does it:

1. Lays the SentencePiece model out as a base LLM folder with Vicuna v1.3's tokenizer files: a
   ``tokenizer_config.json`` without ``legacy`` and with bos/eos/unk as non-stripping ``AddedToken``s, and a
   ``special_tokens_map.json`` whose pad token is the plain string ``<unk>``.
2. Loads it as the original's training does: ``AutoTokenizer.from_pretrained(..., use_fast=False,
   model_max_length=2048, padding_side="right")``, ``pad_token = unk_token``, then adds ``<region_fea>`` with
   ``add_tokens([...], special_tokens=True)`` (``initialize_vision_tokenizer``), and saves it as a checkpoint does.
3. Loads that checkpoint folder as the original's model builder does (``use_fast=False``, ``<region_fea>``
   added again, a no-op) and checks both tokenizers give the same ids for every prompt.
4. For each conversation: writes each region as the original's loader does (``int(v * 1000 / size)`` after
   clamping to the image; ``"<coords> <region_fea>"`` in user turns, ``"<coords>"`` in assistant turns), moves
   ``<image>`` to the front of the first user turn (``preprocess_multimodal``), builds the ``ferret_v1`` prompt
   (SeparatorStyle.TWO), tokenises it with ``tokenizer_image_token`` (each ``<image>``-separated chunk with its
   BOS, only the first BOS kept, -200 between) and masks labels with ``preprocess_v1``'s round arithmetic.

``--check-saved DIR`` instead loads a folder written by ``FerretProcessor.save_pretrained`` with the same slow
tokenizer and writes, next to ``--out``, whether it gives the recorded ids for every conversation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

IMAGE_TOKEN = "<image>"
REGION_TOKEN = "<region_fea>"
IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
GRID = 1000
MODEL_MAX_LENGTH = 2048
SYSTEM = (
    "A chat between a human and an AI that understands visuals. In images, [x, y] denotes points: top-left [0, 0], "
    "bottom-right [width-1, height-1]. Increasing x moves right; y moves down. Bounding box: [x1, y1, x2, y2]. "
    "Image size: 1000x1000. Follow instructions. "
)
ROLES = ("USER", "ASSISTANT")
SEP, SEP2 = " ", "</s>"
PLACEHOLDER = re.compile(r"<(?:region|bbox_location)(\d+)>")

_TOKEN = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
VICUNA_TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": {"__type": "AddedToken", "content": "<s>", **_TOKEN},
    "clean_up_tokenization_spaces": False,
    "eos_token": {"__type": "AddedToken", "content": "</s>", **_TOKEN},
    "model_max_length": MODEL_MAX_LENGTH,
    "pad_token": None,
    "padding_side": "right",
    "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
    "unk_token": {"__type": "AddedToken", "content": "<unk>", **_TOKEN},
}
VICUNA_SPECIAL_TOKENS_MAP = {
    "bos_token": {"content": "<s>", **_TOKEN},
    "eos_token": {"content": "</s>", **_TOKEN},
    "pad_token": "<unk>",
    "unk_token": {"content": "<unk>", **_TOKEN},
}


def box(*v):
    return {"box": list(v)}


def point(*v):
    return {"point": list(v)}


def human(text):
    return {"from": "human", "value": text}


def gpt(text):
    return {"from": "gpt", "value": text}


# Each case: the conversation as a user of the processor gives it (turns with <region{k}> / <bbox_location{k}>
# placeholders, regions per turn in pixels of a W x H image), plus how it is encoded.
CASES = [
    dict(name="text_only", image=None, turns=[human("Hello, who are you?")]),
    dict(name="image_no_region", image=[640, 480], turns=[human("Describe the image.")]),
    dict(name="box", image=[640, 480], turns=[human("What is <region0>?")], regions=[[box(100, 50, 300, 400)]]),
    dict(name="point", image=[640, 480], turns=[human("What is <region0>?")], regions=[[point(320, 240)]]),
    dict(name="two_regions", image=[500, 333], turns=[human("Is <region0> to the left of <region1>?")],
         regions=[[box(0, 0, 100, 100), point(400, 300)]]),
    dict(name="region_at_start", image=[640, 480], turns=[human("<region0> what is this object?")],
         regions=[[box(10, 20, 30, 40)]]),
    dict(name="region_at_end", image=[640, 480], turns=[human("Tell me about <region0>")],
         regions=[[box(10, 20, 30, 40)]]),
    dict(name="region_is_whole_turn", image=[640, 480], turns=[human("<region0>")], regions=[[point(1, 1)]]),
    dict(name="touching_punctuation", image=[640, 480], turns=[human("What is(<region0>),<region1>.and?")],
         regions=[[box(1, 2, 3, 4), point(5, 6)]]),
    dict(name="touching_digits", image=[640, 480], turns=[human("Object 3<region0>4 is it?")],
         regions=[[box(64, 48, 128, 96)]]),
    dict(name="unicode", image=[640, 480], turns=[human("Qu'est-ce que c'est <region0> ? café 中文 😀")],
         regions=[[box(1, 1, 600, 400)]]),
    dict(name="newlines", image=[640, 480], turns=[human("Line one\n<region0>\nline two\n")],
         regions=[[point(100, 100)]]),
    dict(name="tab_and_double_spaces", image=[640, 480], turns=[human("What is  <region0>  \there?")],
         regions=[[box(1, 1, 60, 40)]]),
    dict(name="same_region_twice", image=[640, 480], turns=[human("Is <region0> the same as <region0>?")],
         regions=[[box(5, 5, 50, 50)]]),
    dict(name="three_regions_adjacent", image=[800, 600], turns=[human("<region0><region1><region2>")],
         regions=[[box(0, 0, 10, 10), point(20, 20), box(30, 30, 799, 599)]]),
    dict(name="clamped_box", image=[640, 480], turns=[human("What is <region0>?")],
         regions=[[box(-20, -5, 9000, 480)]]),
    dict(name="fractional_pixels", image=[333, 777], turns=[human("What is <region0> near <region1>?")],
         regions=[[box(10.7, 20.2, 300.9, 700.5), point(166.5, 388.5)]]),
    dict(name="large_image", image=[4000, 3000], turns=[human("Where is <region0>?")],
         regions=[[box(1234, 567, 3999, 2999)]]),
    dict(name="image_token_in_text", image=[640, 480], turns=[human("What is in <image> this picture <region0>?")],
         regions=[[point(10, 10)]]),
    dict(name="no_coor", image=[640, 480], turns=[human("What is <region0>?")], regions=[[box(1, 2, 3, 4)]],
         no_coor=True),
    dict(name="coordinates_only", image=[640, 480], turns=[human("What is <region0>?")],
         regions=[[box(1, 2, 3, 4)]], region_feature=False),
    dict(name="train_one_round", image=[640, 480], generation=False,
         turns=[human("What is <region0>?"), gpt("a dog <bbox_location0>.")],
         regions=[[box(100, 50, 300, 400)], [box(100, 50, 300, 400)]]),
    dict(name="train_grounding", image=[640, 480], generation=False,
         turns=[human("What are the locations of the dog and the cat?"),
                gpt("There is a dog <bbox_location0> and a cat <bbox_location1>.")],
         regions=[[], [box(1, 2, 300, 400), box(320, 10, 639, 479)]]),
    dict(name="train_multi_turn", image=[640, 480], generation=False,
         turns=[human("What is <region0>?"), gpt("a dog"),
                human("And <region0> next to <region1>?"), gpt("a cat <bbox_location0> on a car [1, 2]"),
                human("Is it red?"), gpt("Yes")],
         regions=[[box(10, 10, 100, 100)], [], [point(200, 200), box(300, 300, 400, 400)],
                  [box(300, 300, 400, 400)], [], []]),
    dict(name="train_region_at_turn_edges", image=[640, 480], generation=False,
         turns=[human("<region0>"), gpt("<bbox_location0>"), human("<region0> and <region1>"), gpt("No")],
         regions=[[point(7, 9)], [box(1, 1, 9, 9)], [box(2, 3, 4, 5), box(6, 7, 8, 9)], []]),
    dict(name="train_unicode_answer", image=[640, 480], generation=False,
         turns=[human("Décris <region0> s'il te plaît."), gpt("C'est un café ☕ à Paris 中文.")],
         regions=[[box(10, 10, 100, 100)], []]),
    dict(name="train_answer_with_newlines", image=[640, 480], generation=False,
         turns=[human("List the objects."), gpt("1. a dog <bbox_location0>\n2. a cat <bbox_location1>\n")],
         regions=[[], [box(1, 2, 3, 4), box(5, 6, 7, 8)]]),
    dict(name="train_text_only", image=None, generation=False,
         turns=[human("Hello there"), gpt("Hi! How can I help?"), human("Count to 3."), gpt("1 2 3")]),
    dict(name="history_then_question", image=[640, 480],
         turns=[human("What is <region0>?"), gpt("a dog <bbox_location0>"), human("Where is the cat <region0>?")],
         regions=[[box(10, 10, 100, 100)], [box(10, 10, 100, 100)], [point(50, 60)]]),
    dict(name="eos_text_in_user_turn", image=[640, 480], generation=False,
         turns=[human("Say </s> now <region0>"), gpt("ok")], regions=[[box(1, 1, 20, 20)], []]),
    dict(name="unk_and_bos_text", image=[640, 480], turns=[human("a <unk> b <s> c <region0>")],
         regions=[[box(1, 1, 20, 20)]]),
    dict(name="region_token_spaces_both_sides", image=[640, 480], turns=[human("x <region0> y <region1> z")],
         regions=[[point(1, 1), point(2, 2)]]),
    dict(name="answer_starts_with_space", image=[640, 480], generation=False,
         turns=[human("What is <region0>?"), gpt(" a dog")], regions=[[box(1, 1, 20, 20)], []]),
    dict(name="many_regions", image=[640, 480], turns=[human(" ".join(f"<region{k}>," for k in range(12)))],
         regions=[[box(k * 10, k * 5, k * 10 + 30, k * 5 + 30) for k in range(12)]]),
]


# ---------------------------------------------------------------------------------------------------------------
# The original's text formatting


def _clip(v, upper):
    return min(max(v, 0), upper)


def region_text(region, width, height):
    """``[x, y]`` / ``[x1, y1, x2, y2]`` on the 0..999 grid: clamp to the image, then ``int(v * 1000 / size)``."""
    if "point" in region:
        x, y = region["point"]
        return f"[{int(_clip(x, width - 1) * GRID / width)}, {int(_clip(y, height - 1) * GRID / height)}]"
    x1, y1, x2, y2 = region["box"]
    x1, x2 = sorted((_clip(x1, width - 1), _clip(x2, width - 1)))
    y1, y2 = sorted((_clip(y1, height - 1), _clip(y2, height - 1)))
    values = (int(x1 * GRID / width), int(y1 * GRID / height), int(x2 * GRID / width), int(y2 * GRID / height))
    return "[{}, {}, {}, {}]".format(*values)


def format_turn(text, regions, width, height, is_user, region_feature, no_coor):
    def one(match):
        coords = region_text(regions[int(match.group(1))], width, height)
        if is_user and region_feature:
            return REGION_TOKEN if no_coor else f"{coords} {REGION_TOKEN}"
        return "" if no_coor else coords

    return PLACEHOLDER.sub(one, text)


def build_prompt(case):
    image = case.get("image")
    width, height = image if image else (1, 1)
    messages = []
    for t, turn in enumerate(case["turns"]):
        regions = (case.get("regions") or [])[t] if t < len(case.get("regions") or []) else []
        text = format_turn(turn["value"], regions, width, height, t % 2 == 0,
                           case.get("region_feature", True), case.get("no_coor", False))
        if image and t == 0:  # preprocess_multimodal (training) and the eval scripts (inference)
            text = IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()
        messages.append((ROLES[t % 2], text))
    if case.get("generation", True):
        messages.append((ROLES[1], None))
    prompt = SYSTEM + SEP
    for i, (role, message) in enumerate(messages):
        prompt += f"{role}: {message}{(SEP, SEP2)[i % 2]}" if message else f"{role}:"
    return prompt


# ---------------------------------------------------------------------------------------------------------------
# The original's tokenisation and label masking


def tokenizer_image_token(prompt, tokenizer):
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE_TOKEN)]
    ids = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[offset:])
    return ids


def preprocess_v1_labels(prompt, ids, tokenizer, has_image):
    def count(text):
        return len(tokenizer_image_token(text, tokenizer)) if has_image else len(tokenizer(text).input_ids)

    target = list(ids)
    total_len = sum(1 for t in target if t != tokenizer.pad_token_id)
    sep = SEP + ROLES[1] + ": "
    cur_len = 1
    target[:cur_len] = [IGNORE_INDEX] * cur_len
    for rou in prompt.split(SEP2):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = count(rou)
        instruction_len = count(parts[0]) - 2
        end = min(cur_len + instruction_len, len(target))
        target[cur_len:end] = [IGNORE_INDEX] * max(0, end - cur_len)
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * max(0, len(target) - cur_len)
    if cur_len < tokenizer.model_max_length and cur_len != total_len:
        target = [IGNORE_INDEX] * len(target)
    return target


def encode(prompt, tokenizer, has_image):
    if has_image:
        return tokenizer_image_token(prompt, tokenizer)
    return tokenizer(prompt, max_length=tokenizer.model_max_length, truncation=True).input_ids


# ---------------------------------------------------------------------------------------------------------------


def load_tokenizers(model_path, workdir):
    from transformers import AutoTokenizer

    base = workdir / "vicuna_like"
    base.mkdir()
    shutil.copyfile(model_path, base / "tokenizer.model")
    (base / "tokenizer_config.json").write_text(json.dumps(VICUNA_TOKENIZER_CONFIG, indent=2))
    (base / "special_tokens_map.json").write_text(json.dumps(VICUNA_SPECIAL_TOKENS_MAP, indent=2))
    training = AutoTokenizer.from_pretrained(str(base), model_max_length=MODEL_MAX_LENGTH, padding_side="right",
                                             use_fast=False)
    training.pad_token = training.unk_token
    training.add_tokens([REGION_TOKEN], special_tokens=True)
    checkpoint = workdir / "checkpoint"
    training.save_pretrained(str(checkpoint))
    serving = AutoTokenizer.from_pretrained(str(checkpoint), use_fast=False)
    serving.add_tokens([REGION_TOKEN], special_tokens=True)
    return training, serving, checkpoint


def record(args):
    import sentencepiece
    import tokenizers
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        training, serving, checkpoint = load_tokenizers(args.model, Path(tmp))
        assert type(training).__name__ == "LlamaTokenizer", type(training)
        saved_files = sorted(p.name for p in checkpoint.iterdir())
        saved = {name: json.loads((checkpoint / name).read_text())
                 for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")}
        cases = []
        for case in CASES:
            prompt = build_prompt(case)
            has_image = case.get("image") is not None
            ids = encode(prompt, training, has_image)
            if encode(prompt, serving, has_image) != ids:
                raise SystemExit(f"{case['name']}: the checkpoint's tokenizer gives other ids than training's")
            labels = preprocess_v1_labels(prompt, ids, training, has_image)
            pieces = []
            for i, chunk in enumerate(prompt.split(IMAGE_TOKEN)):
                if i:
                    pieces.append(IMAGE_TOKEN)
                pieces.extend(training.tokenize(chunk))
            cases.append({
                **{k: v for k, v in case.items()},
                "generation": case.get("generation", True),
                "prompt": prompt,
                "pieces": pieces,
                "input_ids": ids,
                "labels": labels,
            })
    fixture = {
        "recorded_by": "scripts/conformance/record_tokenizer_fixture.py",
        "versions": {"python": sys.version.split()[0], "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__, "sentencepiece": sentencepiece.__version__},
        "tokenizer_model": Path(args.model).name,
        "tokenizer_model_sha256": hashlib.sha256(Path(args.model).read_bytes()).hexdigest(),
        "tokenizer_class": type(training).__name__,
        "region_token_id": training.convert_tokens_to_ids(REGION_TOKEN),
        "vocab_size": len(training),
        "checkpoint_files": saved_files,
        "checkpoint_json_files": saved,
        "cases": cases,
    }
    Path(args.out).write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"recorded {len(cases)} conversations into {args.out}")


def check_saved(args):
    """Loads a folder FerretProcessor saved, as the original's builder does, and compares its ids."""
    import transformers
    from transformers import AutoTokenizer

    fixture = json.loads(Path(args.out).read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(args.check_saved, use_fast=False)
    added = tokenizer.add_tokens([REGION_TOKEN], special_tokens=True)
    results = []
    for case in fixture["cases"]:
        ids = encode(case["prompt"], tokenizer, case.get("image") is not None)
        results.append({"name": case["name"], "same_ids": ids == case["input_ids"]})
    report = {
        "checked_by": "scripts/conformance/record_tokenizer_fixture.py --check-saved",
        "transformers": transformers.__version__,
        "tokenizer_class": type(tokenizer).__name__,
        "files": sorted(p.name for p in Path(args.check_saved).iterdir()),
        "region_token_id": tokenizer.convert_tokens_to_ids(REGION_TOKEN),
        "region_token_newly_added": bool(added),
        "legacy": getattr(tokenizer, "legacy", None),
        "all_same": all(r["same_ids"] for r in results),
        "cases": results,
    }
    out = Path(args.out).with_name("saved_folder_in_transformers_4_31.json")
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{sum(r['same_ids'] for r in results)}/{len(results)} conversations give the recorded ids; wrote {out}")
    if not report["all_same"] or added:
        raise SystemExit(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tests/fixtures/llama_test_tokenizer.model")
    parser.add_argument("--out", default="tests/fixtures/tokenizer_conformance.json")
    parser.add_argument("--check-saved", metavar="DIR", help="compare a folder FerretProcessor saved instead")
    args = parser.parse_args()
    check_saved(args) if args.check_saved else record(args)


if __name__ == "__main__":
    main()
