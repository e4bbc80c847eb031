"""FerretLlamaForCausalLM: the one Ferret model class used by training, evaluation and serving.

The LLaMA decoder reads a sequence in which

* every image position (one ``IMAGE_TOKEN_INDEX`` per patch, written by FerretProcessor) holds the projected CLIP
  patch feature of that image, placed with one ``masked_scatter``;
* every ``<region_fea>`` token holds the spatial-aware sampler's feature of the matching region mask, in the order
  the tokens appear (sample by sample), placed with a second ``masked_scatter``.

State-dict names equal the original's (docs/compatibility.md §1.2): LLaMA keys, ``model.mm_projector.*`` and
``model.region_geo_sampler.*``. The CLIP tower is deliberately not a registered sub-module, so it is neither in the
state dict nor sharded by ZeRO/FSDP; it lives in ``<checkpoint>/vision_tower/`` (or comes from the hub) and follows
the model's device and dtype (see `FerretLlamaForCausalLM`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, LlamaForCausalLM, LlamaModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

from ferret.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from ferret.model.configuration import FerretConfig
from ferret.model.sampler import SpatialAwareVisualSampler, sample_region_points
from ferret.model.vision import CLIPVisionTower

logger = logging.getLogger(__name__)

VISION_TOWER_DIR = "vision_tower"
# Region masks per sample: a list (one entry per sample) of sequences of bool [H, W] masks, or None.
RegionMasks = Sequence[Sequence[torch.Tensor] | None] | None


@dataclass
class FerretCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus, when labels were given, each sample's summed next-token cross-entropy over its
    supervised tokens and their count [B] (the trainer's per-sample averaging and per-task logs use them)."""

    sample_loss_sums: torch.FloatTensor | None = None
    sample_token_counts: torch.LongTensor | None = None


class FerretLlamaModel(LlamaModel):
    """The LLaMA decoder plus the projector and the region sampler (``model.*`` in the state dict)."""

    config_class = FerretConfig

    def __init__(self, config: FerretConfig):
        super().__init__(config)
        self.mm_projector = nn.Linear(config.mm_hidden_size, config.hidden_size)
        if config.region_geo_sampler:
            self.region_geo_sampler = SpatialAwareVisualSampler(
                input_dim=config.mm_hidden_size,
                output_dim=config.hidden_size,
                num_init_point=config.sampler_num_init_point,
                num_sub_point=tuple(config.sampler_num_sub_point),
                num_neighbor=tuple(config.sampler_num_neighbor),
                pooler_mode=config.sampler_pooler_mode,
                transposed=config.region_feature_axes == "transposed",
            )
        self.post_init()


