"""Extract the tensors whose names contain given keys (the projector, the region sampler) into one file.

Usage (the original's scripts/extract_geosampler_and_mm_projector.py):
    python -m ferret.weights.extract --model-path ./checkpoints/ferret-7b/checkpoint-final \
        --output ./checkpoints/ferret-7b/extracted_mm_projector.bin --keys_to_match mm_projector [region_geo_sampler]

A tensor is kept when any key is a substring of its name; names are kept in full (`model.mm_projector.weight`).
The output is a torch state dict (`torch.save`, as the original) unless it ends in `.safetensors`. Any
checkpoint layout `CheckpointReader` knows is accepted; only the matching tensors are read.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from ferret.model.checkpoint import (
    CheckpointError,
    CheckpointReader,
    atomic_output_file,
    check_output_path,
    run_weight_tool,
)

logger = logging.getLogger(__name__)


def extract(
    model_path: str | os.PathLike,
    output: str | os.PathLike,
    keys_to_match: Sequence[str] = ("region_geo_sampler",),
    *,
    overwrite: bool = False,
) -> list[str]:
    """Save the tensors of `model_path` whose names contain any of `keys_to_match` to `output`; returns the names."""
    if not keys_to_match:
        raise ValueError("keys_to_match is empty; name at least one key, e.g. mm_projector")
    check_output_path(output, overwrite=overwrite, inputs=(model_path,))
    reader = CheckpointReader(model_path)
    names = [name for name in reader.names if any(key in name for key in keys_to_match)]
    if not names:
        raise CheckpointError(f"no tensor of {reader.path} has a name containing any of {list(keys_to_match)}")
    # These are the small multimodal modules (~40M parameters at most), so holding them together is fine.
    weights = dict(reader.iter_tensors(names))
    reader.close()
    with atomic_output_file(output, overwrite=overwrite, inputs=(model_path,)) as tmp:
        if Path(output).suffix == ".safetensors":
            save_file(weights, str(tmp), metadata={"format": "pt"})
        else:
            torch.save(weights, tmp)
    logger.info("saved %d tensors to %s: %s", len(names), output, ", ".join(names))
    return names


def run(args: argparse.Namespace) -> int:
    """Does the work of `ferret weights extract` (arguments parsed by `ferret.weights.cli`)."""
    return run_weight_tool(lambda: extract(args.model_path, args.output, args.keys_to_match, overwrite=args.overwrite))


def main(argv: Sequence[str] | None = None) -> int:
    from ferret.weights.cli import main as cli_main

    return cli_main("extract", argv)


if __name__ == "__main__":
    raise SystemExit(main())
