"""Named model configurations: the released 7B/13B shapes, and the small ones used by the toy world and tests.

`build_model(config)` makes a randomly initialised model (vision tower from ``config.vision_config``); real weights
come through `ferret.model.builder.load_pretrained_model`.
"""

from __future__ import annotations

from typing import Any

from ferret.model.configuration import FerretConfig

VICUNA_VOCAB = 32000


def _llama(hidden: int, layers: int, heads: int, ffn: int) -> dict[str, Any]:
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn,
                max_position_embeddings=2048, rms_norm_eps=1e-6, vocab_size=VICUNA_VOCAB + 1,
                im_region_fea_token=VICUNA_VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def ferret_7b(**overrides: Any) -> FerretConfig:
    """Ferret-7B (Vicuna-7B v1.3 + CLIP ViT-L/14-336), as released (original axis convention)."""
    return FerretConfig(**{**_llama(4096, 32, 32, 11008), "region_feature_axes": "transposed", **overrides})


def ferret_13b(**overrides: Any) -> FerretConfig:
    """Ferret-13B (Vicuna-13B v1.3 + CLIP ViT-L/14-336), as released (original axis convention)."""
    return FerretConfig(**{**_llama(5120, 40, 40, 13824), "region_feature_axes": "transposed", **overrides})


def small(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, vision_hidden: int = 32,
          vision_layers: int = 2, image_size: int = 56, patch_size: int = 14, num_init_point: int = 32,
          num_sub_point: tuple[int, ...] = (8, 4), num_neighbor: tuple[int, ...] = (4, 4),
          region_token: int | None = None, **overrides: Any) -> FerretConfig:
    """A small Ferret with a randomly initialised CLIP-shaped ViT: the shape of tests and the toy world.

    ``vocab_size`` is the tokenizer's length including ``<region_fea>``; ``region_token`` defaults to the last id.
    """
    vision = dict(hidden_size=vision_hidden, intermediate_size=vision_hidden * 4, num_hidden_layers=vision_layers,
                  num_attention_heads=max(1, vision_hidden // 16), image_size=image_size, patch_size=patch_size,
                  projection_dim=vision_hidden)
    fields = dict(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=hidden * 4, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        mm_vision_tower=None, vision_config=vision, mm_hidden_size=vision_hidden,
        sampler_num_init_point=num_init_point, sampler_num_sub_point=list(num_sub_point),
        sampler_num_neighbor=list(num_neighbor),
        im_region_fea_token=vocab_size - 1 if region_token is None else region_token,
    )
    fields.update(overrides)
    return FerretConfig(**fields)


def build_model(config: FerretConfig, seed: int | None = 0):
    """A randomly initialised model with its vision tower, in fp32 on CPU."""
    import torch

    from ferret.model.modeling import FerretLlamaForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    model = FerretLlamaForCausalLM(config)
    model.load_vision_tower()
    return model
