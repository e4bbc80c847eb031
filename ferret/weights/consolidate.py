"""Rewrite a checkpoint folder as safetensors shards (+ index), optionally in another dtype, in bounded memory.

Usage:
    python -m ferret.weights.consolidate --src ./checkpoints/ferret-7b/checkpoint-final --dst ./ferret-7b \
        [--dtype float16] [--max-shard-size 5GB] [--vision-tower-path ./clip-vit-large-patch14-336] [--overwrite]

Reads any layout `ferret.model.checkpoint.CheckpointReader` knows (safetensors or pytorch_model.bin, single or
sharded) one tensor at a time. `--dtype` casts floating-point tensors only (and records the dtype in the
copied config.json); other tensors keep theirs. Side files (config, tokenizer, processor) and a `vision_tower/`
folder are copied from the source. (The original's `consolidate.py` also ran LLaVA's interactive config
upgrade; Ferret checkpoints never need it, so it is not here.)
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ferret.model.checkpoint import (
    DEFAULT_MAX_SHARD_SIZE,
    VISION_TOWER_DIR,
    CheckpointReader,
    ShardedSafetensorsWriter,
    TensorSpec,
    atomic_output_dir,
    check_output_path,
    copy_side_files,
    copy_vision_tower,
    parse_dtype,
    parse_size,
    progress_bar,
    run_weight_tool,
)

logger = logging.getLogger(__name__)


def consolidate(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    vision_tower_path: str | os.PathLike | None = None,
) -> Path:
    """Copy the checkpoint at `src` to `dst` as safetensors shards; returns `dst`."""
    dtype = parse_dtype(dtype)
    dst = check_output_path(dst, overwrite=overwrite, inputs=(src,))
    reader = CheckpointReader(src)

    def out_dtype(spec: TensorSpec) -> torch.dtype:
        return dtype if dtype is not None and spec.dtype.is_floating_point else spec.dtype

    specs = [TensorSpec(spec.name, spec.shape, out_dtype(spec)) for spec in reader.specs]
    vision_src = Path(vision_tower_path) if vision_tower_path else Path(src) / VISION_TOWER_DIR
    with atomic_output_dir(dst, overwrite=overwrite, inputs=(src,)) as tmp:
        with (
            ShardedSafetensorsWriter(tmp, specs, max_shard_size) as writer,
            progress_bar(sum(s.nbytes for s in specs), "consolidating") as bar,
        ):
            for spec in specs:
                writer.write(spec.name, reader.get(spec.name).to(spec.dtype))
                bar.update(spec.nbytes)
        reader.close()
        copy_side_files(src, tmp, dtype=dtype)
        if vision_src.is_dir():
            copy_vision_tower(vision_src, tmp)
    logger.info("wrote %d tensors to %s", len(specs), dst)
    return dst


def run(args: argparse.Namespace) -> int:
    """Does the work of `ferret weights consolidate` (arguments parsed by `ferret.weights.cli`)."""
    return run_weight_tool(lambda: consolidate(
        args.src,
        args.dst,
        dtype=args.dtype,
        overwrite=args.overwrite,
        max_shard_size=parse_size(args.max_shard_size),
        vision_tower_path=args.vision_tower_path,
    ))


def main(argv: Sequence[str] | None = None) -> int:
    from ferret.weights.cli import main as cli_main

    return cli_main("consolidate", argv)


if __name__ == "__main__":
    raise SystemExit(main())
