"""The `ferret` command: every subcommand answers --help under its own name, groups list their commands, and the
help of the demo, the chat CLI and the web UI imports no heavy library (so it takes a second, not twenty)."""

import contextlib
import io
import subprocess
import sys

import pytest
from serve_helpers import REPO, python_env

from ferret.cli import COMMANDS, GROUPS, main

HEAVY = ("torch", "transformers", "gradio", "fastapi", "deepspeed", "matplotlib")


def help_of(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
    return code, out.getvalue(), err.getvalue()


def test_groups_list_their_commands_and_exit_0():
    for group, commands in GROUPS.items():
        code, out, _ = help_of([group, "--help"])
        assert code == 0 and out.startswith(f"usage: ferret {group} {{")
        for name, module in commands.items():
            assert f"ferret {group} {name}" in out and module in out
    code, _, err = help_of(["serve", "nonsense"])
    assert code == 2 and "unknown serve command 'nonsense'" in err
    code, out, _ = help_of(["--help"])
    assert code == 0 and "ferret serve controller|worker|web|api|cli" in out


@pytest.mark.slow
def test_every_subcommand_has_its_own_usage():
    every = [[name] for name in COMMANDS] + [[group, name] for group, names in GROUPS.items() for name in names]
    for argv in every:
        code, out, err = help_of([*argv, "--help"])
        usage = out.strip().splitlines()[0] if out.strip() else err
        assert code == 0, (argv, err[-500:])
        # its own name: "usage: ferret serve api ..." (or a module's own "python -m ..." name), never the bare
        # "usage: ferret [-h]" or the file name of the module
        own = f"usage: ferret {' '.join(argv)} " in usage or usage.startswith("usage: python -m ferret.")
        assert own, (argv, usage)


@pytest.mark.parametrize("argv", [["demo"], ["serve", "cli"], ["serve", "web"]])
def test_help_imports_no_heavy_library(argv):
    probe = ("import sys, contextlib, io\nfrom ferret.cli import main\n"
             "with contextlib.redirect_stdout(io.StringIO()):\n"
             f"    try:\n        main({[*argv, '--help']!r})\n    except SystemExit:\n        pass\n"
             f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=python_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout
