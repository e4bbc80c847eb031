"""FerretProcessor: the one place that turns (image, conversation, regions) into model inputs, and back.

Train, eval and serve all go through it:

* images: ``square_nocrop`` (an anisotropic bicubic resize to S x S, as the original) or ``pad`` (pad to a square
  with the mean colour, then resize), then CLIP normalisation -> [3, S, S];
* text: the ``ferret_v1`` template (ferret/conversation.py). Region placeholders ``<region{k}>`` or
  ``<bbox_location{k}>`` in a turn refer to the k-th region of that turn; ferret/regions.py owns their syntax and
  the text that replaces them (``"[x1, y1, x2, y2] <region_fea>"`` with one feature mask each in user turns, the
  coordinates alone in answers);
* tokens: exactly the ids the released checkpoints were trained on (see ``PromptTokenizer``), whichever
  tokenizer class or ``legacy`` setting loaded the files. ``<image>`` becomes ``num_image_tokens`` positions of
  IMAGE_TOKEN_INDEX, so truncation and batching see the real length;
* labels: the original's ``preprocess_v1`` masking (assistant answers and their ``</s>`` are supervised),
  computed on the same ids;
* output: ``post_process`` turns generated text into clean text plus regions in pixels of the user's image.

Coordinates in the API are pixels of the user's image; coordinates in text are on the 0..999 grid of the model
input. All grid arithmetic and the placeholder syntax are delegated to ferret/regions.py.
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
TOKENIZER_MODEL = "tokenizer.model"
IMAGE_MODES = ("square_nocrop", "pad")
PLACEHOLDER = R.PLACEHOLDER  # the placeholder syntax lives in ferret/regions.py; re-exported for existing callers
ROLE_OF = {"human": 0, "user": 0, "gpt": 1, "assistant": 1}
DEFAULT_MAX_REGIONS = 100
DEFAULT_MAX_MASK_SIDE = 1024
SPIECE_UNDERLINE = "\u2581"  # SentencePiece's visible space


class PromptTooLongError(ValueError):
    """The prompt (image positions included) is longer than the model's context."""


