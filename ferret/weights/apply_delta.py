"""Rebuild released Ferret weights from a delta over Vicuna, in bounded memory; the delta rules live here.

Usage:
    python -m ferret.weights.apply_delta --base-model-path ./vicuna-7b-v1-3 \
        --target-model-path ./ferret-7b-v1-3 --delta-path ./ferret-7b-delta \
        [--vision-tower-path ./clip-vit-large-patch14-336] [--overwrite] [--max-shard-size 5GB]

(`--base/--target/--delta` work as argparse prefixes, as in the original README.)

The rules, identical to the original's `apply_delta.py` / `make_delta.py`, for each tensor of the delta:
* not in the base: it must be a multimodal tensor (`model.mm_projector.*`, `model.region_geo_sampler.*`,
  `model.region_fea_adapter.*`; the released checkpoints have the 18 names of `RELEASED_MULTIMODAL_NAMES`),
  stored absolute in the delta and copied as is;
* same shape as in the base: target = base + delta;
* `model.embed_tokens.weight` / `lm_head.weight` with more rows than the base (32001 vs 32000: `<region_fea>`)
  and the same width: the base is added into the top-left `[:rows_base, :h]` block, the extra rows stay absolute;
* anything else is refused before anything is written, naming the tensor and both shapes.
Arithmetic is done in float32 and cast to the output dtype (the delta's unless `--dtype`).
`*.rotary_emb.inv_freq` buffers (old transformers checkpoints) are recomputed from the config by every
transformers since 4.31, are not weights, and are left out of the output.

The output is written as safetensors shards into a temporary sibling folder renamed into place at the end;
config, generation config, tokenizer and processor files are copied from the delta.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ferret.model.checkpoint import (
    DEFAULT_MAX_SHARD_SIZE,
    VISION_TOWER_DIR,
    CheckpointError,
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

# The tensors the original stores absolute in its deltas (`apply_delta.py` / `make_delta.py` exclusion list).
RELEASED_MULTIMODAL_NAMES = (
    "model.mm_projector.weight",
    "model.mm_projector.bias",
    *(
        f"model.region_geo_sampler.{module}.{i}.{part}"
        for module, parts in (
            ("diff_projector_list", ("weight", "bias")),
            ("agg_projector_list", ("net.0.weight", "net.0.bias", "norm.weight", "norm.bias")),
        )
        for i in (0, 1)
        for part in parts
    ),
    "model.region_geo_sampler.flatten_projector.weight",
    "model.region_geo_sampler.flatten_projector.bias",
    "model.region_geo_sampler.dim_projector.weight",
    "model.region_geo_sampler.dim_projector.bias",
)
MULTIMODAL_PREFIXES = ("model.mm_projector.", "model.region_geo_sampler.", "model.region_fea_adapter.")
RESIZED_EMBEDDING_NAMES = ("model.embed_tokens.weight", "lm_head.weight")
NON_WEIGHT_SUFFIXES = (".rotary_emb.inv_freq",)

# Elements per slice of the float32 arithmetic: bounds the temporaries to ~4 * 16 MiB whatever the tensor size.
_CHUNK = 1 << 22


class DeltaError(CheckpointError):
    """A delta (or target) does not fit the base under the delta rules."""


def is_multimodal(name: str) -> bool:
    return name.startswith(MULTIMODAL_PREFIXES)


def is_non_weight(name: str) -> bool:
    return name.endswith(NON_WEIGHT_SUFFIXES)


@dataclass(frozen=True)
class DeltaStep:
    """How one output tensor is made from a source tensor (the delta, or the target for make_delta)."""

    name: str
    rule: str  # "absolute" | "same_shape" | "top_rows"
    source: TensorSpec
    base: TensorSpec | None
    output: TensorSpec


def plan_delta(
    source: CheckpointReader, base: CheckpointReader, out_dtype: torch.dtype | None = None, source_role: str = "delta"
) -> list[DeltaStep]:
    """Check every tensor of `source` against `base` (shapes only, no data read) and say how each is combined.

    Raises DeltaError naming the first offending tensor and both shapes.
    """
    steps = []
    for spec in source.specs:
        name = spec.name
        if is_non_weight(name):
            logger.info("leaving out %s: a buffer recomputed from the config, not a weight", name)
            continue
        out = TensorSpec(name, spec.shape, out_dtype or spec.dtype)
        if name not in base:
            if not is_multimodal(name):
                raise DeltaError(
                    f"tensor {name} {list(spec.shape)} of the {source_role} is not in the base model "
                    f"{base.path}, and only multimodal tensors ({', '.join(p + '*' for p in MULTIMODAL_PREFIXES)}) "
                    "may be missing from it"
                )
            steps.append(DeltaStep(name, "absolute", spec, None, out))
            continue
        base_spec = base.spec(name)
        if spec.shape == base_spec.shape:
            rule = "same_shape"
        elif (
            name in RESIZED_EMBEDDING_NAMES
            and len(spec.shape) == 2
            and len(base_spec.shape) == 2
            and spec.shape[1] == base_spec.shape[1]
            and spec.shape[0] > base_spec.shape[0]
        ):
            rule = "top_rows"
        else:
            allowed = (
                f"only {' and '.join(RESIZED_EMBEDDING_NAMES)} may differ, by extra rows of the same width"
            )
            raise DeltaError(
                f"tensor {name} has shape {list(spec.shape)} in the {source_role} {source.path} but "
                f"{list(base_spec.shape)} in the base {base.path}; {allowed}"
            )
        for role, s in ((source_role, spec), ("base", base_spec)):
            if not s.dtype.is_floating_point:
                raise DeltaError(f"tensor {name} is {s.dtype} in the {role}; only floating-point tensors can be added")
        steps.append(DeltaStep(name, rule, spec, base_spec, out))
    unused = [n for n in base.names if n not in source and not is_non_weight(n)]
    if unused:
        logger.warning(
            "%d tensors of the base are not in the %s and are left out (e.g. %s)", len(unused), source_role, unused[0]
        )
    return steps


def combine(source: torch.Tensor, base: torch.Tensor | None, sign: int, out_dtype: torch.dtype) -> torch.Tensor:
    """source + sign * base in float32 (or wider), cast to `out_dtype`.

    source: [*S] (e.g. [32001, h]); base: None, [*S], or [r, h] with r <= S[0] (added into the first r rows).
    Returns [*S] of `out_dtype`. Works slice by slice over the flattened prefix that overlaps the base, writing
    into `source` when it already has `out_dtype`, so temporaries stay small whatever the tensor size.
    """
    out = source if source.dtype == out_dtype else torch.empty_like(source, dtype=out_dtype)
    flat_out, flat_src = out.view(-1), source.reshape(-1)
    overlap = 0
    if base is not None:
        flat_base = base.reshape(-1)
        overlap = flat_base.numel()
        compute = torch.promote_types(torch.promote_types(torch.float32, source.dtype), base.dtype)
        for start in range(0, overlap, _CHUNK):
            end = min(start + _CHUNK, overlap)
            acc = flat_src[start:end].to(compute)
            acc.add_(flat_base[start:end].to(compute), alpha=sign)
            flat_out[start:end] = acc
    if out is not source:
        flat_out[overlap:] = flat_src[overlap:]
    return out


def combine_checkpoints(
    base_path: str | os.PathLike,
    source_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    sign: int,
    out_dtype: torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    vision_tower_path: str | os.PathLike | None = None,
    source_role: str = "delta",
) -> Path:
    """Write output = source + sign * base (by the delta rules) to `output_path`, one tensor at a time.

    The side files (config, tokenizer, ...) and any `vision_tower/` come from `source_path`, or the vision tower
    from `vision_tower_path` when given. Returns the output folder.
    """
    output_path = check_output_path(output_path, overwrite=overwrite, inputs=(base_path, source_path))
    base = CheckpointReader(base_path)
    source = CheckpointReader(source_path)
    logger.info("base %s: %d tensors (%s)", base.path, len(base), base.format)
    logger.info("%s %s: %d tensors (%s)", source_role, source.path, len(source), source.format)
    steps = plan_delta(source, base, out_dtype, source_role)
    counts = {rule: sum(step.rule == rule for step in steps) for rule in ("same_shape", "top_rows", "absolute")}
    logger.info(
        "%d tensors: %d combined with the base, %d resized embeddings, %d stored absolute",
        len(steps), counts["same_shape"], counts["top_rows"], counts["absolute"],
    )
    vision_src = Path(vision_tower_path) if vision_tower_path else Path(source_path) / VISION_TOWER_DIR
    with atomic_output_dir(output_path, overwrite=overwrite, inputs=(base_path, source_path)) as tmp:
        specs = [step.output for step in steps]
        desc = "applying delta" if sign > 0 else "making delta"
        with (
            ShardedSafetensorsWriter(tmp, specs, max_shard_size) as writer,
            progress_bar(sum(s.nbytes for s in specs), desc) as bar,
        ):
            for step in steps:
                tensor = source.get(step.name)
                base_tensor = base.get(step.name) if step.base is not None else None
                tensor = combine(tensor, base_tensor, sign, step.output.dtype)
                del base_tensor
                writer.write(step.name, tensor)
                del tensor
                bar.update(step.output.nbytes)
        base.close()
        source.close()
        copied = copy_side_files(source_path, tmp, dtype=out_dtype)
        logger.info("copied %s from %s", ", ".join(copied) or "no side files", source_path)
        if vision_src.is_dir():
            copy_vision_tower(vision_src, tmp)
            logger.info("copied the vision tower from %s", vision_src)
    logger.info("wrote %s", output_path)
    return output_path


def apply_delta(
    base_model_path: str | os.PathLike,
    target_model_path: str | os.PathLike,
    delta_path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    vision_tower_path: str | os.PathLike | None = None,
) -> Path:
    """target = base + delta under the delta rules (see the module docstring); returns the target folder."""
    return combine_checkpoints(
        base_model_path,
        delta_path,
        target_model_path,
        sign=+1,
        out_dtype=parse_dtype(dtype),
        overwrite=overwrite,
        max_shard_size=max_shard_size,
        vision_tower_path=vision_tower_path,
        source_role="delta",
    )


def run(args: argparse.Namespace) -> int:
    """Does the work of `ferret weights apply-delta` (arguments parsed by `ferret.weights.cli`)."""
    return run_weight_tool(lambda: apply_delta(
        args.base_model_path,
        args.target_model_path,
        args.delta_path,
        dtype=args.dtype,
        overwrite=args.overwrite,
        max_shard_size=parse_size(args.max_shard_size),
        vision_tower_path=args.vision_tower_path,
    ))


def main(argv: Sequence[str] | None = None) -> int:
    from ferret.weights.cli import main as cli_main

    return cli_main("apply-delta", argv)


if __name__ == "__main__":
    raise SystemExit(main())
