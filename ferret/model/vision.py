"""The frozen CLIP ViT vision tower: pixels in, patch features out.

Ferret reads the penultimate hidden state of CLIP ViT-L/14-336 and drops the CLS token, giving [B, 576, 1024].
The tower is built from a hub id, a local folder (e.g. a checkpoint's ``vision_tower/``), or a CLIP vision config
(random weights, for tiny test models). It never trains and never tracks gradients.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

logger = logging.getLogger(__name__)


class CLIPVisionTower(nn.Module):
    """Wraps `CLIPVisionModel` and selects Ferret's features.

    Args:
        model: the CLIP vision model.
        select_layer: index into the hidden states (-2 = penultimate).
        select_feature: ``"patch"`` (drop CLS) or ``"cls_patch"``.
        source: where the weights came from (a hub id, a folder, or ``None`` for random weights).
    """

    def __init__(self, model: CLIPVisionModel, select_layer: int = -2, select_feature: str = "patch",
                 source: str | None = None):
        super().__init__()
        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"select_feature must be 'patch' or 'cls_patch', got {select_feature!r}")
        self.vision_tower = model
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.source = source
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(cls, name_or_path: str, select_layer: int = -2, select_feature: str = "patch",
                        dtype: torch.dtype | None = None) -> "CLIPVisionTower":
        """Loads CLIP from a local folder or a hub id (a hub id needs network access or a warm cache)."""
        if name_or_path.startswith((".", os.sep)) and not os.path.isdir(name_or_path):
            # A path with nothing there: say so instead of asking the hub for it.
            raise FileNotFoundError(f"vision tower folder {name_or_path!r} does not exist")
        try:
            model = CLIPVisionModel.from_pretrained(name_or_path, dtype=dtype)
        except OSError as err:
            raise OSError(
                f"could not load the CLIP vision tower {name_or_path!r}: {err}. Pass a local folder holding a "
                "CLIPVisionModel (e.g. a checkpoint's vision_tower/) or allow hub access."
            ) from err
        return cls(model, select_layer, select_feature, source=name_or_path)

    @classmethod
    def from_config(cls, config: CLIPVisionConfig | dict, select_layer: int = -2, select_feature: str = "patch",
                    dtype: torch.dtype | None = None) -> "CLIPVisionTower":
        """Builds a randomly initialised tower (tiny test models, the toy world)."""
        if isinstance(config, dict):
            config = CLIPVisionConfig(**{k: v for k, v in config.items() if k not in ("model_type", "transformers_version")})
        model = CLIPVisionModel(config)
        if dtype is not None:
            model = model.to(dtype)
        return cls(model, select_layer, select_feature, source=None)

    @property
    def config(self) -> CLIPVisionConfig:
        return self.vision_tower.config

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.device

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_patches_per_side(self) -> int:
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side**2

    # ------------------------------------------------------------------ pretraining a tower (the toy world)
    @property
    def _embeddings(self) -> nn.Module:
        return getattr(self.vision_tower, "vision_model", self.vision_tower).embeddings

    def position_table(self) -> torch.Tensor:
        """The patches' position embeddings [N, C] (row-major; CLIP's CLS row left out)."""
        return self._embeddings.position_embedding.weight[1:]

    @torch.no_grad()
    def set_position_table(self, table: torch.Tensor) -> None:
        """Replaces the position embedding: ``table`` [N, C] for the patches (row-major), zero for CLS."""
        weight = self._embeddings.position_embedding.weight  # [1 + N, C]: CLS first
        if tuple(table.shape) != (weight.shape[0] - 1, weight.shape[1]):
            raise ValueError(f"a position table for this tower is [{weight.shape[0] - 1}, {weight.shape[1]}], "
                             f"got {list(table.shape)}")
        weight.zero_()
        weight[1:] = table.to(weight.dtype)

    def unfreeze(self, fixed_positions: bool = False) -> "CLIPVisionTower":
        """Lets the CLIP weights train (pretraining a tower; Ferret itself never calls this), the position
        embedding excepted when ``fixed_positions``. Returns self."""
        self.vision_tower.requires_grad_(True)
        if fixed_positions:
            self._embeddings.position_embedding.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> "CLIPVisionTower":
        # Frozen: dropout and friends stay off even when the surrounding model trains.
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, S, S] -> features [B, N, C] (N = (S / patch)^2, plus 1 with ``cls_patch``)."""
        return self.features(pixel_values)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`forward` with autograd left to the caller (pretraining a tower; Ferret itself keeps it frozen)."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"images must be shaped [B, 3, S, S], got {tuple(pixel_values.shape)}")
        size = self.config.image_size
        if pixel_values.shape[-2:] != (size, size):
            raise ValueError(
                f"images must be {size}x{size} for this vision tower, got {tuple(pixel_values.shape[-2:])}; "
                "preprocess them with FerretProcessor"
            )
        out = self.vision_tower(pixel_values.to(device=self.device, dtype=self.dtype), output_hidden_states=True)
        features = out.hidden_states[self.select_layer]
        return features[:, 1:] if self.select_feature == "patch" else features

    def save_pretrained(self, path: str) -> None:
        self.vision_tower.save_pretrained(path)
