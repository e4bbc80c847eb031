"""Make a releasable delta of a trained Ferret model over its base LLM (the inverse of `apply_delta`).

Usage:
    python -m ferret.weights.make_delta --base-model-path ./vicuna-7b-v1-3 \
        --target-model-path ./checkpoints/ferret-7b/checkpoint-final --delta-path ./ferret-7b-delta \
        [--hub-repo-id ORG/ferret-7b-delta] [--dtype float32] [--overwrite]

delta = target - base by the same rules as `ferret.model.apply_delta` (multimodal tensors stored absolute, the
32000 base rows of embed_tokens/lm_head subtracted from the first rows of the 32001-row target, anything else
refused), in float32, cast to the target's dtype unless `--dtype`. A float16 delta round-trips to within float16
rounding; a float32 delta (`--dtype float32`, twice the size) round-trips bit for bit unless a base value is over
2^13 times larger than its target value.
Config, tokenizer and processor files are copied from the target. With `--hub-repo-id` the finished folder is
uploaded with huggingface_hub.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ferret.weights.apply_delta import combine_checkpoints
from ferret.model.checkpoint import (
    DEFAULT_MAX_SHARD_SIZE,
    parse_size,
    parse_dtype,
    run_weight_tool,
)

logger = logging.getLogger(__name__)


def make_delta(
    base_model_path: str | os.PathLike,
    target_model_path: str | os.PathLike,
    delta_path: str | os.PathLike,
    *,
    hub_repo_id: str | None = None,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """delta = target - base under the delta rules; returns the delta folder (pushed to the hub if asked)."""
    out = combine_checkpoints(
        base_model_path,
        target_model_path,
        delta_path,
        sign=-1,
        out_dtype=parse_dtype(dtype),
        overwrite=overwrite,
        max_shard_size=max_shard_size,
        source_role="target",
    )
    if hub_repo_id:
        push_to_hub(out, hub_repo_id)
    return out


def push_to_hub(folder: str | os.PathLike, repo_id: str) -> None:
    """Upload `folder` to the model repository `repo_id` (created if needed; needs a hub token)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model")
    logger.info("uploaded %s to https://huggingface.co/%s", folder, repo_id)


def run(args: argparse.Namespace) -> int:
    """Does the work of `ferret weights make-delta` (arguments parsed by `ferret.weights.cli`)."""
    return run_weight_tool(lambda: make_delta(
        args.base_model_path,
        args.target_model_path,
        args.delta_path,
        hub_repo_id=args.hub_repo_id,
        dtype=args.dtype,
        overwrite=args.overwrite,
        max_shard_size=parse_size(args.max_shard_size),
    ))


def main(argv: Sequence[str] | None = None) -> int:
    from ferret.weights.cli import main as cli_main

    return cli_main("make-delta", argv)


if __name__ == "__main__":
    raise SystemExit(main())
