"""The project's flag style, and the one table of the original's spellings that map onto it.

The project's own flags are ``--kebab-case`` (``--model-path``, ``--region-feature``). Training's flags are the fields
of its argument dataclasses and keep the original's ``--snake_case`` names; the parser takes the kebab spelling of
every one of them too (``--learning-rate`` = ``--learning_rate``). Everything the original's launch scripts and
READMEs type keeps working: `ORIGINAL_SPELLINGS` lists each spelling that differs from the project's, where it is
accepted and what it becomes. `ferret help flags` prints it; the README's CLI section shows it.

This module imports nothing heavy: the command lines that use it stay fast under ``--help``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import NamedTuple

logger = logging.getLogger(__name__)


class Spelling(NamedTuple):
    original: str  # as the original's scripts / README type it
    where: str  # which commands accept it
    project: str  # the project's spelling ("" when the flag has no effect here)
    note: str  # what happens


ORIGINAL_SPELLINGS: tuple[Spelling, ...] = (
    Spelling("--add_region_feature True/False", "train", "--region-feature / --no-region-feature", "alias"),
    Spelling("--add_region_feature (bare)", "eval, serve worker/web/cli/api", "--region-feature", "alias"),
    Spelling("--add-region-feature", "train, eval, serve", "--region-feature", "alias"),
    Spelling("--no_region_feature", "eval, serve", "--no-region-feature", "alias"),
    Spelling("region_feature=", "FerretProcessor / Python API", "--region-feature", "the keyword of the library"),
    Spelling("--snake_case (every training flag)", "train", "--kebab-case", "both spellings accepted"),
    Spelling("--image_path", "eval infer", "--image-folder", "alias"),
    Spelling("--top_p", "eval infer", "--top-p", "alias"),
    Spelling("--data_path", "eval refexp/flickr/lvis/pope infer", "--annotation-file", "alias"),
    Spelling("--data_path", "eval ferret_bench infer", "--questions", "alias"),
    Spelling("--region_format, --no_coor", "eval lvis infer", "--region-format, --no-coor", "aliases"),
    Spelling("--keys_to_match", "weights extract", "--keys-to-match", "alias"),
    Spelling("--base / --target / --delta", "weights apply-delta, make-delta", "--base-model-path, ...",
             "argparse prefixes, as the original's README"),
    Spelling("python -m ferret.model.{apply_delta,make_delta,consolidate,extract,verify}", "weights",
             "ferret weights {apply-delta,make-delta,consolidate,extract,verify}", "old module paths run the same"),
    Spelling("python -m ferret.train.merge_lora", "weights", "ferret weights merge-lora", "old module path"),
    Spelling("ferret apply-delta (make-delta, consolidate, extract, verify, merge-lora)", "ferret",
             "ferret weights NAME",
             "old subcommand names"),
    Spelling("--warmup_ratio R", "train", "--warmup_steps R (< 1)", "translated (removed in transformers 5)"),
    Spelling("--evaluation_strategy", "train", "--eval_strategy", "translated (removed in transformers 5)"),
    Spelling("--fsdp_transformer_layer_cls_to_wrap", "train", "--fsdp_config", "translated"),
    Spelling("--mpt_attn_impl, --lazy_preprocess, --is_multimodal", "train", "",
             "accepted and ignored with a log line (the original's launch script passes --lazy_preprocess True)"),
    Spelling("--moderate", "serve web", "", "refused: content moderation (an OpenAI API call) is not implemented"),
    Spelling("--embed", "serve web", "", "refused: the web UI has no embedded mode"),
    Spelling("--multi-modal", "serve worker", "", "refused: every Ferret checkpoint is multimodal"),
    Spelling("--num-gpus", "serve worker", "--device", "refused: one worker uses one device; start one per GPU"),
)

# Flags that do nothing in this project: why, for the refusal message. None of them is in the original's
# launch scripts or README commands, so they are refused rather than swallowed.
NO_OP_FLAGS: dict[str, str] = {
    "--moderate": "content moderation (an OpenAI API call) is not implemented",
    "--embed": "the web UI has no embedded mode",
    "--multi-modal": "every Ferret checkpoint is multimodal; nothing to switch on",
    "--num-gpus": "one worker uses one device: pick it with --device or CUDA_VISIBLE_DEVICES and start one worker "
                  "per GPU",
}


def program_name(module: str) -> str:
    """What a command's usage line calls it: ``ferret SUBCOMMAND`` under the `ferret` command (which puts that in
    argv[0]), else ``python -m MODULE``."""
    import sys

    return sys.argv[0] if sys.argv and sys.argv[0].startswith("ferret ") else f"python -m {module}"


def spelling_table() -> str:
    """`ORIGINAL_SPELLINGS` as a Markdown table (what `ferret help flags` prints and the README shows)."""
    rows = ["| original spelling | accepted by | project spelling | what happens |", "|---|---|---|---|"]
    rows += [f"| `{s.original}` | {s.where} | {f'`{s.project}`' if s.project else '—'} | {s.note} |"
             for s in ORIGINAL_SPELLINGS]
    return "\n".join(rows)


class _Refuse(argparse.Action):
    """A flag that does nothing here: stop with a message that says why."""

    def __init__(self, option_strings, dest, nargs=None, **kwargs):
        super().__init__(option_strings, dest, nargs=nargs if nargs is not None else 0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is not supported: {NO_OP_FLAGS[self.option_strings[0]]}")


def add_refused_flags(parser: argparse.ArgumentParser, *flags: str, takes_value: Sequence[str] = ()) -> None:
    """Adds each of `flags` (keys of NO_OP_FLAGS) so that giving it exits with status 2 and the reason; the ones in
    `takes_value` swallow their value first (``--num-gpus 2``)."""
    for flag in flags:
        parser.add_argument(flag, action=_Refuse, nargs=1 if flag in takes_value else 0, help=argparse.SUPPRESS)


def parse_bool(text: str) -> bool:
    """``True/False/yes/no/1/0`` (any case), as the original's ``--flag True`` arguments."""
    value = text.strip().lower()
    if value in ("true", "yes", "y", "1", "on"):
        return True
    if value in ("false", "no", "n", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def add_region_feature_argument(parser: argparse.ArgumentParser, default: bool | None = True) -> None:
    """``--region-feature`` / ``--no-region-feature`` (dest ``region_feature``) and the original's spellings:
    ``--add_region_feature`` bare or with True/False, ``--add-region-feature``, ``--no_region_feature``."""
    state = {True: "on", False: "off", None: "as the checkpoint says"}[default]
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--region-feature", "--add-region-feature", "--add_region_feature", dest="region_feature",
                       nargs="?", const=True, default=default, type=parse_bool, metavar="BOOL",
                       help=f"send regions as '[coords] <region_fea>' with their features (default: {state})")
    group.add_argument("--no-region-feature", "--no_region_feature", dest="region_feature", action="store_false",
                       help="regions as text coordinates only, no <region_fea>")


# Training's own spellings of the switch, rewritten before its (dataclass) parser sees them.
_TRAIN_REGION_FLAGS = {"--region-feature": "True", "--no-region-feature": "False", "--no_region_feature": "False"}


def translate_training_argv(argv: Sequence[str]) -> list[str]:
    """Rewrites the project's spellings of training's switches onto the dataclass fields: ``--region-feature``
    [BOOL] / ``--no-region-feature`` -> ``--add_region_feature BOOL``. Other words pass through."""
    out: list[str] = []
    words = list(argv)
    i = 0
    while i < len(words):
        word = words[i]
        name, eq, value = word.partition("=")
        if name in _TRAIN_REGION_FLAGS:
            if name == "--region-feature":
                if eq:
                    flag = value
                elif i + 1 < len(words) and not words[i + 1].startswith("-"):
                    i += 1
                    flag = words[i]
                else:
                    flag = "True"
                out += ["--add_region_feature", str(parse_bool(flag))]
            else:
                if eq:
                    raise ValueError(f"{name} takes no value (got {word!r})")
                out += ["--add_region_feature", "False"]
        else:
            out.append(word)
        i += 1
    return out
