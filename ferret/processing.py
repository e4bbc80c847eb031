"""FerretProcessor: the one place that turns (image, conversation, regions) into model inputs, and back.

Train, eval and serve all go through it:

* images: ``square_nocrop`` (an anisotropic bicubic resize to S x S, as the original) or ``pad`` (pad to a square
  with the mean colour, then resize), then CLIP normalisation -> [3, S, S];
* text: the ``ferret_v1`` template (ferret/conversation.py). ``<image>`` becomes ``num_image_tokens`` positions of
  IMAGE_TOKEN_INDEX, so truncation and batching see the real length. Region placeholders ``<region{k}>`` or
  ``<bbox_location{k}>`` in a turn refer to the k-th region of that turn: in user turns they become
  ``"[x1, y1, x2, y2] <region_fea>"`` (or a point ``[x, y]``) with one feature mask each, in assistant turns the
  coordinates alone (REFERENCE §2);
* labels: assistant answers and their ``</s>`` are supervised, everything else is IGNORE_INDEX (REFERENCE §3.4). The
  supervised tokens are found from character offsets, so they do not drift with tokenizer versions (§8 item 22);
* output: ``post_process`` turns generated text into clean text plus regions in pixels of the user's image.

Coordinates in the API are pixels of the user's image; coordinates in text are on the 0..999 grid of the model
input (DESIGN contract 3). All grid arithmetic is delegated to ferret/regions.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ferret import regions as R
from ferret.constants import CLIP_MEAN, CLIP_STD, IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX, REGION_TOKEN
from ferret.conversation import get_template

logger = logging.getLogger(__name__)

PROCESSOR_CONFIG = "preprocessor_config.json"
IMAGE_MODES = ("square_nocrop", "pad")
PLACEHOLDER = re.compile(r"<(?:region|bbox_location)(\d+)>")
ROLE_OF = {"human": 0, "user": 0, "gpt": 1, "assistant": 1}


@dataclass
class Frame:
    """Where the user's image sits on the model-input canvas (``pad`` adds margins; ``square_nocrop`` none)."""

    width: int
    height: int
    left: int = 0
    top: int = 0
    canvas_width: int = 0
    canvas_height: int = 0

    def __post_init__(self) -> None:
        self.canvas_width = self.canvas_width or self.width
        self.canvas_height = self.canvas_height or self.height

    def to_canvas(self, region: R.Region) -> R.Region:
        if self.left == self.top == 0 and (self.canvas_width, self.canvas_height) == (self.width, self.height):
            return region
        return R.shift_region(region, self.left, self.top, self.canvas_width, self.canvas_height)

    def to_image(self, region: R.Region) -> R.Region:
        if self.left == self.top == 0 and (self.canvas_width, self.canvas_height) == (self.width, self.height):
            return region
        return R.shift_region(region, -self.left, -self.top, self.width, self.height)


