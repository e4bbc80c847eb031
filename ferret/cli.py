"""The `ferret` command: one entry point whose subcommands are the modules' own command lines.

    ferret demo                                  train + evaluate the toy world on CPU (what `make demo` runs)
    ferret train ARGS                            = python -m ferret.train.train
    ferret eval BENCHMARK infer|score ARGS       BENCHMARK: refexp flickr lvis pope ferret_bench toy
    ferret serve controller|worker|web|api|cli   = python -m ferret.serve.{controller,model_worker,...}
    ferret data validate|toy ARGS                GRIT validator, synthetic toy world
    ferret apply-delta|make-delta|consolidate|extract|verify ARGS   weight tools
    ferret merge-lora ARGS                       merge a LoRA adapter into its base

Each subcommand forwards the rest of the command line to the module's `main(argv)`, so
`ferret SUBCOMMAND --help` prints that module's own help, under its own name (`usage: ferret serve api ...`).
Nothing but the chosen module is imported, so `--help` stays fast where the module keeps its heavy imports
inside functions.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS = {
    "demo": "ferret.demo",
    "train": "ferret.train.train",
    "merge-lora": "ferret.train.merge_lora",
    "apply-delta": "ferret.model.apply_delta",
    "make-delta": "ferret.model.make_delta",
    "consolidate": "ferret.model.consolidate",
    "extract": "ferret.model.extract",
    "verify": "ferret.model.verify",
}
GROUPS = {
    "eval": {name: f"ferret.eval.{name}" for name in ("refexp", "flickr", "lvis", "pope", "ferret_bench", "toy")},
    "serve": {
        "controller": "ferret.serve.controller",
        "worker": "ferret.serve.model_worker",
        "web": "ferret.serve.gradio_web_server",
        "api": "ferret.serve.api",
        "cli": "ferret.serve.cli",
    },
    "data": {"validate": "ferret.data.validate", "toy": "ferret.data.toy", "build": "ferret.data.build",
             "generate-conversations": "ferret.data.build.conversations"},
}


GROUP_HELP = {
    "eval": "evaluate a model on a benchmark: infer writes answers, score computes the metrics",
    "serve": "serve a model: controller + worker(s) + web UI, an OpenAI-compatible API, or a command-line chat",
    "data": "check GRIT-format data, or generate the synthetic toy world",
}


def _usage() -> str:
    return __doc__.split("\n\n")[1]


def _group_usage(command: str) -> str:
    names = GROUPS[command]
    lines = [f"usage: ferret {command} {{{','.join(names)}}} [ARGS]", "", GROUP_HELP.get(command, ""), ""]
    lines += [f"  ferret {command} {name:<14} = python -m {module}" for name, module in names.items()]
    lines += ["", f"`ferret {command} NAME --help` prints the options of one of them."]
    return "\n".join(lines)


def _run(prog: str, module: str, argv: list[str]) -> int:
    """``module.main(argv)`` with ``prog`` as the program name its argparse usage shows."""
    saved = sys.argv[0]
    sys.argv[0] = prog  # argparse's default prog is the base name of argv[0]
    try:
        result = importlib.import_module(module).main(argv)
    finally:
        sys.argv[0] = saved
    return int(result or 0)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print("usage: ferret COMMAND [ARGS]\n" + _usage())
        return 0
    command, rest = args[0], args[1:]
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