class FerretLlamaForCausalLM(LlamaPreTrainedModel, GenerationMixin):
    """LLaMA causal LM that sees images and referred regions.

    ``forward`` and ``generate`` take ``images`` [B_img, 3, S, S] (one per sample that has image tokens, in batch
    order) and ``region_masks`` (per sample, bool [H, W] masks in the pixels of that sample's original image, one per
    ``<region_fea>`` token).

    Built the way transformers builds its multimodal models (e.g. ``LlavaForConditionalGeneration``): from the
    family's ``PreTrainedModel`` plus ``GenerationMixin``, through their constructors. It is not a subclass of
    ``LlamaForCausalLM``, whose constructor builds a plain ``LlamaModel`` where this model needs
    `FerretLlamaModel`; it takes that class's parallelism plans and tied-weight keys, so the names and the
    layout are the same.

    The CLIP tower is deliberately NOT a registered sub-module (the one deviation from a plain module tree):
    registered, it would enter the state dict (released checkpoints keep CLIP in ``vision_tower/``, never under
    ``model.vision_tower.*``), and ZeRO-3/FSDP would shard it and its optimizer-free weights would have to be
    gathered for every save of ``vision_tower/``. It is held in a plain attribute instead (`vision_tower`) and
    follows the LLM's device and dtype: when attached, and whenever it is reached through `vision_tower` or used.
    """

    config_class = FerretConfig
    _keys_to_ignore_on_load_unexpected = [r"vision_tower\."]
    _tied_weights_keys = LlamaForCausalLM._tied_weights_keys
    _tp_plan = LlamaForCausalLM._tp_plan
    _pp_plan = LlamaForCausalLM._pp_plan
    _fsdp_plan = getattr(LlamaForCausalLM, "_fsdp_plan", None)

    def __init__(self, config: FerretConfig):
        super().__init__(config)
        self.model = FerretLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._tower: tuple[CLIPVisionTower, ...] = ()  # a tuple is not registered (see the class docstring)
        self.post_init()

    # ------------------------------------------------------------------ vision tower
    @property
    def vision_tower(self) -> CLIPVisionTower | None:
        """The frozen CLIP tower (None until attached), on the LLM's device and in its dtype."""
        if not self._tower:
            return None
        self._sync_vision_tower()
        return self._tower[0]

    def set_vision_tower(self, tower: CLIPVisionTower | None) -> None:
        """Attaches a tower (not registered: it stays out of the state dict) and moves it next to the LLM."""
        self._tower = (tower,) if tower is not None else ()
        if tower is not None:
            self._sync_vision_tower()

    def load_vision_tower(self, checkpoint_dir: str | None = None, source: str | None = None) -> CLIPVisionTower:
        """Builds the tower from, in order: ``source``; ``<checkpoint_dir>/vision_tower``; ``config.mm_vision_tower``
        when it is a local folder; ``config.vision_config`` (random weights) when no tower name is set; the hub id."""
        cfg = self.config
        kwargs = dict(select_layer=cfg.mm_vision_select_layer, select_feature=cfg.mm_vision_select_feature)
        saved = os.path.join(checkpoint_dir, VISION_TOWER_DIR) if checkpoint_dir else None
        if source is not None:
            tower = CLIPVisionTower.from_pretrained(source, **kwargs)
        elif saved and os.path.isdir(saved):
            tower = CLIPVisionTower.from_pretrained(saved, **kwargs)
        elif cfg.mm_vision_tower and os.path.isdir(cfg.mm_vision_tower):
            tower = CLIPVisionTower.from_pretrained(cfg.mm_vision_tower, **kwargs)
        elif cfg.vision_config and not cfg.mm_vision_tower:
            tower = CLIPVisionTower.from_config(cfg.vision_config, **kwargs)
        elif cfg.mm_vision_tower:
            tower = CLIPVisionTower.from_pretrained(cfg.mm_vision_tower, **kwargs)
        else:
            raise ValueError("the config names no vision tower (mm_vision_tower) and carries no vision_config")
        if tower.hidden_size != cfg.mm_hidden_size:
            raise ValueError(
                f"vision tower width {tower.hidden_size} does not match mm_hidden_size {cfg.mm_hidden_size}"
            )
        if tower.config.image_size != cfg.image_size:
            raise ValueError(f"vision tower image size {tower.config.image_size} != config image_size {cfg.image_size}")
        self.set_vision_tower(tower)
        return tower

    def _sync_vision_tower(self) -> None:
        """Moves the tower to the embedding table's device and floating dtype (a no-op when it is there already).

        Stands in for registering the tower: ``model.to(...)`` / ``.half()`` move registered modules only."""
        tower = self._tower[0]
        weight = self.model.embed_tokens.weight
        if weight.device.type == "meta":
            return
        dtype = weight.dtype if weight.dtype.is_floating_point else tower.dtype
        if tower.device != weight.device or tower.dtype != dtype:
            tower.to(device=weight.device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, vision_tower: str | None = None,
                        load_vision_tower: bool = True, **kwargs):
        """`PreTrainedModel.from_pretrained` plus the vision tower (see `load_vision_tower`)."""
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if load_vision_tower:
            path = str(pretrained_model_name_or_path)
            model.load_vision_tower(path if os.path.isdir(path) else None, source=vision_tower)
        return model

    def save_pretrained(self, save_directory, *args, save_vision_tower: bool | None = None, **kwargs):
        """Saves the original layout; ``vision_tower/`` is written when asked, or by default whenever the tower
        could not be fetched again by name (random weights or a local folder)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        tower = self.vision_tower
        if tower is None:
            return
        if save_vision_tower is None:
            save_vision_tower = tower.source is None or os.path.isdir(tower.source)
        is_main = kwargs.get("is_main_process", True)
        if save_vision_tower and is_main:
            tower.save_pretrained(os.path.join(save_directory, VISION_TOWER_DIR))

    # ------------------------------------------------------------------ multimodal embedding
    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, S, S] -> (raw CLIP features [B, N, C], projected features [B, N, hidden])."""
        tower = self.vision_tower
        if tower is None:
            raise RuntimeError("this model has no vision tower; call load_vision_tower() first")
        features = tower(images)
        return features, self.model.mm_projector(features.to(self.model.mm_projector.weight.dtype))

    def embed_multimodal(
        self,
        input_ids: torch.LongTensor,
        images: torch.Tensor | None = None,
        region_masks: RegionMasks = None,
    ) -> torch.Tensor:
        """input_ids [B, L] (image positions = IMAGE_TOKEN_INDEX) -> inputs_embeds [B, L, hidden].

        Three steps: `_check_multimodal_inputs` (raises ValueError naming the sample when image positions, images,
        ``<region_fea>`` tokens and region masks do not agree, before any image is encoded), then the image
        features are spliced at the image positions, then the region features at the ``<region_fea>`` tokens.
        """
        image_positions = input_ids == IMAGE_TOKEN_INDEX
        region_positions = self._region_positions(input_ids)
        self._check_multimodal_inputs(image_positions, region_positions, images, region_masks)
        embeds = self.model.embed_tokens(input_ids.masked_fill(input_ids < 0, 0))
        if images is None:
            return self._keep_unused_in_graph(embeds, projector=True, sampler=True)

        features, projected = self.encode_images(images)
        embeds = embeds.masked_scatter(image_positions.unsqueeze(-1), projected.to(embeds.dtype))
        if not region_positions.any():
            return self._keep_unused_in_graph(embeds, projector=False, sampler=True, features=features)
        region_features = self.region_features(features, image_positions.any(1), region_masks)
        return embeds.masked_scatter(region_positions.unsqueeze(-1), region_features.to(embeds.dtype))

    def _region_positions(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """bool [B, L]: where the ``<region_fea>`` tokens are (none when the config has no region token)."""
        region_token = self.config.im_region_fea_token
        if region_token is None:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return input_ids == region_token

    def _check_multimodal_inputs(self, image_positions: torch.Tensor, region_positions: torch.Tensor,
                                 images: torch.Tensor | None, region_masks: RegionMasks) -> None:
        """Raises ValueError naming the sample unless the inputs agree (positions are bool [B, L]):

        * every ``<region_fea>`` token has exactly one mask, and regions come with an image and a region sampler;
        * a sample with image positions has exactly one image's worth of them, and there is one image per such
          sample;
        * no ``<region_fea>`` comes before its sample's image (it would read a feature the model has not seen).
        """
        has_image = image_positions.any(1)
        if images is None and has_image.any():
            raise ValueError("input_ids contain image positions but no images were given")
        n_regions = region_positions.sum(1).tolist()
        n_masks = self._count_masks(region_masks, len(n_regions))
        for sample, (tokens, masks) in enumerate(zip(n_regions, n_masks)):
            if tokens != masks:
                raise ValueError(
                    f"sample {sample}: {tokens} <region_fea> token(s) in the text but {masks} region mask(s); "
                    "every <region_fea> needs exactly one mask"
                )
        if images is None:
            if sum(n_regions):
                raise ValueError("<region_fea> tokens need an image to read region features from")
            return
        self._check_image_positions(image_positions, images)
        if sum(n_regions):
            if not self.config.region_geo_sampler:
                raise ValueError("this model has no region sampler (region_geo_sampler=False) but <region_fea> "
                                 "was given")
            self._check_regions_follow_images(image_positions, region_positions)

    def _check_image_positions(self, image_positions: torch.Tensor, images: torch.Tensor) -> None:
        """Each sample has 0 or one image's worth of image positions; one image per sample that has them."""
        tower = self.vision_tower
        if tower is None:
            raise RuntimeError("this model has no vision tower; call load_vision_tower() first")
        per_image = tower.num_patches + (1 if tower.select_feature == "cls_patch" else 0)
        counts = image_positions.sum(1)
        bad = ((counts != 0) & (counts != per_image)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"sample {bad[0]}: {int(counts[bad[0]])} image positions but one image gives {per_image} features; "
                "build inputs with FerretProcessor (the image token is expanded there)"
            )
        with_image = int(image_positions.any(1).sum())
        if with_image != images.shape[0]:
            raise ValueError(f"{with_image} sample(s) have image positions but {images.shape[0]} image(s) were given")

    @staticmethod
    def _check_regions_follow_images(image_positions: torch.Tensor, region_positions: torch.Tensor) -> None:
        """No ``<region_fea>`` before the first image position of its sample (the original asserts the same)."""
        length = image_positions.shape[1]
        has_image, has_region = image_positions.any(1), region_positions.any(1)
        first_image = torch.where(has_image, image_positions.float().argmax(1), length)
        last_region = torch.where(has_region, length - 1 - region_positions.flip(1).float().argmax(1), -1)
        early = (has_region & (first_image > last_region)).nonzero().flatten().tolist()
        if early:
            raise ValueError(f"sample {early[0]}: <region_fea> appears before the image")

    def region_features(self, features: torch.Tensor, has_image: torch.Tensor, region_masks: RegionMasks) -> torch.Tensor:
        """Raw CLIP features [B_img, N, C] + masks -> sampler features [R, hidden] in token order."""
        counts = [len(m) if m is not None else 0 for m in region_masks]
        masks = [torch.as_tensor(m, dtype=torch.bool) for sample in region_masks for m in (sample or ())]
        image_of_sample = torch.cumsum(has_image.long(), 0) - 1
        # One index per region without a host sync per region.
        index = torch.repeat_interleave(image_of_sample, torch.tensor(counts, device=image_of_sample.device),
                                        output_size=len(masks)).to(features.device)
        if self.config.mm_vision_select_feature == "cls_patch":
            features = features[:, 1:]
        sampler = self.model.region_geo_sampler
        # Evaluation and serving are deterministic and batch-invariant; training samples afresh every step.
        deterministic = not self.training
        seed = self.config.sampler_eval_seed if deterministic else None
        points = sample_region_points(masks, sampler.num_init_point, seed=seed).to(features.device)
        sampler_dtype = sampler.dim_projector.weight.dtype
        return sampler(features.to(sampler_dtype), points, index, deterministic=deterministic)

    @staticmethod
    def _count_masks(region_masks: RegionMasks, batch: int) -> list[int]:
        if region_masks is None:
            return [0] * batch
        if len(region_masks) != batch:
            raise ValueError(f"region_masks has {len(region_masks)} entries but the batch has {batch} samples")
        return [len(m) if m is not None else 0 for m in region_masks]

    def _keep_unused_in_graph(self, embeds: torch.Tensor, projector: bool, sampler: bool,
                              features: torch.Tensor | None = None) -> torch.Tensor:
        """Adds 0 x (unused trainable parameters) while training, so DDP/ZeRO see every parameter get a gradient
        even for a batch without images or regions.

        With image ``features`` [B_img, N, C] at hand, a batch without regions runs the sampler on one dummy region
        (the whole first image) and adds 0 x its output: the autograd graph, hence the order in which gradients
        become ready and the order of ZeRO-3's parameter gathers, is then the same as for a batch with regions.
        DeepSpeed ZeRO-2/3 reduce gradients in that order and need it identical on every rank.
        """
        if not (self.training and torch.is_grad_enabled()):
            return embeds
        if sampler and features is not None and self.config.region_geo_sampler and not projector:
            side = self.config.num_patches_per_side
            dummy_masks = [[torch.ones(side, side, dtype=torch.bool)]] + [[] for _ in range(features.shape[0] - 1)]
            has_image = torch.ones(features.shape[0], dtype=torch.bool, device=features.device)
            dummy = self.region_features(features, has_image, dummy_masks)
            return embeds + 0.0 * dummy.sum()
        modules = []
        if projector:
            modules.append(self.model.mm_projector)
        if sampler and self.config.region_geo_sampler:
            modules.append(self.model.region_geo_sampler)
        zero = sum(p.sum() for m in modules for p in m.parameters() if p.requires_grad)
        return embeds + 0.0 * zero if torch.is_tensor(zero) else embeds

    # ------------------------------------------------------------------ forward / generate
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        region_masks: RegionMasks = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        images: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> FerretCausalLMOutput:
        """Causal-LM forward over text, images and regions.

        With ``labels`` [B, L], logits are computed only at supervised positions (the 32k-vocabulary projection
        dominates small models) and returned as ``None``; the loss is the mean next-token cross-entropy over
        supervised tokens, or their sum over ``num_items_in_batch`` when the Trainer passes it; each sample's sum
        and token count come with it (``sample_loss_sums``, ``sample_token_counts``).
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            if images is None and region_masks is None and input_ids.shape[1] == 1 and not self.training:
                # A cached decoding step: one plain token, no multimodal checks (they cost a device sync each).
                inputs_embeds = self.model.embed_tokens(input_ids)
            else:
                inputs_embeds = self.embed_multimodal(input_ids, images, region_masks)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **({"past_key_values": past_key_values} if past_key_values is not None else {}),  # generate passes `cache`
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        loss = logits = sample_sums = sample_counts = None
        if labels is not None:
            if input_ids is not None:
                labels = labels.masked_fill(input_ids == IMAGE_TOKEN_INDEX, IGNORE_INDEX)
            loss, sample_sums, sample_counts = self._supervised_loss(hidden, labels, num_items_in_batch)
        else:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep, :])
        return FerretCausalLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            sample_loss_sums=sample_sums,
            sample_token_counts=sample_counts,
        )

    def _supervised_loss(self, hidden: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None):
        """(the loss, each sample's summed cross-entropy [B], each sample's supervised token count [B])."""
        targets = labels[:, 1:].to(hidden.device)
        supervised = targets != IGNORE_INDEX
        counts = supervised.sum(dim=1)
        if not supervised.any():
            # Keeps the graph (and every rank's collective calls) intact for a fully masked batch.
            zero = hidden.sum() * 0.0
            return zero, zero.expand(targets.shape[0]).float(), counts
        logits = self.lm_head(hidden[:, :-1][supervised]).float()
        per_token = F.cross_entropy(logits, targets[supervised], reduction="none")
        sums = torch.zeros(targets.shape, dtype=per_token.dtype, device=per_token.device)
        sums = sums.masked_scatter(supervised, per_token).sum(dim=1)
        denominator = num_items_in_batch if num_items_in_batch is not None else supervised.sum()
        return per_token.sum() / denominator, sums, counts

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        region_masks: RegionMasks = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """Generates from a (left-padded) batch with images and region masks; returns only the new tokens [B, T].

        The multimodal prompt is embedded once; decoding then runs on the KV cache with plain token ids.
        """
        if input_ids is None:
            raise ValueError("generate() needs input_ids")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        region_token = self.config.im_region_fea_token
        if region_token is not None and "suppress_tokens" not in generate_kwargs:
            # Answers ground with coordinates, never with <region_fea>: a generated one would have no mask.
            generate_kwargs["suppress_tokens"] = [region_token]
        inputs_embeds = self.embed_multimodal(input_ids, images, region_masks)
        return super().generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs)


def build_model(config: FerretConfig, seed: int | None = 0) -> FerretLlamaForCausalLM:
    """A randomly initialised model with its vision tower (from ``config.vision_config``), in fp32 on CPU; real
    weights come through `ferret.model.builder.load_pretrained_model`."""
    if seed is not None:
        torch.manual_seed(seed)
    model = FerretLlamaForCausalLM(config)
    model.load_vision_tower()
    return model


AutoConfig.register("ferret", FerretConfig)
AutoModelForCausalLM.register(FerretConfig, FerretLlamaForCausalLM)