def image_frame(image_aspect_ratio: str, width: int, height: int) -> Frame:
    """Where a ``width`` x ``height`` image sits on the model-input canvas: ``pad`` centres it on a square."""
    if image_aspect_ratio == "pad":
        side = max(width, height)
        return Frame(width, height, (side - width) // 2, (side - height) // 2, side, side)
    return Frame(width, height)


class FerretProcessor:
    """Tokenizer + image preprocessing + region handling for Ferret.

    Args:
        tokenizer: a LLaMA tokenizer (fast); ``<region_fea>`` is added when missing.
        image_size: side S of the square model input.
        num_image_tokens: LLM positions one image occupies ((S / patch)^2).
        image_aspect_ratio: ``"square_nocrop"`` (the original's) or ``"pad"``.
        conv_template: name of the chat template.
        model_max_length: longest sequence, image positions included.
    """

    def __init__(self, tokenizer, image_size: int = 336, num_image_tokens: int = 576,
                 image_aspect_ratio: str = "square_nocrop", image_mean: Sequence[float] = CLIP_MEAN,
                 image_std: Sequence[float] = CLIP_STD, conv_template: str = "ferret_v1",
                 model_max_length: int = 2048):
        if image_aspect_ratio not in IMAGE_MODES:
            raise ValueError(f"image_aspect_ratio must be one of {IMAGE_MODES}, got {image_aspect_ratio!r}")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("FerretProcessor needs a fast tokenizer (character offsets locate the answers)")
        self.tokenizer = tokenizer
        if REGION_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [REGION_TOKEN]})
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token  # the original's v1 choice: pad = unk (id 0)
        self.region_token_id = tokenizer.convert_tokens_to_ids(REGION_TOKEN)
        self.image_size = int(image_size)
        self.num_image_tokens = int(num_image_tokens)
        self.image_aspect_ratio = image_aspect_ratio
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.conv_template = conv_template
        get_template(conv_template)
        self.model_max_length = int(model_max_length)

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, path: str, **overrides: Any) -> "FerretProcessor":
        """Reads the tokenizer and ``preprocessor_config.json`` (or, for original checkpoints, config.json)."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
        settings: dict[str, Any] = {}
        processor_file = os.path.join(path, PROCESSOR_CONFIG)
        config_file = os.path.join(path, "config.json")
        if os.path.isfile(processor_file):
            with open(processor_file) as f:
                saved = json.load(f)
            for key in ("image_size", "num_image_tokens", "image_aspect_ratio", "image_mean", "image_std",
                        "conv_template", "model_max_length"):
                if key in saved:
                    settings[key] = saved[key]
        if os.path.isfile(config_file):
            with open(config_file) as f:
                config = json.load(f)
            patch = (config.get("vision_config") or {}).get("patch_size", 14)
            size = config.get("image_size") or (config.get("vision_config") or {}).get("image_size", 336)
            settings.setdefault("image_size", size)
            settings.setdefault("num_image_tokens", (size // patch) ** 2)
            if config.get("image_aspect_ratio") in IMAGE_MODES:
                settings.setdefault("image_aspect_ratio", config["image_aspect_ratio"])
            settings.setdefault("model_max_length", config.get("max_sequence_length")
                                or config.get("max_position_embeddings", 2048))
        settings.update(overrides)
        return cls(tokenizer, **settings)

    def to_dict(self) -> dict[str, Any]:
        size = {"height": self.image_size, "width": self.image_size}
        return {
            "processor_class": "FerretProcessor",
            "image_size": self.image_size,
            "num_image_tokens": self.num_image_tokens,
            "image_aspect_ratio": self.image_aspect_ratio,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "conv_template": self.conv_template,
            "model_max_length": self.model_max_length,
            # CLIPImageProcessor-compatible fields, so other tools read the same preprocessing.
            "image_processor_type": "CLIPImageProcessor",
            "size": size,
            "crop_size": size,
            "do_center_crop": False,
            "do_resize": True,
            "do_normalize": True,
            "rescale_factor": 1 / 255,
            "resample": 3,
        }

    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        with open(os.path.join(path, PROCESSOR_CONFIG), "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    # ------------------------------------------------------------------ images
    def frame(self, width: int, height: int) -> Frame:
        """Where an image of this size sits on the model-input canvas."""
        return image_frame(self.image_aspect_ratio, width, height)

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> normalised pixels [3, S, S] (float32)."""
        if not isinstance(image, Image.Image):
            raise ValueError(f"expected a PIL image, got {type(image).__name__}")
        image = image.convert("RGB")
        if self.image_aspect_ratio == "pad":
            frame = self.frame(*image.size)
            fill = tuple(int(round(m * 255)) for m in self.image_mean)
            canvas = Image.new("RGB", (frame.canvas_width, frame.canvas_height), fill)
            canvas.paste(image, (frame.left, frame.top))
            image = canvas
        image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float()
        # (x / 255 - mean) / std, folded into one multiply-add per channel
        scale = 1.0 / (255.0 * torch.tensor(self.image_std))
        shift = -torch.tensor(self.image_mean) / torch.tensor(self.image_std)
        return pixels.mul_(scale[:, None, None]).add_(shift[:, None, None]).contiguous()

    # ------------------------------------------------------------------ text and regions
    def format_turn(self, text: str, turn_regions: Sequence[R.Region], frame: Frame, is_user: bool,
                    within: Sequence[Any] | None = None, region_feature: bool = True, no_coor: bool = False,
                    where: str = "") -> tuple[str, list[np.ndarray]]:
        """Replaces the placeholders of one turn; returns (text, feature masks in text order).

        In a user turn each placeholder becomes ``"<coords> <region_fea>"`` (``"<region_fea>"`` with ``no_coor``,
        ``"<coords>"`` without region features) and gets a mask in pixels of the image; in an assistant turn it
        becomes ``"<coords>"`` (``""`` with ``no_coor``). ``within[k]`` (a mask [H, W] or a Box) limits region k's
        mask, as the original does for points sampled from a box or a segmentation.
        """
        if REGION_TOKEN in text:
            raise ValueError(f"{where}write regions as <region{{k}}> placeholders, not a bare {REGION_TOKEN}")
        masks: list[np.ndarray] = []
        pieces: list[str] = []
        cursor = 0
        for match in PLACEHOLDER.finditer(text):
            k = int(match.group(1))
            if k >= len(turn_regions):
                raise ValueError(
                    f"{where}placeholder {match.group(0)!r} refers to region {k} but the turn has "
                    f"{len(turn_regions)} region(s)"
                )
            region = turn_regions[k]
            try:
                coords = R.region_to_text(frame.to_canvas(region), frame.canvas_width, frame.canvas_height)
                if is_user and region_feature:
                    context = within[k] if within is not None and k < len(within) else None
                    masks.append(R.region_mask(region, frame.width, frame.height, within=context))
            except ValueError as err:
                raise ValueError(f"{where}region {k} ({match.group(0)}): {err}") from err
            if is_user and region_feature:
                replacement = REGION_TOKEN if no_coor else f"{coords} {REGION_TOKEN}"
            else:
                replacement = "" if no_coor else coords
            pieces.append(text[cursor:match.start()])
            pieces.append(replacement)
            cursor = match.end()
        pieces.append(text[cursor:])
        return "".join(pieces), masks

    def encode(
        self,
        turns: Sequence[dict[str, Any]],
        image: Image.Image | None = None,
        regions: Sequence[Sequence[R.Region]] | None = None,
        within: Sequence[Sequence[Any]] | None = None,
        image_size: tuple[int, int] | None = None,
        add_generation_prompt: bool = False,
        region_feature: bool = True,
        no_coor: bool = False,
        truncate: bool = True,
        where: str = "",
    ) -> dict[str, Any]:
        """One conversation -> model inputs (unpadded).

        Args:
            turns: ``[{"from": "human"|"gpt", "value": str}, ...]`` alternating, starting with the user.
            image: the image (PIL); its size sets the region frame. ``image_size`` (W, H) may be given instead
                when only the text is needed.
            regions: per turn, the regions its placeholders refer to (pixels of the image).
            within: per turn, per region, an optional segmentation mask or Box limiting the feature mask.
            add_generation_prompt: end with an open assistant turn (inference).
            truncate: cut to ``model_max_length`` (dropping masks whose ``<region_fea>`` was cut).
            where: prefix for error messages (e.g. "file.json record 12: ").

        Returns:
            dict with ``input_ids`` [L] (image positions = IMAGE_TOKEN_INDEX), ``labels`` [L], ``images`` [3, S, S]
            or None, ``region_masks`` (list of bool [H, W] tensors), ``image_size`` (W, H).
        """
        if image is not None:
            image_size = image.size
        if image_size is None:
            raise ValueError(f"{where}pass the image or its size")
        frame = self.frame(*image_size)
        conv = get_template(self.conv_template)
        all_masks: list[np.ndarray] = []
        for t, turn in enumerate(turns):
            role = ROLE_OF.get(str(turn.get("from", turn.get("role", ""))).lower())
            if role is None or role != t % 2:
                raise ValueError(
                    f"{where}turn {t} is from {turn.get('from', turn.get('role'))!r}; turns must alternate "
                    "human/gpt starting with human"
                )
            text = turn.get("value", turn.get("content"))
            if not isinstance(text, str):
                raise ValueError(f"{where}turn {t} has no text value")
            turn_regions = regions[t] if regions is not None and t < len(regions) else ()
            turn_within = within[t] if within is not None and t < len(within) else None
            text, masks = self.format_turn(text, turn_regions or (), frame, role == 0, turn_within,
                                           region_feature, no_coor, where=f"{where}turn {t}: ")
            if role == 0 and image is not None and t == 0:
                text = IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()
            elif IMAGE_TOKEN in text:
                if image is None:
                    raise ValueError(f"{where}turn {t} has {IMAGE_TOKEN} but no image was given")
                raise ValueError(f"{where}{IMAGE_TOKEN} may only appear in the first user turn (turn {t})")
            all_masks.extend(masks)
            conv.append_message(conv.roles[role], text)
        if add_generation_prompt:
            if len(turns) % 2 != 1:
                raise ValueError(f"{where}a generation prompt needs the conversation to end with a user turn")
            conv.append_message(conv.roles[1], None)

        input_ids, labels = self._tokenize(conv.segments())
        if truncate and len(input_ids) > self.model_max_length:
            input_ids, labels, all_masks = self._truncate(input_ids, labels, all_masks, where)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "images": self.preprocess_image(image) if image is not None else None,
            "region_masks": [torch.from_numpy(np.ascontiguousarray(m)) for m in all_masks],
            "image_size": tuple(image_size),
        }

    def encode_prompt(self, prompt: str, image: Image.Image | None = None,
                      region_masks: Sequence[np.ndarray | torch.Tensor] = (), where: str = "") -> dict[str, Any]:
        """An already templated prompt (as the original worker receives it: ``<image>`` and ``<region_fea>`` in the
        text, one mask [H, W] per ``<region_fea>``) -> model inputs. Nothing is supervised."""
        n_images = prompt.count(IMAGE_TOKEN)
        if n_images != (1 if image is not None else 0):
            raise ValueError(f"{where}the prompt has {n_images} {IMAGE_TOKEN} but {int(image is not None)} image(s)")
        if prompt.count(REGION_TOKEN) != len(region_masks):
            raise ValueError(
                f"{where}the prompt has {prompt.count(REGION_TOKEN)} {REGION_TOKEN} but {len(region_masks)} mask(s)"
            )
        masks = [torch.as_tensor(np.asarray(m, dtype=bool)) for m in region_masks]
        if image is not None:
            for k, m in enumerate(masks):
                if m.shape != (image.size[1], image.size[0]) or not m.any():
                    raise ValueError(f"{where}region mask {k} must be a non-empty [H, W] = "
                                     f"[{image.size[1]}, {image.size[0]}] mask, got shape {tuple(m.shape)}")
        input_ids, _ = self._tokenize([(prompt, False)])
        if len(input_ids) > self.model_max_length:
            raise ValueError(f"{where}the prompt is {len(input_ids)} tokens; the limit is {self.model_max_length}")
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": None,
            "images": self.preprocess_image(image) if image is not None else None,
            "region_masks": masks,
            "image_size": image.size if image is not None else None,
        }

    def _tokenize(self, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
        """Tokenizes the prompt as the original (each ``<image>``-separated chunk on its own, BOS once) and
        labels the tokens that overlap supervised characters."""
        text = "".join(piece for piece, _ in segments)
        supervised = np.zeros(len(text) + 1, dtype=bool)
        cursor = 0
        for piece, is_supervised in segments:
            if is_supervised:
                supervised[cursor:cursor + len(piece)] = True
            cursor += len(piece)
        input_ids = [self.tokenizer.bos_token_id]
        labels = [IGNORE_INDEX]
        cursor = 0
        for c, chunk in enumerate(text.split(IMAGE_TOKEN)):
            if c > 0:
                input_ids.extend([IMAGE_TOKEN_INDEX] * self.num_image_tokens)
                labels.extend([IGNORE_INDEX] * self.num_image_tokens)
                cursor += len(IMAGE_TOKEN)
            if chunk:
                enc = self.tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
                for token, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
                    input_ids.append(token)
                    hit = supervised[cursor + start: cursor + max(end, start + 1)].any()
                    labels.append(token if hit else IGNORE_INDEX)
            cursor += len(chunk)
        return input_ids, labels

    def _truncate(self, input_ids: list[int], labels: list[int], masks: list[np.ndarray], where: str):
        limit = self.model_max_length
        if IMAGE_TOKEN_INDEX in input_ids[limit:]:
            raise ValueError(
                f"{where}the image does not fit: it ends after position {limit} (model_max_length {limit})"
            )
        input_ids, labels = input_ids[:limit], labels[:limit]
        kept = sum(1 for t in input_ids if t == self.region_token_id)
        if kept < len(masks):
            logger.debug("%struncation dropped %d region(s)", where, len(masks) - kept)
        return input_ids, labels, masks[:kept]

    # ------------------------------------------------------------------ batches
    def pad(self, features: Sequence[dict[str, Any]], padding_side: str = "right") -> dict[str, Any]:
        """Pads encoded samples into a batch: input_ids/labels/attention_mask [B, L], images [B_img, 3, S, S]
        (samples with an image, in order), region_masks (per-sample lists)."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        length = max(len(f["input_ids"]) for f in features)
        pad_id = self.tokenizer.pad_token_id
        batch_ids = torch.full((len(features), length), pad_id, dtype=torch.long)
        batch_labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(features), length), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            span = slice(length - n, length) if padding_side == "left" else slice(0, n)
            batch_ids[i, span] = f["input_ids"]
            if f.get("labels") is not None:
                batch_labels[i, span] = f["labels"]
            attention[i, span] = 1
        images = [f["images"] for f in features if f.get("images") is not None]
        return {
            "input_ids": batch_ids,
            "labels": batch_labels,
            "attention_mask": attention,
            "images": torch.stack(images) if images else None,
            "region_masks": [list(f.get("region_masks") or []) for f in features],
        }

    def __call__(self, images: Image.Image | Sequence[Image.Image], prompts: str | Sequence[str],
                 regions: Sequence[Sequence[R.Region]] | None = None, within: Sequence[Sequence[Any]] | None = None,
                 region_feature: bool = True, no_coor: bool = False) -> dict[str, Any]:
        """Single-turn inference inputs for a batch of (image, question, regions), left padded.

        ``prompts[i]`` is a question whose ``<region{k}>`` placeholders refer to ``regions[i][k]`` (pixels);
        ``within[i][k]`` optionally limits that region's mask (see ``format_turn``).
        """
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} image(s) but {len(prompts)} prompt(s)")
        if regions is not None and len(regions) != len(prompts):
            raise ValueError(f"got {len(regions)} region list(s) for {len(prompts)} prompt(s)")
        features = [
            self.encode([{"from": "human", "value": prompt}], image,
                        regions=[regions[i]] if regions is not None else None,
                        within=[within[i]] if within is not None else None,
                        add_generation_prompt=True, region_feature=region_feature, no_coor=no_coor,
                        where=f"sample {i}: ")
            for i, (image, prompt) in enumerate(zip(images, prompts))
        ]
        batch = self.pad(features, padding_side="left")
        batch.pop("labels")
        batch["image_sizes"] = [f["image_size"] for f in features]
        return batch

    def model_inputs(self, batch: dict[str, Any], model) -> dict[str, Any]:
        """The model's keyword arguments from a batch (or one encoded sample), on the model's device, images in
        the model's dtype."""
        if batch["input_ids"].dim() == 1:
            batch = self.pad([batch], padding_side="left")
        device, dtype = model.device, model.dtype
        out = {key: batch[key].to(device) for key in ("input_ids", "attention_mask")}
        if batch.get("labels") is not None:
            out["labels"] = batch["labels"].to(device)
        out["images"] = batch["images"].to(device=device, dtype=dtype) if batch.get("images") is not None else None
        masks = batch.get("region_masks")
        out["region_masks"] = masks if masks and any(masks) else None
        return out

    # ------------------------------------------------------------------ output
    def batch_decode(self, sequences: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(seq) for seq in sequences]

    def decode(self, token_ids: torch.Tensor | Sequence[int]) -> str:
        if torch.is_tensor(token_ids):
            token_ids = token_ids.tolist()
        ids = [t for t in token_ids if t >= 0]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def post_process(self, text: str, image_size: tuple[int, int]) -> tuple[str, list[R.GroundedRegion]]:
        """Generated text -> (text without coordinates, grounded regions in pixels of the user's image)."""
        frame = self.frame(*image_size)
        found = R.parse_regions(text, frame.canvas_width, frame.canvas_height)
        found = [
            R.GroundedRegion(phrase=g.phrase, region=frame.to_image(g.region), grid=g.grid, span=g.span) for g in found
        ]
        return R.strip_regions(text), found
