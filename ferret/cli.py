"""The `ferret` command: one entry point whose subcommands are the modules' own command lines.

    ferret train ARGS | --config RECIPE.yaml     fine-tune (= python -m ferret.train.train); recipes/ holds the recipes
    ferret eval BENCHMARK infer|score ARGS       refexp flickr lvis pope ferret_bench toy vqa caption osprey report
    ferret serve controller|worker|web|api|cli   = python -m ferret.serve.{controller,model_worker,...}
    ferret data validate|toy|build ARGS          GRIT validator, synthetic toy world, dataset builders
    ferret weights apply-delta|make-delta|consolidate|extract|verify|merge-lora ARGS   weight tools
    ferret demo                                  train + evaluate the toy world on CPU (what `make demo` runs)
    ferret help flags                            the original's flag spellings and what they map onto

Each subcommand forwards the rest of the command line to its own parser, so `ferret SUBCOMMAND --help` prints
that command's help under its own name (`usage: ferret serve api ...`). Nothing but the chosen command is
imported, and no command imports torch or transformers before its arguments are parsed, so `--help` is fast.
The old names `ferret apply-delta`, `ferret merge-lora`, ... still work (= `ferret weights NAME`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from ferret.eval import BENCHMARKS  # a dict of names (the package imports nothing heavy)

# A target is "module" (its main(argv) runs) or "module:function" (function(argv) runs).
COMMANDS = {
    "demo": "ferret.demo",
    "train": "ferret.train.arguments:main",
}
WEIGHT_TOOLS = ("apply-delta", "make-delta", "consolidate", "extract", "verify", "merge-lora")
GROUPS = {
    "eval": dict(BENCHMARKS),
    "serve": {
        "controller": "ferret.serve.controller",
        "worker": "ferret.serve.model_worker",
        "web": "ferret.serve.gradio_web_server",
        "api": "ferret.serve.api",
        "cli": "ferret.serve.cli",
    },
    "data": {"validate": "ferret.data.validate", "toy": "ferret.data.toy", "build": "ferret.data.build",
             "generate-conversations": "ferret.data.build.conversations"},
    "weights": {name: f"ferret.weights.cli:{name.replace('-', '_')}" for name in WEIGHT_TOOLS},
}
# Old top-level names, kept working: `ferret apply-delta ...` = `ferret weights apply-delta ...`.
ALIASES = {name: ("weights", name) for name in WEIGHT_TOOLS}

GROUP_HELP = {
    "eval": "evaluate a model on a benchmark: infer writes answers, score computes the metrics",
    "serve": "serve a model: controller + worker(s) + web UI, an OpenAI-compatible API, or a command-line chat",
    "data": "check GRIT-format data, generate the synthetic toy world, or build datasets",
    "weights": "whole checkpoints, one tensor at a time: released deltas, re-sharding, extraction, comparison, "
               "LoRA merging",
}


def _usage() -> str:
    return __doc__.split("\n\n")[1]


def _group_usage(command: str) -> str:
    names = GROUPS[command]
    lines = [f"usage: ferret {command} {{{','.join(names)}}} [ARGS]", "", GROUP_HELP.get(command, ""), ""]
    for name, target in names.items():
        module = target.split(":")[0]
        shown = f"python -m ferret.weights.{name.replace('-', '_')}" if command == "weights" else f"python -m {module}"
        lines.append(f"  ferret {command} {name:<14} = {shown}")
    lines += ["", f"`ferret {command} NAME --help` prints the options of one of them."]
    return "\n".join(lines)


def _run(prog: str, target: str, argv: list[str]) -> int:
    """Runs `target` on `argv` with ``prog`` as the program name its argparse usage shows."""
    module, _, function = target.partition(":")
    saved = sys.argv[0]
    sys.argv[0] = prog  # argparse's default prog is the base name of argv[0]; the parsers also read it
    try:
        result = getattr(importlib.import_module(module), function or "main")(argv)
    finally:
        sys.argv[0] = saved
    return int(result or 0)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args == ["help"]:
        print("usage: ferret COMMAND [ARGS]\n" + _usage())
        return 0
    if args[:2] == ["help", "flags"]:
        from ferret.flags import spelling_table

        print("The project's flags are --kebab-case; the original's spellings below keep working.\n")
        print(spelling_table())
        return 0
    command, rest = args[0], args[1:]
    if command in ALIASES:
        command, rest = ALIASES[command][0], [ALIASES[command][1], *rest]
    if command in COMMANDS:
        return _run(f"ferret {command}", COMMANDS[command], rest)
    if command in GROUPS:
        group = GROUPS[command]
        if rest and rest[0] in ("-h", "--help", "help"):
            print(_group_usage(command))
            return 0
        if not rest or rest[0] not in group:
            problem = f"ferret {command}: unknown {command} command {rest[0]!r}\n" if rest else ""
            print(problem + _group_usage(command), file=sys.stderr)
            return 2
        return _run(f"ferret {command} {rest[0]}", group[rest[0]], rest[1:])
    print(f"ferret: unknown command {command!r}\nusage: ferret COMMAND [ARGS]\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
