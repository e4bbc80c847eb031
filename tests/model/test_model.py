"""FerretLlamaForCausalLM: splicing, loss, batching, generation, errors, loading/saving, checkpoint layout."""

import json
import os

import pytest
import torch
from PIL import Image

from ferret.constants import IGNORE_INDEX
from ferret.model.builder import load_pretrained_model
from ferret.model.configuration import FerretConfig, ferret_7b, ferret_13b
from ferret.model.modeling import FerretLlamaForCausalLM, build_model
from ferret.regions import Box, Point


def _image(seed, w=80, h=60):
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def _train_batch(processor):
    samples = [
        ([{"from": "human", "value": "What is <region0>?"}, {"from": "gpt", "value": "a red circle"}],
         _image(0), [[Box(5, 5, 40, 30)], []]),
        ([{"from": "human", "value": "Where is the dog? Is <region0> near <region1>?"},
          {"from": "gpt", "value": "a dog [1, 2, 3, 4]"}],
         _image(1, 50, 70), [[Point(10, 10), Box(0, 0, 49, 69)], []]),
        ([{"from": "human", "value": "Describe the image."}, {"from": "gpt", "value": "a cat"}], _image(2), None),
    ]
    features = [processor.encode(turns, image, regions=regions) for turns, image, regions in samples]
    return processor.pad(features, padding_side="right")


def test_forward_backward_trains_the_right_parts(model, processor):
    model.train()
    batch = _train_batch(processor)
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name in ("model.mm_projector.weight", "model.region_geo_sampler.dim_projector.weight",
                 "model.region_geo_sampler.diff_projector_list.0.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert all(not p.requires_grad for p in model.vision_tower.parameters())


def test_loss_equals_full_vocabulary_cross_entropy(model, processor):
    batch = _train_batch(processor)
    loss = model(**batch).loss
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"]
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert torch.allclose(loss, expected, atol=1e-5)


def test_per_sample_losses_are_each_rows_cross_entropy(model, processor):
    batch = _train_batch(processor)
    out = model(**batch)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    targets = batch["labels"][:, 1:]
    for i in range(3):
        supervised = targets[i] != IGNORE_INDEX
        row = torch.nn.functional.cross_entropy(logits[i, :-1][supervised], targets[i][supervised], reduction="sum")
        assert int(out.sample_token_counts[i]) == int(supervised.sum()) > 0
        assert torch.allclose(out.sample_loss_sums[i], row, atol=1e-4), i
    assert torch.allclose(out.loss, out.sample_loss_sums.sum() / out.sample_token_counts.sum(), atol=1e-6)


def test_batched_forward_equals_single(model, processor):
    batch = _train_batch(processor)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       images=batch["images"], region_masks=batch["region_masks"]).logits
        for i in range(3):
            n = int(batch["attention_mask"][i].sum())
            single = model(input_ids=batch["input_ids"][i:i + 1, :n], images=batch["images"][i:i + 1],
                           region_masks=[batch["region_masks"][i]]).logits
            assert torch.allclose(logits[i, :n], single[0], atol=1e-4), i


def test_region_count_mismatch_names_sample_and_counts(model, processor):
    batch = _train_batch(processor)
    batch["region_masks"][1] = batch["region_masks"][1][:1]
    with pytest.raises(ValueError, match=r"sample 1: 2 <region_fea> token\(s\) in the text but 1 region mask"):
        model(**batch)


