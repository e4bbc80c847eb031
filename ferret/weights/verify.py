"""Check that two checkpoints hold the same tensors, tensor by tensor, in bounded memory.

Usage (the original's scripts/verify_equal.py):
    python -m ferret.weights.verify --orig-model-path ./checkpoints/ferret-7b/checkpoint-final \
        --new-model-path ./ferret-7b-v1-3 [--atol 1e-4] [--rtol 1e-5]

Two checkpoints are equal when they have the same tensor names and shapes and every pair is allclose
(|new - orig| <= atol + rtol * |orig|, compared in float32 or wider; `--atol 0 --rtol 0` asks for exact
equality). Unlike the original, which stopped at the first difference and ignored tensors only the new model
has, every difference is reported. `*.rotary_emb.inv_freq` buffers are skipped (recomputed from the config).
Exit status 0 when equal, 1 when not.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ferret.weights.apply_delta import is_non_weight
from ferret.model.checkpoint import CheckpointError, CheckpointReader, progress_bar, setup_cli_logging

logger = logging.getLogger(__name__)


@dataclass
class Comparison:
    """What differs between two checkpoints."""

    compared: int = 0
    only_in_orig: list[str] = field(default_factory=list)
    only_in_new: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    value_mismatch: list[tuple[str, float]] = field(default_factory=list)  # (name, max |new - orig|)

    @property
    def equal(self) -> bool:
        return not (self.only_in_orig or self.only_in_new or self.shape_mismatch or self.value_mismatch)

    def report(self) -> list[str]:
        lines = [f"{name}: only in the original" for name in self.only_in_orig]
        lines += [f"{name}: only in the new model" for name in self.only_in_new]
        lines += [
            f"{name}: shape {list(a)} in the original, {list(b)} in the new" for name, a, b in self.shape_mismatch
        ]
        lines += [f"{name}: values differ, max |difference| {diff:.3g}" for name, diff in self.value_mismatch]
        verdict = "EQUAL" if self.equal else "DIFFERENT"
        lines.append(f"{verdict}: {self.compared} tensors compared, {len(lines)} differences")
        return lines


def tensors_close(orig: torch.Tensor, new: torch.Tensor, atol: float, rtol: float) -> tuple[bool, float]:
    """(allclose, max |new - orig|) for same-shape tensors of any dtypes; NaNs in the same places count as equal."""
    if not (orig.dtype.is_floating_point or new.dtype.is_floating_point):
        same = torch.equal(orig, new.to(orig.dtype)) if orig.dtype != new.dtype else torch.equal(orig, new)
        return same, 0.0 if same else float((orig.double() - new.double()).abs().max())
    compute = torch.promote_types(torch.promote_types(torch.float32, orig.dtype), new.dtype)
    a, b = orig.to(compute), new.to(compute)
    close = torch.allclose(b, a, rtol=rtol, atol=atol, equal_nan=True)
    diff = (b - a).abs().nan_to_num(0.0)
    return close, float(diff.max()) if diff.numel() else 0.0


def compare_checkpoints(
    orig_path: str | os.PathLike, new_path: str | os.PathLike, atol: float = 1e-4, rtol: float = 1e-5
) -> Comparison:
    """Compare two checkpoints one tensor pair at a time (see the module docstring)."""
    orig, new = CheckpointReader(orig_path), CheckpointReader(new_path)
    result = Comparison()
    result.only_in_orig = [n for n in orig.names if n not in new and not is_non_weight(n)]
    result.only_in_new = [n for n in new.names if n not in orig and not is_non_weight(n)]
    common = [n for n in orig.names if n in new and not is_non_weight(n)]
    with progress_bar(sum(orig.spec(n).nbytes for n in common), "comparing") as bar:
        for name in common:
            a_spec, b_spec = orig.spec(name), new.spec(name)
            if a_spec.shape != b_spec.shape:
                result.shape_mismatch.append((name, a_spec.shape, b_spec.shape))
            else:
                close, diff = tensors_close(orig.get(name), new.get(name), atol, rtol)
                if not close:
                    result.value_mismatch.append((name, diff))
            result.compared += 1
            bar.update(a_spec.nbytes)
    orig.close()
    new.close()
    return result


def run(args: argparse.Namespace) -> int:
    """Does the work of `ferret weights verify` (arguments parsed by `ferret.weights.cli`)."""
    setup_cli_logging()
    try:
        result = compare_checkpoints(args.orig_model_path, args.new_model_path, args.atol, args.rtol)
    except CheckpointError as err:
        logger.error("%s", err)
        return 2
    for line in result.report():
        print(line)
    return 0 if result.equal else 1


def main(argv: Sequence[str] | None = None) -> int:
    from ferret.weights.cli import main as cli_main

    return cli_main("verify", argv)


if __name__ == "__main__":
    raise SystemExit(main())
