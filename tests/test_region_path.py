"""The region path's bounds and defaults: placeholders are counted before masks are built, masks are compact and
bounded for large images (exact below the bound), the placeholder syntax has one owner, and a checkpoint's config
says whether it reads region features."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import ferret.processing as processing
import ferret.regions as R
from ferret.model.configuration import FerretConfig, reads_region_features
from ferret.regions import Box, FreeForm, Point, mask_stride, region_mask


def test_placeholder_syntax_has_one_owner():
    assert processing.PLACEHOLDER is R.PLACEHOLDER
    assert R.find_placeholders("a<region0>, <bbox_location12>b <regionx>") == [(1, 10, 0), (12, 29, 12)]
    assert R.placeholder(3) == "<region3>"
    with pytest.raises(ValueError, match="non-negative integer"):
        R.placeholder(-1)
    box = Box(64, 48, 128, 96)  # on 640x480: [100, 100, 200, 200]
    assert R.placeholder_text(box, 640, 480, is_user=True) == "[100, 100, 200, 200] <region_fea>"
    assert R.placeholder_text(box, 640, 480, is_user=False) == "[100, 100, 200, 200]"
    assert R.placeholder_text(box, 640, 480, is_user=True, region_feature=False) == "[100, 100, 200, 200]"
    assert R.placeholder_text(box, 640, 480, is_user=True, no_coor=True) == "<region_fea>"
    assert R.placeholder_text(box, 640, 480, is_user=False, no_coor=True) == ""


def test_mask_stride_rule():
    assert mask_stride(1024, 768, 1024) == 1
    assert mask_stride(1025, 10, 1024) == 2
    assert mask_stride(4096, 4096, 1024) == 4
    assert mask_stride(10, 5000, 1024) == 5  # ceil(5000 / 1024)
    assert mask_stride(5000, 5000, None) == 1
    with pytest.raises(ValueError, match="max_side"):
        mask_stride(10, 10, 0)


@pytest.mark.parametrize("region", [Point(7, 300), Box(3, 4, 900, 650), Box(-5, -5, 2000, 2)])
def test_masks_up_to_the_bound_are_the_pixel_masks(region):
    exact = region_mask(region, 1000, 700)
    bounded = region_mask(region, 1000, 700, max_side=1000)
    assert bounded.dtype == np.bool_ and bounded.shape == (700, 1000)
    assert np.array_equal(exact, bounded)


def test_masks_of_large_images_are_built_on_cells():
    # 4100 x 2050 with max_side 1024: stride ceil(4100 / 1024) = 5 -> [410, 820] cells.
    box = region_mask(Box(10, 20, 34, 24), 4100, 2050, max_side=1024)
    assert box.shape == (410, 820) and box.dtype == np.bool_
    rows, cols = np.nonzero(box)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (4, 4, 2, 6)  # y 20..24 -> 4; x 10..34 -> 2..6
    # A point's 11x11 window x 995..1005, y 0..5 covers cells x 199..201, y 0..1.
    point = region_mask(Point(1000, 0), 4100, 2050, max_side=1024)
    assert list(zip(*np.nonzero(point))) == [(0, 199), (0, 200), (0, 201), (1, 199), (1, 200), (1, 201)]
    # A shape sets every cell it touches; `within` masks are pooled the same way.
    shape = np.zeros((2050, 4100), bool)
    shape[7, 9] = shape[2049, 4099] = True
    pooled = region_mask(FreeForm(shape), 4100, 2050, max_side=1024)
    assert list(zip(*np.nonzero(pooled))) == [(1, 1), (409, 819)]
    within = np.zeros((2050, 4100), bool)
    within[22, 12] = True
    inside = region_mask(Box(10, 20, 34, 24), 4100, 2050, within=within, max_side=1024)
    assert list(zip(*np.nonzero(inside))) == [(4, 2)]


def _processor(processor, **settings):
    for key, value in settings.items():
        setattr(processor, key, value)
    return processor


def test_placeholders_are_counted_before_any_mask_is_built(processor, monkeypatch):
    built = []
    real = R.region_mask
    monkeypatch.setattr(R, "region_mask", lambda *a, **k: built.append(1) or real(*a, **k))
    image_size = (4096, 4096)
    many = [{"from": "human", "value": " ".join(f"<region{k}>" for k in range(200))}]
    regions = [[Box(k, k, k + 50, k + 50) for k in range(200)]]
    with pytest.raises(ValueError, match="200 region placeholders.*limit is 100 \\(max_regions\\)"):
        processor.encode(many, image_size=image_size, regions=regions)
    # Across turns too: 60 + 60 > 100, found before turn 0's masks are built.
    turns = [many[0] | {"value": " ".join(f"<region{k}>" for k in range(60))}, {"from": "gpt", "value": "ok"},
             {"from": "human", "value": " ".join(f"<region{k}>" for k in range(60))}]
    with pytest.raises(ValueError, match="120 region placeholders"):
        processor.encode(turns, image_size=image_size, regions=[regions[0][:60], [], regions[0][:60]])
    # A placeholder without a region is found before the turn's first (valid) region gets a mask.
    with pytest.raises(ValueError, match="turn 0: placeholder '<region1>' refers to region 1 but the turn has 1"):
        processor.encode([{"from": "human", "value": "<region0> and <region1>"}], image_size=image_size,
                         regions=[[Box(0, 0, 9, 9)]])
    assert built == []
    # The cap is a setting, saved with the processor; masks of a 4096^2 image are 1024^2 bools.
    _processor(processor, max_regions=200)
    out = processor.encode(many, image_size=image_size, regions=regions, truncate=False)
    assert len(out["region_masks"]) == 200 == len(built)
    assert {tuple(m.shape) for m in out["region_masks"]} == {(1024, 1024)}
    assert all(m.dtype == torch.bool for m in out["region_masks"])
    assert processor.to_dict()["max_regions"] == 200 and processor.to_dict()["max_mask_side"] == 1024


def test_raw_prompt_cap_and_settings_validation(processor):
    _processor(processor, max_regions=2)
    prompt = "USER: <image>\n" + "[1, 2] <region_fea> " * 3 + "ASSISTANT:"
    masks = [np.ones((10, 10), bool)] * 3
    with pytest.raises(ValueError, match="3 <region_fea>; the limit is 2"):
        processor.encode_prompt(prompt, Image.new("RGB", (10, 10)), masks)
    with pytest.raises(ValueError, match="max_regions must be a positive integer"):
        processing.FerretProcessor(processor.tokenizer, max_regions=0)


def test_settings_survive_save_and_load(processor, tmp_path):
    _processor(processor, max_regions=7, max_mask_side=512)
    processor.save_pretrained(str(tmp_path))
    loaded = processing.FerretProcessor.from_pretrained(str(tmp_path))
    assert (loaded.max_regions, loaded.max_mask_side) == (7, 512)


def test_saved_folder_has_the_files_the_original_loads(processor, tmp_path):
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    processor.save_pretrained(str(tmp_path))
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        assert (tmp_path / name).is_file(), name
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["legacy"] is True
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert json.loads((tmp_path / "added_tokens.json").read_text()) == {"<region_fea>": processor.region_token_id}
    special = json.loads((tmp_path / "special_tokens_map.json").read_text())
    assert special["eos_token"]["content"] == "</s>" and special["eos_token"]["rstrip"] is False
    assert special["pad_token"] == "<unk>"
    # The SentencePiece-backed slow class reads the folder: same vocabulary, same region token.
    slow = SentencePieceBackend.from_pretrained(str(tmp_path))
    assert slow.convert_tokens_to_ids("<region_fea>") == processor.region_token_id
    assert slow.sp_model.encode("What is this?") == processor.prompt_tokenizer.encode("What is this?")


def test_checkpoint_config_says_whether_it_reads_region_features(tmp_path):
    assert reads_region_features({"im_region_fea_token": 32000, "region_geo_sampler": True})
    assert reads_region_features({"im_region_fea_token": 32000, "region_geo_sampler": False,
                                  "region_fea_adapter": True})
    assert not reads_region_features({"im_region_fea_token": 32000, "region_geo_sampler": False})
    assert not reads_region_features({"im_region_fea_token": None, "region_geo_sampler": True})
    assert not reads_region_features({"im_region_fea_token": 32000, "region_geo_sampler": True,
                                      "add_region_feature": False})
    assert reads_region_features(FerretConfig())
    assert not reads_region_features(FerretConfig(region_geo_sampler=False))
    # A folder whose config lacks the field: the weight index decides.
    (tmp_path / "config.json").write_text(json.dumps({"im_region_fea_token": 32000}))
    assert not reads_region_features(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.region_geo_sampler.dim_projector.weight": "a.safetensors"}}))
    assert reads_region_features(str(tmp_path))
    with pytest.raises(ValueError, match="no config.json"):
        reads_region_features(str(tmp_path / "missing"))


def test_a_foreign_sentencepiece_model_is_refused(processor):
    from pathlib import Path

    other = (Path(__file__).parent / "fixtures" / "llama_test_tokenizer.model").read_bytes()
    with pytest.raises(ValueError, match="tokenizer.model has 512 pieces but the tokenizer only 321 tokens"):
        processing.FerretProcessor(processor.tokenizer, sentencepiece_model=other)
    # Same size, other pieces: named by the first id that differs.
    import sentencepiece

    proto = sentencepiece.SentencePieceProcessor(model_proto=processor.prompt_tokenizer.sentencepiece_model)
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    model = model_pb2.ModelProto.FromString(proto.serialized_model_proto())
    model.pieces[300].piece = "▁zzz"
    with pytest.raises(ValueError, match="does not belong to this tokenizer: id 300 is '▁zzz'"):
        processing.FerretProcessor(processor.tokenizer, sentencepiece_model=model.SerializeToString())