def test_image_errors(model, processor):
    batch = _train_batch(processor)
    with pytest.raises(ValueError, match="no images"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with pytest.raises(ValueError, match="image"):
        model(input_ids=batch["input_ids"], images=batch["images"][:2], region_masks=batch["region_masks"])


def test_region_features_come_from_the_region(model, processor):
    """Changing the image far from a region leaves its feature alone; changing it inside the region does not."""
    model.config.region_feature_axes = "xy"
    model.model.region_geo_sampler.transposed = False
    image = Image.new("RGB", (56, 56), (128, 128, 128))
    region = Box(0, 0, 13, 13)  # the top-left patch
    inputs = processor(image, "What is <region0>?", regions=[[region]])

    def region_embedding(pixels):
        ids = inputs["input_ids"]
        embeds = model.embed_multimodal(ids, pixels, inputs["region_masks"])
        return embeds[ids == processor.region_token_id][0]

    base = region_embedding(inputs["images"])
    far = inputs["images"].clone()
    far[..., 42:, 42:] = 2.0  # bottom-right patch
    near = inputs["images"].clone()
    near[..., :14, :14] = 2.0
    with torch.no_grad():
        # The tiny ViT mixes patches through attention, so "far" moves a little; "near" must move far more.
        d_far = (region_embedding(far) - base).norm()
        d_near = (region_embedding(near) - base).norm()
    assert d_near > 3 * d_far


def test_generate_batched_equals_one_by_one(model, processor):
    images = [_image(3), _image(4, 40, 90), _image(5)]
    prompts = ["What is <region0>?", "Describe the image.", "Where is <region0> and <region1>?"]
    regions = [[Box(3, 3, 30, 30)], [], [Point(5, 5), Box(10, 10, 70, 50)]]
    batch = processor(images, prompts, regions=regions)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    batched = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             images=batch["images"], region_masks=batch["region_masks"], **kwargs)
    assert batched.shape[0] == 3
    for i in range(3):
        one = processor(images[i], prompts[i], regions=[regions[i]])
        single = model.generate(input_ids=one["input_ids"], attention_mask=one["attention_mask"],
                                images=one["images"], region_masks=one["region_masks"], **kwargs)
        assert batched[i, : single.shape[1]].tolist() == single[0].tolist(), i


def test_save_load_round_trip(model, processor, tmp_path):
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "model.safetensors")
    assert os.path.isfile(tmp_path / "vision_tower" / "config.json")
    loaded, loaded_processor = load_pretrained_model(str(tmp_path), device="cpu")
    assert loaded.config.region_feature_axes == "xy" and not loaded.model.region_geo_sampler.transposed
    batch = _train_batch(loaded_processor)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, loaded(**inputs).logits, atol=1e-5)
    sd = model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())