class PromptTokenizer:
    """Token ids of prompt text exactly as the original Ferret stack made them.

    The released weights were trained, and are served by the original code, with transformers 4.31's slow
    ``LlamaTokenizer`` in its legacy mode. For a text that tokenizer

    1. splits it at every added token (``<region_fea>``) and at the special tokens ``<s>``, ``</s>``, ``<unk>``;
    2. removes the whitespace on both sides of an added token; the special tokens keep theirs, as the LLaMA
       tokenizer registers them as non-stripping (measured: ``"a <unk> b"`` -> ``a ▁ <unk> ▁▁b``);
    3. encodes each remaining piece of text with SentencePiece on its own, so each starts with the dummy prefix:
       ``"... [1, 2] <region_fea>? ..."`` -> ``… ] <region_fea> ▁? …``: never a ``▁`` before ``<region_fea>``,
       never a ``?`` without its ``▁``.

    ``encode_prompt`` adds the original's ``tokenizer_image_token``: the prompt is split on ``<image>``, each chunk
    is tokenised with a BOS, only the first BOS is kept and IMAGE_TOKEN_INDEX goes between chunks.

    transformers 5's tokenizers do not do step 2, with ``legacy: false`` or no ``legacy`` in
    tokenizer_config.json not step 3 either, and its fast and slow classes differ; so this class does the three
    steps itself and takes only the vocabulary from the tokenizer. Pieces are encoded by SentencePiece from the
    checkpoint's ``tokenizer.model`` (the original's own encoder) when it is known; without one, SentencePiece's
    normalisation is applied here and the fast tokenizer's BPE model encodes the result (the same ids for LLaMA
    tokenizers converted from a SentencePiece model). The added tokens are read from the tokenizer once, here.
    """

    def __init__(self, tokenizer, sentencepiece_model: bytes | None = None):
        self.tokenizer = tokenizer
        if tokenizer.bos_token_id is None:
            raise ValueError("the tokenizer has no BOS token; Ferret's prompts start with one")
        self.bos_token_id = int(tokenizer.bos_token_id)
        added = set(tokenizer.get_added_vocab()) | set(tokenizer.all_special_tokens)
        added.discard("")
        self.keeps_whitespace = {str(t) for t in (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token,
                                                  tokenizer.pad_token) if t is not None}
        self.token_ids = {token: tokenizer.convert_tokens_to_ids(token) for token in added}
        ordered = sorted(added, key=lambda t: (-len(t), t))  # the longest match wins where tokens overlap
        self._split = re.compile("(" + "|".join(re.escape(t) for t in ordered) + ")") if ordered else None
        self.sentencepiece_model = sentencepiece_model
        self._sp = None
        if sentencepiece_model is not None:
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor(model_proto=sentencepiece_model)
            self._check_vocabulary()
        else:
            backend = getattr(tokenizer, "backend_tokenizer", None)
            if backend is None:
                raise ValueError("the tokenizer has neither a tokenizer.model (SentencePiece) nor a tokenizers "
                                 "backend; pass sentencepiece_model=<bytes of tokenizer.model>")
            self._subword_model = backend.model

    def _check_vocabulary(self) -> None:
        size = self._sp.get_piece_size()
        if len(self.tokenizer) < size:
            raise ValueError(f"tokenizer.model has {size} pieces but the tokenizer only {len(self.tokenizer)} tokens")
        ours = self.tokenizer.convert_ids_to_tokens(list(range(size)))
        for i, token in enumerate(ours):
            if token != self._sp.id_to_piece(i):
                raise ValueError(
                    f"tokenizer.model does not belong to this tokenizer: id {i} is {self._sp.id_to_piece(i)!r} in "
                    f"tokenizer.model but {token!r} in the tokenizer"
                )

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without BOS (steps 1-3 above). ``<image>`` is not special here."""
        parts = self._split.split(text) if self._split is not None else [text]
        # parts alternates text, token, text, ..., text
        for i in range(1, len(parts), 2):
            if parts[i] not in self.keeps_whitespace:
                parts[i - 1] = parts[i - 1].rstrip()
                parts[i + 1] = parts[i + 1].lstrip()
        ids: list[int] = []
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self.token_ids[part])
            elif part:
                ids.extend(self._encode_piece(part))
        return ids

    def _encode_piece(self, text: str) -> list[int]:
        if self._sp is not None:
            return self._sp.encode(text)
        # SentencePiece's own normalisation (dummy prefix, spaces as "▁"), then the tokenizer's subword model on
        # the whole piece. The tokenizer's pre-tokenizer is bypassed: it does not add the prefix to a piece that
        # already starts with a space.
        normalised = SPIECE_UNDERLINE + text.replace(" ", SPIECE_UNDERLINE)
        return [token.id for token in self._subword_model.tokenize(normalised)]

    @property
    def sentencepiece_size(self) -> int | None:
        """Pieces in tokenizer.model (ids below it are SentencePiece's; added tokens follow), or None."""
        return self._sp.get_piece_size() if self._sp is not None else None

    def encode_prompt(self, prompt: str) -> list[int]:
        """BOS + the ids of each ``<image>``-separated chunk, one IMAGE_TOKEN_INDEX between chunks."""
        ids = [self.bos_token_id]
        for c, chunk in enumerate(prompt.split(IMAGE_TOKEN)):
            if c:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(self.encode(chunk))
        return ids


def _read_sentencepiece_model(tokenizer, folder: str | None = None) -> bytes | None:
    """The bytes of the SentencePiece model behind ``tokenizer``: ``folder/tokenizer.model`` or its vocab_file."""
    candidates = [os.path.join(folder, TOKENIZER_MODEL)] if folder and os.path.isdir(folder) else []
    vocab_file = getattr(tokenizer, "vocab_file", None)
    if isinstance(vocab_file, str):
        candidates.append(vocab_file)
    for path in candidates:
        if os.path.isfile(path):
            with open(path, "rb") as f:
                return f.read()
    return None


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

    def within_to_canvas(self, within: np.ndarray | R.Box | None, region: R.Region) -> np.ndarray | R.Box | None:
        """A mask [H, W] or Box limiting ``region``'s feature mask, moved from the image onto the canvas."""
        if within is None or isinstance(within, R.Box):
            return None if within is None else self.to_canvas(within)
        within = np.asarray(within)
        if within.shape != (self.height, self.width):
            raise ValueError(f"`within` mask for {region!r} has shape {within.shape}, expected [H, W] = "
                             f"[{self.height}, {self.width}]")
        return within if self.is_identity else self.to_canvas(R.FreeForm(within)).mask

    @property
    def is_identity(self) -> bool:
        return self.left == self.top == 0 and (self.canvas_width, self.canvas_height) == (self.width, self.height)

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
        tokenizer: a LLaMA tokenizer (fast or slow, any ``legacy`` setting); ``<region_fea>`` is added when
            missing. Prompt ids are the original's either way (``PromptTokenizer``).
        image_size: side S of the square model input.
        num_image_tokens: LLM positions one image occupies ((S / patch)^2).
        image_aspect_ratio: ``"square_nocrop"`` (the original's) or ``"pad"``.
        conv_template: name of the chat template.
        model_max_length: longest sequence, image positions included.
        max_regions: most region placeholders (feature masks) one conversation may hold; checked before any mask
            is built.
        max_mask_side: longest side of a feature mask; larger images get masks on a coarser grid
            (``regions.region_mask``). Images up to this size get the original's pixel masks exactly.
        sentencepiece_model: bytes of the checkpoint's ``tokenizer.model``; by default read from the tokenizer's
            ``vocab_file``.
    """

    def __init__(self, tokenizer, image_size: int = 336, num_image_tokens: int = 576,
                 image_aspect_ratio: str = "square_nocrop", image_mean: Sequence[float] = CLIP_MEAN,
                 image_std: Sequence[float] = CLIP_STD, conv_template: str = "ferret_v1",
                 model_max_length: int = 2048, max_regions: int = DEFAULT_MAX_REGIONS,
                 max_mask_side: int | None = DEFAULT_MAX_MASK_SIDE, sentencepiece_model: bytes | None = None):
        if image_aspect_ratio not in IMAGE_MODES:
            raise ValueError(f"image_aspect_ratio must be one of {IMAGE_MODES}, got {image_aspect_ratio!r}")
        for name, value in (("max_regions", max_regions), ("max_mask_side", max_mask_side)):
            if value is None and name == "max_mask_side":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.tokenizer = tokenizer
        if REGION_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_tokens([REGION_TOKEN], special_tokens=True)  # as the original's initialize_vision_tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token  # the original's v1 choice: pad = unk (id 0)
        self.region_token_id = tokenizer.convert_tokens_to_ids(REGION_TOKEN)
        if sentencepiece_model is None:
            sentencepiece_model = _read_sentencepiece_model(tokenizer)
        if sentencepiece_model is None:
            logger.warning("no tokenizer.model for this tokenizer: prompt pieces are encoded by the tokenizer itself, "
                           "and save_pretrained writes a folder the original code cannot load")
        self.prompt_tokenizer = PromptTokenizer(tokenizer, sentencepiece_model)
        self.image_size = int(image_size)
        self.num_image_tokens = int(num_image_tokens)
        self.image_aspect_ratio = image_aspect_ratio
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.conv_template = conv_template
        get_template(conv_template)
        self.model_max_length = int(model_max_length)
        self.max_regions = max_regions
        self.max_mask_side = max_mask_side

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, path: str, **overrides: Any) -> "FerretProcessor":
        """Reads the tokenizer (with ``tokenizer.model``) and ``preprocessor_config.json`` (or, for original
        checkpoints, config.json)."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
        settings: dict[str, Any] = {}
        processor_file = os.path.join(path, PROCESSOR_CONFIG)
        config_file = os.path.join(path, "config.json")
        if os.path.isfile(processor_file):
            with open(processor_file) as f:
                saved = json.load(f)
            for key in ("image_size", "num_image_tokens", "image_aspect_ratio", "image_mean", "image_std",
                        "conv_template", "model_max_length", "max_regions", "max_mask_side"):
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
        settings.setdefault("sentencepiece_model", _read_sentencepiece_model(tokenizer, path))
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
            "max_regions": self.max_regions,
            "max_mask_side": self.max_mask_side,
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
        """Writes the tokenizer so that both this project and the original code load it with the same ids, plus
        ``preprocessor_config.json``.

        Besides transformers 5's ``tokenizer.json``: ``tokenizer.model`` (SentencePiece; the original's slow
        tokenizer reads only this), ``tokenizer_config.json`` with ``legacy: true`` (the behaviour the ids were
        trained with), ``add_bos_token`` and the added tokens, ``special_tokens_map.json`` (bos/eos/unk as
        non-stripping tokens and pad = ``<unk>``, as the original's checkpoints have them) and
        ``added_tokens.json`` (``<region_fea>`` and any other token beyond the SentencePiece vocabulary).
        """
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        sp_model = self.prompt_tokenizer.sentencepiece_model
        if sp_model is not None:
            with open(os.path.join(path, TOKENIZER_MODEL), "wb") as f:
                f.write(sp_model)
            base_size = self.prompt_tokenizer.sentencepiece_size
        else:
            logger.warning("%s: no tokenizer.model to save; the original code cannot load this folder", path)
            base_size = self.tokenizer.vocab_size
        extra = self._extra_tokens(base_size)
        config_path = os.path.join(path, "tokenizer_config.json")
        with open(config_path) as f:
            config = json.load(f)
        for key in ("is_local", "local_files_only"):  # how this copy was loaded, not a property of the tokenizer
            config.pop(key, None)
        plain = {"lstrip": False, "rstrip": False, "single_word": False}
        config.update({
            "tokenizer_class": "LlamaTokenizer",
            "legacy": True,
            "add_bos_token": True,
            "add_eos_token": False,
            "pad_token": self.tokenizer.pad_token,
            "model_max_length": self.model_max_length,
        })
        decoder = config.setdefault("added_tokens_decoder", {})
        for token, token_id in extra.items():
            decoder.setdefault(str(token_id), {"content": token, **plain, "normalized": False, "special": True})
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        special = {
            name: {"content": str(getattr(self.tokenizer, name)), **plain, "normalized": True}
            for name in ("bos_token", "eos_token", "unk_token")
        }
        special["pad_token"] = str(self.tokenizer.pad_token)
        with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
            json.dump(special, f, indent=2)
        with open(os.path.join(path, "added_tokens.json"), "w") as f:
            json.dump(extra, f, indent=2, ensure_ascii=False)
        with open(os.path.join(path, PROCESSOR_CONFIG), "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    def _extra_tokens(self, base_size: int) -> dict[str, int]:
        """Tokens with ids at or beyond ``base_size`` (``<region_fea>`` and other added tokens), in id order."""
        added = {token: i for token, i in self.tokenizer.get_added_vocab().items() if i >= base_size}
        return dict(sorted(added.items(), key=lambda item: item[1]))

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
                    where: str = "", build_masks: bool = True) -> tuple[str, list[np.ndarray]]:
        """Replaces the placeholders of one turn; returns (text, feature masks in text order).

        In a user turn each placeholder becomes ``"<coords> <region_fea>"`` (``"<region_fea>"`` with ``no_coor``,
        ``"<coords>"`` without region features) and gets a mask; in an assistant turn it becomes ``"<coords>"``
        (``""`` with ``no_coor``); ``regions.placeholder_text`` writes them. ``within[k]`` (a mask [H, W] or a Box)
        limits region k's mask, as the original does for points sampled from a box or a segmentation.

        Every placeholder is checked against ``turn_regions`` and the number of masks against ``max_regions``
        before any mask is built. Masks are bool [h, w] on the model-input canvas, where the sampler reads them:
        the image itself for ``square_nocrop`` (the original's masks exactly), the padded square for ``pad``; on a
        coarser grid when that is larger than ``max_mask_side`` (``regions.region_mask``).
        ``build_masks=False`` returns only the text.
        """
        if REGION_TOKEN in text:
            raise ValueError(f"{where}write regions as <region{{k}}> placeholders, not a bare {REGION_TOKEN}")
        found = R.find_placeholders(text)
        for _, _, k in found:
            if k >= len(turn_regions):
                raise ValueError(f"{where}placeholder {R.placeholder(k)!r} refers to region {k} but the turn has "
                                 f"{len(turn_regions)} region(s)")
        wants_masks = build_masks and is_user and region_feature
        if wants_masks and len(found) > self.max_regions:
            raise ValueError(f"{where}the turn has {len(found)} region placeholders; the limit is "
                             f"{self.max_regions} (max_regions)")
        masks: list[np.ndarray] = []
        pieces: list[str] = []
        cursor = 0
        for start, end, k in found:
            region = turn_regions[k]
            try:
                R.validate_region(region, frame.width, frame.height)
                on_canvas = frame.to_canvas(region)
                replacement = R.placeholder_text(on_canvas, frame.canvas_width, frame.canvas_height,
                                                 is_user, region_feature, no_coor)
                if wants_masks:
                    context = within[k] if within is not None and k < len(within) else None
                    masks.append(R.region_mask(on_canvas, frame.canvas_width, frame.canvas_height,
                                               within=frame.within_to_canvas(context, region),
                                               max_side=self.max_mask_side))
            except ValueError as err:
                raise ValueError(f"{where}region {k} ({text[start:end]}): {err}") from err
            pieces.append(text[cursor:start])
            pieces.append(replacement)
            cursor = end
        pieces.append(text[cursor:])
        return "".join(pieces), masks

    def _check_turns(self, turns: Sequence[dict[str, Any]], region_feature: bool, where: str) -> list[tuple[int, str]]:
        """(role, text) per turn, after checking roles, texts and the total number of masks to be built."""
        checked = []
        n_masks = 0
        for t, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise ValueError(f"{where}turn {t} must be a dict with 'from' and 'value', got {type(turn).__name__}")
            role = ROLE_OF.get(str(turn.get("from", turn.get("role", ""))).lower())
            if role is None or role != t % 2:
                raise ValueError(
                    f"{where}turn {t} is from {turn.get('from', turn.get('role'))!r}; turns must alternate "
                    "human/gpt starting with human"
                )
            text = turn.get("value", turn.get("content"))
            if not isinstance(text, str):
                raise ValueError(f"{where}turn {t} has no text value")
            if role == 0 and region_feature:
                n_masks += len(R.find_placeholders(text))
            checked.append((role, text))
        if n_masks > self.max_regions:
            raise ValueError(f"{where}the conversation has {n_masks} region placeholders in user turns; the limit "
                             f"is {self.max_regions} (max_regions)")
        return checked

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
        """One conversation -> model inputs (unpadded), with the original's ids and labels.

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
            or None, ``region_masks`` (list of bool [h, w] tensors on the model-input canvas: [H, W] of the image
            for ``square_nocrop``, the padded square for ``pad``, coarser above ``max_mask_side``; see
            ``format_turn``), ``image_size`` (W, H), ``turn_texts`` (each turn as the model reads it, placeholders
            replaced, ``<image>`` moved to the front of the first).
        """
        if image is not None:
            image_size = image.size
        if image_size is None:
            raise ValueError(f"{where}pass the image or its size")
        checked = self._check_turns(turns, region_feature, where)
        frame = self.frame(*image_size)
        conv = get_template(self.conv_template)
        all_masks: list[np.ndarray] = []
        formatted: list[str] = []
        for t, (role, text) in enumerate(checked):
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
            formatted.append(text)
            conv.append_message(conv.roles[role], text)
        if add_generation_prompt:
            if len(turns) % 2 != 1:
                raise ValueError(f"{where}a generation prompt needs the conversation to end with a user turn")
            conv.append_message(conv.roles[1], None)

        prompt = conv.get_prompt()
        ids = self.prompt_tokenizer.encode_prompt(prompt)
        labels = self._original_labels(conv, prompt, ids, where)
        input_ids, labels = self._expand_image(ids, labels)
        if truncate and len(input_ids) > self.model_max_length:
            input_ids, labels, all_masks = self._truncate(input_ids, labels, all_masks, where)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "images": self.preprocess_image(image) if image is not None else None,
            "region_masks": [torch.from_numpy(np.ascontiguousarray(m)) for m in all_masks],
            "image_size": tuple(image_size),
            "turn_texts": formatted,
        }

    def encode_prompt(self, prompt: str, image: Image.Image | None = None,
                      region_masks: Sequence[np.ndarray | torch.Tensor] = (), where: str = "") -> dict[str, Any]:
        """An already templated prompt (as the original worker receives it: ``<image>`` and ``<region_fea>`` in the
        text, one mask [H, W] of the image per ``<region_fea>``) -> model inputs. Nothing is supervised. The masks
        come back like ``encode``'s: on the model-input canvas, bounded by ``max_mask_side``."""
        n_images = prompt.count(IMAGE_TOKEN)
        if n_images != (1 if image is not None else 0):
            raise ValueError(f"{where}the prompt has {n_images} {IMAGE_TOKEN} but {int(image is not None)} image(s)")
        n_regions = prompt.count(REGION_TOKEN)
        if n_regions != len(region_masks):
            raise ValueError(f"{where}the prompt has {n_regions} {REGION_TOKEN} but {len(region_masks)} mask(s)")
        if n_regions > self.max_regions:
            raise ValueError(f"{where}the prompt has {n_regions} {REGION_TOKEN}; the limit is {self.max_regions} "
                             "(max_regions)")
        masks = [np.asarray(torch.as_tensor(m).cpu() if torch.is_tensor(m) else m, dtype=bool) for m in region_masks]
        if image is not None:
            frame = self.frame(*image.size)
            for k, m in enumerate(masks):
                if m.shape != (image.size[1], image.size[0]) or not m.any():
                    raise ValueError(f"{where}region mask {k} must be a non-empty [H, W] = "
                                     f"[{image.size[1]}, {image.size[0]}] mask, got shape {tuple(m.shape)}")
            # onto the model-input canvas and bounded in size, as format_turn's masks
            masks = [R.region_mask(frame.to_canvas(R.FreeForm(m)), frame.canvas_width, frame.canvas_height,
                                   max_side=self.max_mask_side) for m in masks]
        masks = [torch.from_numpy(np.ascontiguousarray(m)) for m in masks]
        input_ids = self._expand_image(self.prompt_tokenizer.encode_prompt(prompt))
        if len(input_ids) > self.model_max_length:
            raise PromptTooLongError(f"{where}the prompt is {len(input_ids)} tokens; the limit is "
                                     f"{self.model_max_length}")
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": None,
            "images": self.preprocess_image(image) if image is not None else None,
            "region_masks": masks,
            "image_size": image.size if image is not None else None,
        }

    def _expand_image(self, ids: list[int], labels: list[int] | None = None):
        """Each IMAGE_TOKEN_INDEX in ``ids`` -> ``num_image_tokens`` image positions; ``labels`` (aligned with
        ``ids``) get IGNORE_INDEX there, as the model fills the labels of image features. Returns ids, or
        (ids, labels) when labels are given."""
        out_ids: list[int] = []
        out_labels: list[int] = []
        for i, token in enumerate(ids):
            if token == IMAGE_TOKEN_INDEX:
                out_ids.extend([IMAGE_TOKEN_INDEX] * self.num_image_tokens)
                out_labels.extend([IGNORE_INDEX] * self.num_image_tokens)
            else:
                out_ids.append(token)
                if labels is not None:
                    out_labels.append(labels[i])
        return out_ids if labels is None else (out_ids, out_labels)

    def _original_labels(self, conv, prompt: str, ids: list[int], where: str) -> list[int]:
        """The original's ``preprocess_v1`` masking of ``ids`` (the image as one IMAGE_TOKEN_INDEX, as it counted).

        The prompt is cut into rounds at ``</s>`` and each round at ``" ASSISTANT: "``. The first token (BOS) is
        masked; per round, the instruction's token count minus 2 (its own BOS, and the ``▁`` that its trailing
        space becomes) is masked and the rest of the round (the answer, and the ``</s>`` that the round's BOS
        stands for) is supervised; everything after the last complete round is masked. If the rounds do not add
        up to the sequence (text holding ``</s>`` or the role separator, say), the original masks the whole
        sample, and so does this.
        """
        encode = self.prompt_tokenizer.encode_prompt
        pad_id = self.tokenizer.unk_token_id  # the original's v1 pad
        labels = list(ids)
        total = sum(1 for token in ids if token != pad_id)
        sep = conv.sep + conv.roles[1] + ": "
        cursor = 1
        labels[0] = IGNORE_INDEX
        for round_text in prompt.split(conv.sep2):
            if round_text == "":
                break
            parts = round_text.split(sep)
            if len(parts) != 2:
                break
            round_len = len(encode(round_text))
            instruction_len = len(encode(parts[0] + sep)) - 2
            labels[cursor:cursor + instruction_len] = [IGNORE_INDEX] * len(labels[cursor:cursor + instruction_len])
            cursor += round_len
        labels[cursor:] = [IGNORE_INDEX] * len(labels[cursor:])
        if cursor < self.model_max_length and cursor != total:
            # Worth a warning for a training sample (it ends with an answer); an inference prompt has none.
            training = bool(conv.messages) and conv.messages[-1][0] == conv.roles[1] and bool(conv.messages[-1][1])
            log = logger.warning if training else logger.debug
            log("%stokenization mismatch: the rounds count %d tokens, the sequence has %d; no token of this sample "
                "is supervised (as in the original)", where, cursor, total)
            labels = [IGNORE_INDEX] * len(labels)
        return labels

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
