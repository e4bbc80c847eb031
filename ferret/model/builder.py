"""load_pretrained_model: the one loading path that train, eval and serve use.

Reads a local folder or a hub id holding a Ferret checkpoint in the original layout (docs/compatibility.md §1-2):
safetensors or .bin shards, a ``vision_tower/`` folder or a CLIP hub id, vocabulary 32001 with ``<region_fea>`` =
32000. Also: a LoRA folder over a base model (``adapter_config.json`` + ``non_lora_trainables.bin``), a base model
plus a projector-only folder (``mm_projector.bin``), 4/8-bit loading through bitsandbytes, and any device.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

import torch

from ferret.model.configuration import FerretConfig
from ferret.model.modeling import FerretLlamaForCausalLM
from ferret.processing import FerretProcessor

logger = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then Apple MPS, then CPU."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that have it, fp16 on other accelerators, fp32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


@dataclass
class _Layout:
    lora: bool
    projector_only: bool


def _layout(model_path: str, model_base: str | None) -> _Layout:
    is_dir = os.path.isdir(model_path)
    lora = is_dir and os.path.isfile(os.path.join(model_path, "adapter_config.json"))
    projector_only = is_dir and os.path.isfile(os.path.join(model_path, "mm_projector.bin")) and not lora
    if (lora or projector_only) and model_base is None:
        kind = "a LoRA adapter" if lora else "a projector-only checkpoint"
        raise ValueError(f"{model_path} holds {kind}; pass model_base (the model it was trained on)")
    return _Layout(lora=lora, projector_only=projector_only)


def _quantization(load_8bit: bool, load_4bit: bool, compute_dtype: torch.dtype):
    if not (load_8bit or load_4bit):
        return None
    if load_8bit and load_4bit:
        raise ValueError("choose one of load_8bit and load_4bit")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError("4/8-bit loading needs bitsandbytes (pip install bitsandbytes) and a CUDA GPU") from err
    from transformers import BitsAndBytesConfig

    # The projector and the sampler stay in full precision (the sampler folds its weight matrices at run time).
    skip = ["mm_projector", "region_geo_sampler", "lm_head"]
    if load_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=True,
                              bnb_4bit_quant_type="nf4", llm_int8_skip_modules=skip)


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in ("base_model.model.", "base_model."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


def load_pretrained_model(
    model_path: str,
    model_base: str | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    device: str | torch.device | None = "auto",
    dtype: torch.dtype | str | None = None,
    attn_implementation: str = "sdpa",
    vision_tower: str | None = None,
    region_feature_axes: str | None = None,
    image_aspect_ratio: str | None = None,
    conv_template: str | None = None,
) -> tuple[FerretLlamaForCausalLM, FerretProcessor]:
    """Loads a Ferret checkpoint and its processor.

    Args:
        model_path: local folder or hub id of the checkpoint (full, LoRA adapter, or projector-only).
        model_base: the base model for a LoRA or projector-only ``model_path``.
        load_8bit / load_4bit: quantise the LLM with bitsandbytes (CUDA only).
        device: ``"auto"`` (CUDA, MPS, then CPU) or any torch device.
        dtype: defaults to bf16/fp16 on accelerators and fp32 on CPU.
        attn_implementation: ``"sdpa"`` (default), ``"eager"`` or ``"flash_attention_2"`` (needs flash-attn).
        vision_tower: load CLIP from this folder or hub id instead of the checkpoint's.
        region_feature_axes: override the checkpoint's ``"xy"``/``"transposed"`` setting.
        image_aspect_ratio: override the checkpoint's image mode: ``"square_nocrop"`` (stretch to the square input,
            the original's) or ``"pad"`` (centre on a square first).
        conv_template: override the checkpoint's chat template (a name ``ferret.conversation`` knows).

    Returns:
        (model in eval mode on ``device``, FerretProcessor).
    """
    # Processor settings are checked before any weight is read.
    processor_overrides = _processor_overrides(image_aspect_ratio, conv_template)
    device = resolve_device(device)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(device)
    layout = _layout(model_path, model_base)
    config_kwargs = {"region_feature_axes": region_feature_axes} if region_feature_axes else {}
    quantization = _quantization(load_8bit, load_4bit, dtype)
    common = dict(dtype=dtype, attn_implementation=attn_implementation)
    if quantization is not None:
        common.update(quantization_config=quantization, device_map={"": device.index or 0})

    if layout.lora:
        model = _load_lora(model_path, model_base, config_kwargs, common)
    elif layout.projector_only:
        config = FerretConfig.from_pretrained(model_path, **config_kwargs)
        model = FerretLlamaForCausalLM.from_pretrained(model_base, config=config, load_vision_tower=False, **common)
        projector = torch.load(os.path.join(model_path, "mm_projector.bin"), map_location="cpu", weights_only=True)
        projector = {k.split("mm_projector.")[-1]: v.to(dtype) for k, v in projector.items() if "mm_projector" in k}
        model.model.mm_projector.load_state_dict(projector)
    else:
        config = FerretConfig.from_pretrained(model_path, **config_kwargs)
        model = FerretLlamaForCausalLM.from_pretrained(model_path, config=config, load_vision_tower=False, **common)

    checkpoint_dir = model_path if os.path.isdir(model_path) else None
    if quantization is None:
        model.to(device)
    model.load_vision_tower(checkpoint_dir, source=vision_tower)
    model.eval()

    processor = FerretProcessor.from_pretrained(model_path, **processor_overrides)
    region_token = model.config.im_region_fea_token
    if region_token is not None and processor.region_token_id != region_token:
        raise ValueError(
            f"the tokenizer gives <region_fea> id {processor.region_token_id} but the model expects {region_token}"
        )
    if model.config.image_size != processor.image_size:
        raise ValueError(f"processor image size {processor.image_size} != model image size {model.config.image_size}")
    return model, processor


def _processor_overrides(image_aspect_ratio: str | None, conv_template: str | None) -> dict[str, str]:
    from ferret.conversation import get_template
    from ferret.processing import IMAGE_MODES

    overrides = {}
    if image_aspect_ratio is not None:
        if image_aspect_ratio not in IMAGE_MODES:
            raise ValueError(f"image_aspect_ratio must be one of {IMAGE_MODES}, got {image_aspect_ratio!r}")
        overrides["image_aspect_ratio"] = image_aspect_ratio
    if conv_template is not None:
        get_template(conv_template)  # raises, naming the known templates, for an unknown one
        overrides["conv_template"] = conv_template
    return overrides


# Folder names a training run gives its checkpoints: they say which step, not which model.
_CHECKPOINT_FOLDER = re.compile(r"^(final[-_])?checkpoint([-_]\d+)?$|^(final|last|best)$", re.IGNORECASE)


def model_name_from_checkpoint(model_path: str) -> str:
    """The name a checkpoint is served under (the worker's, the API's and the web UI's), when none is given.

    1. ``model_name`` in the checkpoint's ``config.json``, when it is a non-empty string (``_name_or_path`` is
       not used: it names the model the run started from, not the one it made).
    2. Otherwise the folder's name; a folder a training run names by its step (``checkpoint``,
       ``checkpoint-1500``, ``final-checkpoint``, ``final``, ``last``, ``best``) is named after the run's folder
       instead: ``runs/ferret-7b/final-checkpoint`` -> ``ferret-7b``; ``runs/ferret-7b/checkpoint-1500`` ->
       ``ferret-7b_checkpoint-1500`` (the step stays, in the original's spelling).
    3. A hub id (``org/name``) is served as ``name``.
    """
    import json

    path = os.path.normpath(os.path.expanduser(model_path))
    config_file = os.path.join(path, "config.json")
    if os.path.isfile(config_file):
        try:
            with open(config_file, encoding="utf-8") as f:
                name = json.load(f).get("model_name")
        except (OSError, ValueError, AttributeError):
            name = None
        if isinstance(name, str) and name.strip():
            return name.strip()
    folder = os.path.basename(path)
    parent = os.path.basename(os.path.dirname(os.path.abspath(path))) if os.path.isdir(path) else ""
    if _CHECKPOINT_FOLDER.match(folder) and parent:
        step = re.search(r"\d+$", folder)
        return f"{parent}_{folder}" if step else parent
    return folder


def _load_lora(model_path: str, model_base: str, config_kwargs: dict, common: dict) -> FerretLlamaForCausalLM:
    from peft import PeftModel

    config = FerretConfig.from_pretrained(model_path, **config_kwargs)
    model = FerretLlamaForCausalLM.from_pretrained(model_base, config=config, load_vision_tower=False,
                                                   ignore_mismatched_sizes=False, **common)
    extra = os.path.join(model_path, "non_lora_trainables.bin")
    if os.path.isfile(extra):
        state = _strip_prefixes(torch.load(extra, map_location="cpu", weights_only=True))
        missing = [k for k in state if k not in dict(model.named_parameters())]
        if missing:
            raise ValueError(f"non_lora_trainables.bin holds names the model does not have: {missing[:5]}")
        model.load_state_dict(state, strict=False)
    model = PeftModel.from_pretrained(model, model_path)
    return model.merge_and_unload()
