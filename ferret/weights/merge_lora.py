"""Merge a LoRA checkpoint into its base model: ``python -m ferret.weights.merge_lora --model-path LORA_DIR
--model-base BASE --output OUT`` (or ``ferret merge-lora ...``).

LORA_DIR is a LoRA training output (``checkpoint-N/`` or ``final-checkpoint/``: adapter + config.json +
``non_lora_trainables.bin`` + processor files). It is loaded through `load_pretrained_model`'s LoRA path (the one
loading path of the project), merged, and OUT receives a full checkpoint in the original layout: weights, config,
tokenizer, preprocessor_config.json and ``vision_tower/``. Without ``--model-base`` the adapter's recorded base is
used (for runs that started from a Vicuna base or ``--init_config``, training wrote it to
``<output_dir>/base_model``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence

import torch

logger = logging.getLogger("ferret.train.merge_lora")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def recorded_base(model_path: str) -> str | None:
    """The base model a PEFT adapter folder records (``base_model_name_or_path``), if any."""
    path = os.path.join(model_path, "adapter_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("base_model_name_or_path")


def merge_lora(model_path: str, model_base: str | None, output: str, dtype: str = "float16",
               device: str = "cpu") -> str:
    """Loads LORA_DIR over its base, merges, and writes a full checkpoint to ``output``; returns ``output``."""
    from ferret.model.builder import load_pretrained_model

    if not os.path.isfile(os.path.join(model_path, "adapter_config.json")):
        raise ValueError(f"{model_path} holds no LoRA adapter (adapter_config.json is missing)")
    model_base = model_base or recorded_base(model_path)
    if not model_base:
        raise ValueError(f"{model_path}: pass --model-base (the adapter records no base model)")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model, processor = load_pretrained_model(model_path, model_base=model_base, device=device, dtype=DTYPES[dtype])
    staging = output.rstrip(os.sep) + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.config.use_cache = True
    model.save_pretrained(staging, save_vision_tower=True)
    processor.save_pretrained(staging)
    if os.path.isdir(output):
        shutil.rmtree(output)
    os.replace(staging, output)
    logger.info("merged %s into %s -> %s", model_path, model_base, output)
    return output


def run(args: argparse.Namespace) -> int:
    """Does the work of `ferret weights merge-lora` (arguments parsed by `ferret.weights.cli`)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = merge_lora(args.model_path, args.model_base, args.output, args.dtype, args.device)
    print(out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from ferret.weights.cli import main as cli_main

    return cli_main("merge-lora", argv)


if __name__ == "__main__":
    sys.exit(main())
