"""FerretConfig: a LLaMA config plus the vision, projector and sampler fields of a Ferret checkpoint.

Field names follow the original `config.json` (docs/compatibility.md §2) so released checkpoints load unchanged. The
sampler's structure constants, hard-coded in the original, are typed fields here whose defaults are the
original's. `region_feature_axes` records where region features are read (docs/compatibility.md §3):

* ``"xy"``: at the region's own location (the correct read; the default for new models);
* ``"transposed"``: mirrored across the image diagonal, as the original code reads them. A config.json without
  the field was written by the original code, so it loads as ``"transposed"`` and its weights keep working.

The named configurations live here too: `ferret_7b` and `ferret_13b` (the released shapes) and `small` (the toy
world's and the tests' shape).
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import CLIPVisionConfig, LlamaConfig

from ferret.constants import DEFAULT_VISION_TOWER

REGION_FEATURE_AXES = ("xy", "transposed")
POOLER_MODES = ("max", "mean")


@strict
class FerretConfig(LlamaConfig):
    """Configuration of a Ferret model (LLaMA decoder + CLIP tower + projector + spatial-aware sampler).

    Fields beyond LLaMA's:
        mm_vision_tower: hub id or local folder of the CLIP vision model (``vision_tower`` is read too).
        mm_hidden_size: width of the CLIP features (1024 for ViT-L/14).
        mm_vision_select_layer: hidden state taken from the tower (-2 = penultimate).
        mm_vision_select_feature: ``"patch"`` drops CLS, ``"cls_patch"`` keeps it.
        region_geo_sampler: region features come from the spatial-aware visual sampler.
        sampler_pooler_mode: ``"max"`` (the released recipe) or ``"mean"`` pooling over neighbours.
        sampler_num_init_point / sampler_num_sub_point / sampler_num_neighbor: the sampler's sizes.
        im_region_fea_token: token id of ``<region_fea>`` (32000 on Vicuna's 32000-token vocabulary).
        region_feature_axes: ``"xy"`` or ``"transposed"`` (see the module docstring).
        sampler_eval_seed: seed of the sampler's deterministic mode (evaluation and serving).
        vision_config: optional CLIP vision config (dict) used to build a randomly initialised tower when no
            weights are available, e.g. for tiny models; it also describes a saved ``vision_tower/``.
        image_size: side of the square model input in pixels; taken from ``vision_config`` when that is given.
    """

    model_type = "ferret"

    vocab_size: int = 32001  # Vicuna's 32000 + <region_fea>
    mm_vision_tower: str | None = DEFAULT_VISION_TOWER
    mm_hidden_size: int = 1024
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    region_geo_sampler: bool = True
    sampler_pooler_mode: str = "max"
    sampler_num_init_point: int = 512
    sampler_num_sub_point: list[int] | tuple[int, ...] = (128, 32)
    sampler_num_neighbor: list[int] | tuple[int, ...] = (24, 24)
    im_region_fea_token: int | None = 32000
    add_region_feature: bool = True
    mm_use_im_start_end: bool = False
    mm_use_im_patch_token: bool = False
    image_aspect_ratio: str = "square_nocrop"
    sampler_eval_seed: int = 0
    region_feature_axes: str = "xy"
    vision_config: dict | None = None
    image_size: int | None = None
    use_mm_proj: bool = True

    def __post_init__(self, **kwargs: Any):
        # The original stores the tower under either name.
        legacy_tower = kwargs.pop("vision_tower", None)
        if self.mm_vision_tower is None:
            self.mm_vision_tower = legacy_tower
        if isinstance(self.vision_config, CLIPVisionConfig):
            self.vision_config = self.vision_config.to_dict()
        if self.image_size is None:
            self.image_size = int(self.vision_config["image_size"]) if self.vision_config else 336
        self.sampler_num_sub_point = [int(v) for v in self.sampler_num_sub_point]
        self.sampler_num_neighbor = [int(v) for v in self.sampler_num_neighbor]
        if not self.architectures:
            self.architectures = ["FerretLlamaForCausalLM"]
        super().__post_init__(**kwargs)
        self._validate_ferret_fields()

    def _validate_ferret_fields(self) -> None:
        if self.mm_vision_select_feature not in ("patch", "cls_patch"):
            raise ValueError(
                f"mm_vision_select_feature must be 'patch' or 'cls_patch', got {self.mm_vision_select_feature!r}"
            )
        if self.sampler_pooler_mode not in POOLER_MODES:
            raise ValueError(f"sampler_pooler_mode must be one of {POOLER_MODES}, got {self.sampler_pooler_mode!r}")
        if self.region_feature_axes not in REGION_FEATURE_AXES:
            raise ValueError(
                f"region_feature_axes must be one of {REGION_FEATURE_AXES}, got {self.region_feature_axes!r}"
            )
        if len(self.sampler_num_sub_point) != len(self.sampler_num_neighbor):
            raise ValueError(
                "sampler_num_sub_point and sampler_num_neighbor need one entry per stage, got "
                f"{self.sampler_num_sub_point} and {self.sampler_num_neighbor}"
            )
        if self.im_region_fea_token is not None and self.im_region_fea_token >= self.vocab_size:
            raise ValueError(
                f"im_region_fea_token {self.im_region_fea_token} is outside the vocabulary (vocab_size "
                f"{self.vocab_size}); resize the embeddings after adding <region_fea> to the tokenizer"
            )

    @property
    def num_patches_per_side(self) -> int:
        patch = self.vision_config["patch_size"] if self.vision_config else 14
        return self.image_size // patch

    @property
    def num_image_tokens(self) -> int:
        """How many positions one image occupies in the LLM input."""
        extra = 1 if self.mm_vision_select_feature == "cls_patch" else 0
        return self.num_patches_per_side**2 + extra

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        # A config.json without the field comes from the original code, whose weights expect the transposed read.
        if "region_feature_axes" not in config_dict and "region_feature_axes" not in kwargs:
            config_dict = {**config_dict, "region_feature_axes": "transposed"}
        return super().from_dict(config_dict, **kwargs)


def reads_region_features(config: FerretConfig | dict[str, Any] | str) -> bool:
    """Whether a checkpoint's model reads region features, i.e. whether prompts for it should carry
    ``<region_fea>`` tokens with masks (servers and the UI default to this; a flag may override it).

    ``config`` is a FerretConfig, a config dict, or a checkpoint folder. The answer is True when the config turns
    on the spatial-aware sampler (``region_geo_sampler``) or the original's adapter variant
    (``region_fea_adapter``) and names a region token (``im_region_fea_token``), unless this project's
    ``add_region_feature`` is false. For a folder whose config.json
    has neither field, the weights decide: True when they hold sampler tensors (``model.region_geo_sampler.*``).
    """
    import json
    import os

    folder = None
    if isinstance(config, str):
        folder = config
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"{folder}: no config.json, so it is not a checkpoint folder")
        with open(path) as f:
            config = json.load(f)
    if isinstance(config, FerretConfig):
        config = config.to_dict()
    if not isinstance(config, dict):
        raise ValueError(f"expected a FerretConfig, a config dict or a checkpoint folder, got {type(config).__name__}")
    if config.get("im_region_fea_token") is None or config.get("add_region_feature") is False:
        return False
    if "region_geo_sampler" in config or "region_fea_adapter" in config:
        return bool(config.get("region_geo_sampler")) or bool(config.get("region_fea_adapter"))
    return folder is not None and _weights_have_sampler(folder)


def _weights_have_sampler(folder: str) -> bool:
    """True when the checkpoint's weight files name ``region_geo_sampler`` tensors (read from the index or the
    safetensors header; no tensor is loaded)."""
    import json
    import os

    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        path = os.path.join(folder, index)
        if os.path.isfile(path):
            with open(path) as f:
                names = json.load(f).get("weight_map", {})
            return any(".region_geo_sampler." in f".{name}" for name in names)
    path = os.path.join(folder, "model.safetensors")
    if os.path.isfile(path):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return any(".region_geo_sampler." in f".{name}" for name in f.keys())
    return False


# ----------------------------------------------------------------------------------------------------------
# Named configurations: the released 7B/13B shapes, and the small one of the toy world and the tests
# (`ferret.model.modeling.build_model` makes a randomly initialised model of any of them).

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
