"""The `ferret` command: one entry point whose subcommands are the modules' own command lines.

    ferret demo                                  train + evaluate the toy world on CPU (what `make demo` runs)
    ferret train ARGS                            = python -m ferret.train.train
    ferret eval BENCHMARK infer|score ARGS       BENCHMARK: refexp flickr lvis pope ferret_bench toy
    ferret serve controller|worker|web|api|cli   = python -m ferret.serve.{controller,model_worker,...}
    ferret data validate|toy ARGS                GRIT validator, synthetic toy world
    ferret apply-delta|make-delta|consolidate|extract|verify ARGS   weight tools
    ferret merge-lora ARGS                       merge a LoRA adapter into its base

Each subcommand forwards the rest of the command line to the module's `main(argv)`, so
`ferret SUBCOMMAND --help` prints that module's own help.
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


def _usage() -> str:
    return __doc__.split("\n\n")[1]


def _run(module: str, argv: list[str]) -> int:
    result = importlib.import_module(module).main(argv)
    return int(result or 0)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print("usage: ferret COMMAND [ARGS]\n" + _usage())
        return 0
    command, rest = args[0], args[1:]
    if command in COMMANDS:
        return _run(COMMANDS[command], rest)
    if command in GROUPS:
        group = GROUPS[command]
        if not rest or rest[0] not in group:
            print(f"usage: ferret {command} {{{','.join(group)}}} [ARGS]", file=sys.stderr)
            return 2
        return _run(group[rest[0]], rest[1:])
    print(f"ferret: unknown command {command!r}\nusage: ferret COMMAND [ARGS]\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
