"""The processor's ids and labels equal the original Ferret stack's, for every tokenizer class and `legacy` setting.

The fixture tests/fixtures/tokenizer_conformance.json holds 34 conversations (points, boxes, several regions,
multi-turn, placeholders touching punctuation and digits, unicode, newlines, regions at the start and end of a
turn, text holding `</s>` / `<s>` / `<unk>`, training and generation prompts) with the input ids and
`preprocess_v1` labels that transformers 4.31's slow `LlamaTokenizer` gave for them on the committed test
SentencePiece model (tests/fixtures/llama_test_tokenizer.model). It was recorded once, outside this project's
environment, with

    python3 -m venv /tmp/oldstack
    /tmp/oldstack/bin/pip install torch==2.13.0 transformers==4.31.0 tokenizers==0.13.3 \
        sentencepiece==0.1.99 protobuf==3.20.3 "numpy<2"
    /tmp/oldstack/bin/python scripts/conformance/record_tokenizer_fixture.py

(the script's docstring says what it does, step by step, the original's way). The test feeds the processor the
same conversations (turns with placeholders, regions in pixels), so the template, the coordinate text and the
tokenisation are all checked, not only the tokenisation of a fixed string.

Tokenizers checked: transformers 5's `LlamaTokenizer` (the tokenizers-backed class that `AutoTokenizer` returns
for fast and slow requests alike), the SentencePiece-backed slow class transformers 5 still has
(`SentencePieceBackend`; there is no LLaMA-specific slow class any more), and a fast tokenizer with no
`tokenizer.model` beside it (`tokenizer.json` only) -- each with `legacy` true, false and absent in
tokenizer_config.json.
"""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from ferret.constants import IMAGE_TOKEN_INDEX
from ferret.processing import FerretProcessor
from ferret.regions import Box, Point

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE = json.loads((FIXTURES / "tokenizer_conformance.json").read_text(encoding="utf-8"))
SP_MODEL = FIXTURES / "llama_test_tokenizer.model"
CASES = FIXTURE["cases"]
LEGACY = {"true": True, "false": False, "absent": None}
NUM_IMAGE_TOKENS = 9


def _write_config(folder: Path, legacy) -> None:
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False}
    if legacy is not None:
        config["legacy"] = legacy
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def _tokenizer(kind: str, legacy, folder: Path):
    from transformers import AutoTokenizer
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SP_MODEL, folder / "tokenizer.model")
    _write_config(folder, legacy)
    if kind == "fast":
        return AutoTokenizer.from_pretrained(str(folder))
    if kind == "slow":
        return SentencePieceBackend.from_pretrained(str(folder))
    # tokenizer.json only: convert once, then drop the SentencePiece model
    AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))
    (folder / "tokenizer.model").unlink()
    _write_config(folder, legacy)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert getattr(tokenizer, "vocab_file", None) is None or not Path(tokenizer.vocab_file).is_file()
    return tokenizer


def _region(spec):
    return Box(*spec["box"]) if "box" in spec else Point(*spec["point"])


def _encode(processor: FerretProcessor, case: dict) -> tuple[list[int], list[int]]:
    """Our ids and labels for a fixture conversation, each image run collapsed to one IMAGE_TOKEN_INDEX as the
    original counted it."""
    regions = [[_region(r) for r in turn] for turn in case.get("regions") or []] or None
    image = Image.new("RGB", tuple(case["image"]), (90, 120, 200)) if case["image"] else None
    out = processor.encode(case["turns"], image, regions=regions, image_size=None if image else (64, 64),
                           add_generation_prompt=case["generation"], region_feature=case.get("region_feature", True),
                           no_coor=case.get("no_coor", False), truncate=False)
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    keep = [i for i, t in enumerate(ids) if t != IMAGE_TOKEN_INDEX or i == 0 or ids[i - 1] != IMAGE_TOKEN_INDEX]
    assert ids.count(IMAGE_TOKEN_INDEX) == (NUM_IMAGE_TOKENS if image else 0)
    return [ids[i] for i in keep], [labels[i] for i in keep]


@pytest.fixture(scope="module", params=[(kind, legacy) for kind in ("fast", "slow", "tokenizer_json_only")
                                        for legacy in LEGACY])
def processor(request, tmp_path_factory):
    kind, legacy = request.param
    tokenizer = _tokenizer(kind, LEGACY[legacy], tmp_path_factory.mktemp(f"{kind}_{legacy}"))
    return FerretProcessor(tokenizer, image_size=28, num_image_tokens=NUM_IMAGE_TOKENS)


def test_fixture_is_what_the_test_expects():
    import hashlib

    assert FIXTURE["versions"]["transformers"] == "4.31.0" and FIXTURE["tokenizer_class"] == "LlamaTokenizer"
    assert "tokenizer.model" in FIXTURE["checkpoint_files"]  # the original saves (and needs) the SentencePiece model
    assert FIXTURE["tokenizer_model_sha256"] == hashlib.sha256(SP_MODEL.read_bytes()).hexdigest()
    assert len(CASES) >= 30
    # The stripping rule the fixture pins, read from the recorded pieces: no "▁" before <region_fea>, and the
    # text after it starts with the dummy prefix.
    box = next(c for c in CASES if c["name"] == "box")
    at = box["pieces"].index("<region_fea>")
    assert box["pieces"][at - 1] == "]" and box["pieces"][at + 1] == "▁?"
    # A training conversation supervises its answers; text holding </s> breaks the rounds, so nothing is.
    assert any(label != -100 for label in next(c for c in CASES if c["name"] == "train_multi_turn")["labels"])
    assert all(label == -100 for label in next(c for c in CASES if c["name"] == "eos_text_in_user_turn")["labels"])


def test_ids_and_labels_equal_the_original(processor):
    assert processor.region_token_id == FIXTURE["region_token_id"]
    wrong = []
    for case in CASES:
        ids, labels = _encode(processor, case)
        if ids != case["input_ids"]:
            wrong.append(f"{case['name']}: ids")
        elif labels != case["labels"]:
            wrong.append(f"{case['name']}: labels")
    assert wrong == []


def test_saved_folder_round_trip_keeps_ids(processor, tmp_path):
    processor.save_pretrained(str(tmp_path))
    loaded = FerretProcessor.from_pretrained(str(tmp_path))
    for case in CASES:
        assert _encode(loaded, case) == (case["input_ids"], case["labels"]), case["name"]


@pytest.mark.parametrize("legacy", ["as_saved", "absent"])
def test_original_checkpoint_folder_loads_with_the_original_ids(tmp_path, legacy):
    """A tokenizer folder exactly as the original's training saved it (files recorded by the fixture script; 4.31
    writes ``legacy: true``, Vicuna v1.3's own files have no ``legacy``), loaded the README's way."""
    for name, content in FIXTURE["checkpoint_json_files"].items():
        if name == "tokenizer_config.json" and legacy == "absent":
            content = {k: v for k, v in content.items() if k != "legacy"}
        (tmp_path / name).write_text(json.dumps(content))
    shutil.copyfile(SP_MODEL, tmp_path / "tokenizer.model")
    processor = FerretProcessor.from_pretrained(str(tmp_path), image_size=28, num_image_tokens=NUM_IMAGE_TOKENS)
    assert processor.region_token_id == FIXTURE["region_token_id"]
    for case in CASES:
        assert _encode(processor, case) == (case["input_ids"], case["labels"]), case["name"]