def test_original_layout_checkpoint_loads_transposed(model, processor, tmp_path):
    """A checkpoint written the original way: pytorch_model.bin, inv_freq buffers, config without our field."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    os.makedirs(tmp_path / "ckpt")
    torch.save(state, tmp_path / "ckpt" / "pytorch_model.bin")
    config = model.config.to_dict()
    config.pop("region_feature_axes")
    config["architectures"] = ["FERRETLlamaForCausalLM"]
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    model.vision_tower.save_pretrained(str(tmp_path / "ckpt" / "vision_tower"))
    processor.tokenizer.save_pretrained(tmp_path / "ckpt")
    loaded, loaded_processor = load_pretrained_model(str(tmp_path / "ckpt"), device="cpu")
    assert loaded.config.region_feature_axes == "transposed"
    assert loaded.model.region_geo_sampler.transposed
    assert torch.equal(loaded.model.mm_projector.weight, model.model.mm_projector.weight)
    assert loaded_processor.region_token_id == loaded.config.im_region_fea_token


@pytest.mark.parametrize("make, hidden, layers", [(ferret_7b, 4096, 32), (ferret_13b, 5120, 40)])
def test_released_state_dict_names_and_shapes(make, hidden, layers):
    config = make(mm_vision_tower="openai/clip-vit-large-patch14-336")
    with torch.device("meta"):
        model = FerretLlamaForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "model.mm_projector.weight": (hidden, 1024), "model.mm_projector.bias": (hidden,),
        "model.region_geo_sampler.flatten_projector.weight": (1024, 32768),
        "model.region_geo_sampler.flatten_projector.bias": (1024,),
        "model.region_geo_sampler.dim_projector.weight": (hidden, 1024),
        "model.region_geo_sampler.dim_projector.bias": (hidden,),
        "model.embed_tokens.weight": (32001, hidden), "lm_head.weight": (32001, hidden), "model.norm.weight": (hidden,),
    }
    for i in (0, 1):
        p = f"model.region_geo_sampler."
        expected.update({
            f"{p}diff_projector_list.{i}.weight": (1026, 1026), f"{p}diff_projector_list.{i}.bias": (1026,),
            f"{p}agg_projector_list.{i}.net.0.weight": (1024, 2052, 1), f"{p}agg_projector_list.{i}.net.0.bias": (1024,),
            f"{p}agg_projector_list.{i}.norm.weight": (1024,), f"{p}agg_projector_list.{i}.norm.bias": (1024,),
        })
    ffn = config.intermediate_size
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in "qkvo":
            expected[f"{p}self_attn.{proj}_proj.weight"] = (hidden, hidden)
        expected.update({f"{p}mlp.gate_proj.weight": (ffn, hidden), f"{p}mlp.up_proj.weight": (ffn, hidden),
                         f"{p}mlp.down_proj.weight": (hidden, ffn), f"{p}input_layernorm.weight": (hidden,),
                         f"{p}post_attention_layernorm.weight": (hidden,)})
    assert shapes == expected
    assert len([k for k in shapes if "region_geo_sampler" in k or "mm_projector" in k]) == 18


def test_config_axis_field():
    assert FerretConfig().region_feature_axes == "xy"
    assert FerretConfig.from_dict({"vocab_size": 32001}).region_feature_axes == "transposed"
    assert FerretConfig.from_dict({"vocab_size": 32001, "region_feature_axes": "xy"}).region_feature_axes == "xy"
    with pytest.raises(ValueError, match="region_feature_axes"):
        FerretConfig(region_feature_axes="yx")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        FerretConfig(vocab_size=100, im_region_fea_token=100)


def test_model_moves_with_its_tower(model):
    model.to(torch.float64)
    assert model.vision_tower.dtype == torch.float64
    assert "vision_tower" not in " ".join(model.state_dict())


def test_sdpa_matches_eager(small_config, processor):
    batch = _train_batch(processor)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    small_config._attn_implementation = "eager"
    eager = build_model(small_config).eval()
    small_config._attn_implementation = "sdpa"
    sdpa = build_model(small_config).eval()
    with torch.no_grad():
        assert torch.allclose(eager(**inputs).logits, sdpa(**inputs).logits, atol=1e-4)


def test_tower_position_table_and_unfreeze(model):
    """What pretraining a tower needs from the vision module: replace the patches' position table (CLS row
    zeroed), and unfreeze the CLIP weights with or without that table."""
    import copy

    tower = copy.deepcopy(model.vision_tower)
    n, dim = tower.num_patches, tower.hidden_size
    table = torch.arange(n * dim, dtype=torch.float32).reshape(n, dim)
    tower.set_position_table(table)
    assert torch.equal(tower.position_table(), table)
    weight = next(v for k, v in tower.state_dict().items() if k.endswith("embeddings.position_embedding.weight"))
    assert weight.shape == (n + 1, dim) and not weight[0].any()
    with pytest.raises(ValueError, match=rf"a position table for this tower is \[{n}, {dim}\], got \[3, {dim}\]"):
        tower.set_position_table(torch.zeros(3, dim))
    assert not any(p.requires_grad for p in tower.parameters())
    tower.unfreeze(fixed_positions=True)
    frozen = [name for name, p in tower.named_parameters() if not p.requires_grad]
    assert len(frozen) == 1 and frozen[0].endswith("embeddings.position_embedding.weight")
    tower.unfreeze()
    assert all(p.requires_grad for p in tower.parameters())
    assert all(not p.requires_grad for p in model.vision_tower.parameters())  # the model's own stays frozen


def test_model_is_built_through_its_parents_and_keeps_the_tower_unregistered(model):
    """The model comes from LlamaPreTrainedModel's constructor and GenerationMixin; the tower is no sub-module (so
    no parameter or state-dict key of it), yet a copy carries its own tower and `.half()` moves it."""
    import copy

    from transformers import GenerationMixin
    from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

    assert isinstance(model, LlamaPreTrainedModel) and isinstance(model, GenerationMixin) and model.can_generate()
    assert not [name for name, _ in model.named_modules() if "vision_tower" in name or "_tower" in name]
    tower_ids = {id(p) for p in model.vision_tower.parameters()}
    assert not tower_ids & {id(p) for p in model.parameters()}
    twin = copy.deepcopy(model).half()
    assert twin.vision_tower is not model.vision_tower
    assert twin.vision_tower.dtype == torch.float16 and model.vision_tower.dtype != torch.float16
    assert twin.vision_tower.device == twin.model.embed_tokens.weight.device
