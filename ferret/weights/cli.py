"""Command lines of the weight tools: `ferret weights TOOL ...` and `python -m ferret.weights.TOOL ...`.

The parsers live here, apart from the tools, so that ``--help`` and argument errors never import torch: a tool's
module (which works on tensors) is imported only once its arguments have been parsed, and its ``run(args)`` does the
work. ``python -m ferret.weights.apply_delta`` (and the old ``python -m ferret.model.apply_delta``) end up here too.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from ferret.flags import program_name

DEFAULT_MAX_SHARD_SIZE = "5GB"  # as transformers' save_pretrained
SIZE_HELP = "largest safetensors shard, e.g. 5GB (default), 2GiB, 500MB"


def _output_arguments(parser: argparse.ArgumentParser, dtype_help: str) -> None:
    parser.add_argument("--dtype", default=None, help=dtype_help)
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help=SIZE_HELP)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def apply_delta_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = "Rebuild Ferret weights: target = base + delta (the released deltas are over Vicuna v1.3)."
    parser.add_argument("--base-model-path", required=True, help="the base LLM folder (Vicuna v1.3)")
    parser.add_argument("--target-model-path", required=True, help="the folder to create")
    parser.add_argument("--delta-path", required=True, help="the released delta folder")
    parser.add_argument(
        "--vision-tower-path", default=None,
        help="a local CLIP ViT-L/14-336 folder to copy into TARGET/vision_tower, so loading needs no hub",
    )
    _output_arguments(parser, "dtype of the target (default: the delta's, normally float16)")


def make_delta_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = "Make a delta: delta = target - base."
    parser.add_argument("--base-model-path", required=True, help="the base LLM folder (Vicuna v1.3)")
    parser.add_argument("--target-model-path", required=True, help="the trained Ferret model folder")
    parser.add_argument("--delta-path", required=True, help="the delta folder to create")
    parser.add_argument("--hub-repo-id", default=None, help="also upload the delta to this hub repository")
    _output_arguments(parser, "dtype of the delta (default: the target's; float32 round-trips bit for bit)")


def consolidate_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = "Rewrite a checkpoint as safetensors shards."
    parser.add_argument("--src", required=True, help="checkpoint folder (or a single .bin/.safetensors file)")
    parser.add_argument("--dst", required=True, help="the folder to create")
    parser.add_argument("--vision-tower-path", default=None, help="a CLIP folder to copy into DST/vision_tower")
    _output_arguments(parser, "cast floating-point tensors to this dtype (e.g. float16)")


def extract_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = "Extract the projector / region-sampler weights into one file."
    parser.add_argument("--model-path", required=True, help="checkpoint folder (or a single .bin/.safetensors file)")
    parser.add_argument("--output", required=True, help="output file (.bin: torch.save; .safetensors)")
    parser.add_argument(
        "--keys-to-match", "--keys_to_match", nargs="+", default=["region_geo_sampler"],
        help="keep tensors whose names contain any of these (e.g. mm_projector region_geo_sampler)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def verify_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = "Check that two checkpoints hold the same tensors (exit 0 equal, 1 different, 2 error)."
    parser.add_argument("--orig-model-path", required=True)
    parser.add_argument("--new-model-path", required=True)
    parser.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance (default 1e-4, as the original)")
    parser.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance (default 1e-5, torch's)")


MERGE_DTYPES = ("bfloat16", "float16", "float32")


def merge_lora_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = "Merge a LoRA training checkpoint into its base model (a full checkpoint in OUTPUT)."
    parser.add_argument("--model-path", required=True, help="LoRA checkpoint folder")
    parser.add_argument("--model-base", default=None, help="base model folder or hub id (default: the adapter's)")
    parser.add_argument("--output", required=True, help="folder for the merged checkpoint")
    parser.add_argument("--dtype", default="float16", choices=MERGE_DTYPES,
                        help="dtype of the saved weights (default float16, as the released checkpoints)")
    parser.add_argument("--device", default="cpu", help="device to merge on (default cpu)")


# `ferret weights NAME` -> (module whose run(args) does the work, the function that adds its arguments).
TOOLS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "apply-delta": ("ferret.weights.apply_delta", apply_delta_parser),
    "make-delta": ("ferret.weights.make_delta", make_delta_parser),
    "consolidate": ("ferret.weights.consolidate", consolidate_parser),
    "extract": ("ferret.weights.extract", extract_parser),
    "verify": ("ferret.weights.verify", verify_parser),
    "merge-lora": ("ferret.weights.merge_lora", merge_lora_parser),
}


def build_parser(tool: str, prog: str | None = None) -> argparse.ArgumentParser:
    module, add_arguments = TOOLS[tool]
    parser = argparse.ArgumentParser(prog=prog or _prog(tool))
    add_arguments(parser)
    return parser


def _prog(tool: str) -> str:
    return program_name(TOOLS[tool][0])


def main(tool: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Parses `argv` for `tool`, then imports the tool and runs it; returns the exit status."""
    args = build_parser(tool, prog).parse_args(sys.argv[1:] if argv is None else argv)
    return int(importlib.import_module(TOOLS[tool][0]).run(args) or 0)


def command(tool: str) -> Callable[[Sequence[str] | None], int]:
    """`main` for one tool, as the `ferret` command calls it."""
    def run_tool(argv: Sequence[str] | None = None) -> int:
        return main(tool, argv)

    run_tool.__name__ = tool.replace("-", "_")
    return run_tool


apply_delta = command("apply-delta")
make_delta = command("make-delta")
consolidate = command("consolidate")
extract = command("extract")
verify = command("verify")
merge_lora = command("merge-lora")
