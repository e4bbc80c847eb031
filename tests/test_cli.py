"""The `ferret` command: every subcommand answers --help fast, under its own name, without importing heavy libraries;
the old names and module paths still run; the one table of the original's flag spellings, and its aliases."""

import argparse
import contextlib
import io
import json
import subprocess
import sys
import time

import pytest
from serve_helpers import REPO, python_env

from ferret.cli import ALIASES, COMMANDS, GROUPS, main
from ferret.flags import (
    NO_OP_FLAGS,
    ORIGINAL_SPELLINGS,
    add_refused_flags,
    add_region_feature_argument,
    spelling_table,
    translate_training_argv,
)

HEAVY = ("torch", "transformers", "gradio", "fastapi", "deepspeed", "matplotlib", "pycocotools")
HELP_SECONDS = 3.0
EVERY = [[name] for name in COMMANDS] + [[group, name] for group, names in GROUPS.items() for name in names]


def help_of(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
    return code, out.getvalue(), err.getvalue()


def run_python(*args, timeout=60):
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=python_env(), capture_output=True, text=True,
                          timeout=timeout)
    return done, time.perf_counter() - start


def test_groups_list_their_commands_and_exit_0():
    for group, commands in GROUPS.items():
        code, out, _ = help_of([group, "--help"])
        assert code == 0 and out.startswith(f"usage: ferret {group} {{")
        for name in commands:
            assert f"ferret {group} {name}" in out
    code, _, err = help_of(["serve", "nonsense"])
    assert code == 2 and "unknown serve command 'nonsense'" in err
    code, out, _ = help_of(["--help"])
    assert code == 0 and "ferret serve controller|worker|web|api|cli" in out
    assert "ferret weights apply-delta|make-delta|consolidate|extract|verify|merge-lora" in out
    assert set(GROUPS["weights"]) == {"apply-delta", "make-delta", "consolidate", "extract", "verify", "merge-lora"}


# What a subprocess reports: exit status, first line of its output, heavy modules it imported.
PROBE = """\
import contextlib, io, json, sys
from ferret.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        code = main({argv!r})
    except SystemExit as stop:
        code = stop.code
print(json.dumps([code, out.getvalue().strip().splitlines()[:1], sorted(m for m in {heavy!r} if m in sys.modules)]))
"""


@pytest.mark.parametrize("argv", EVERY, ids=[" ".join(a) for a in EVERY])
def test_every_subcommand_help_is_fast_and_its_own(argv):
    """`ferret ... --help` in a fresh interpreter: exit 0 within 3 s, `usage: ferret <the subcommand> ...`, and no
    torch/transformers/... imported (they take seconds)."""
    done, seconds = run_python("-c", PROBE.format(argv=[*argv, "--help"], heavy=HEAVY))
    assert done.returncode == 0, done.stderr[-2000:]
    code, first_line, heavy = json.loads(done.stdout.strip().splitlines()[-1])
    assert code == 0, (argv, done.stderr[-500:])
    assert first_line and first_line[0].startswith(f"usage: ferret {' '.join(argv)} "), (argv, first_line)
    assert heavy == [], (argv, heavy)
    assert seconds <= HELP_SECONDS, f"ferret {' '.join(argv)} --help took {seconds:.1f} s"


def test_console_script_help_is_fast():
    done, seconds = run_python("-m", "ferret.cli", "train", "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: ferret train ")
    assert "--model_name_or_path" in done.stdout and "--region-feature" in done.stdout
    assert "--help-all" in done.stdout  # where transformers' own training flags are listed
    assert seconds <= HELP_SECONDS, seconds


def test_old_top_level_names_are_the_weights_commands():
    assert set(ALIASES) == set(GROUPS["weights"])
    for name in ALIASES:
        code, out, _ = help_of([name, "--help"])
        assert code == 0 and out.startswith(f"usage: ferret weights {name} "), (name, out[:200])


@pytest.mark.parametrize("module", ["ferret.model.apply_delta", "ferret.model.make_delta", "ferret.model.consolidate",
                                    "ferret.model.extract", "ferret.model.verify", "ferret.train.merge_lora",
                                    "ferret.weights.apply_delta", "ferret.weights.verify"])
def test_weight_tools_run_under_old_and_new_module_paths(module):
    done, seconds = run_python("-m", module, "--help")
    assert done.returncode == 0, done.stderr[-1000:]
    assert done.stdout.startswith(f"usage: python -m {module} "), done.stdout[:200]
    if module.startswith(("ferret.model.", "ferret.train.")):  # the old paths parse before importing the tool
        assert seconds <= HELP_SECONDS, seconds


def test_old_module_path_is_the_same_module():
    from ferret.model import apply_delta as old
    from ferret.weights import apply_delta as new

    assert old is new and old.plan_delta is new.plan_delta


def test_original_apply_delta_flags_and_prefixes_still_parse(tmp_path):
    """The original README's line (`--base ... --target ... --delta ...`, argparse prefixes) reaches the tool: a
    missing base folder is reported as an error (exit 1), not as an unknown flag (exit 2)."""
    done, _ = run_python("-m", "ferret.model.apply_delta", "--base", str(tmp_path / "nope"), "--target",
                         str(tmp_path / "out"), "--delta", str(tmp_path / "delta"), timeout=120)
    assert done.returncode == 1, done.stderr[-1000:]
    assert "nope" in done.stderr and not (tmp_path / "out").exists()


def test_bad_shard_size_is_a_clear_error(tmp_path):
    code, _, _ = help_of(["weights", "consolidate", "--src", str(tmp_path), "--dst", str(tmp_path / "o"),
                          "--max-shard-size", "lots"])
    assert code == 1 and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ the flag table
def test_help_flags_prints_the_table_and_the_readme_shows_it():
    code, out, _ = help_of(["help", "flags"])
    assert code == 0 and spelling_table() in out
    assert spelling_table() in (REPO / "README.md").read_text(), "README's CLI section must show ferret.flags' table"
    table = spelling_table().splitlines()
    assert len(table) == 2 + len(ORIGINAL_SPELLINGS)
    assert all(line.count(" | ") == 3 for line in table[2:])  # four columns: no stray "|" inside a cell


def region_parser(default=True):
    parser = argparse.ArgumentParser(prog="t", exit_on_error=False)
    add_region_feature_argument(parser, default)
    return parser


@pytest.mark.parametrize("words, expected", [
    ([], True), (["--region-feature"], True), (["--no-region-feature"], False),
    (["--add_region_feature"], True), (["--add-region-feature"], True), (["--no_region_feature"], False),
    (["--add_region_feature", "False"], False), (["--add_region_feature", "True"], True),
    (["--region-feature", "no"], False), (["--region-feature=false"], False),
])
def test_region_feature_spellings(words, expected):
    assert region_parser().parse_args(words).region_feature is expected


def test_region_feature_default_none_and_conflict():
    assert region_parser(None).parse_args([]).region_feature is None
    with pytest.raises(argparse.ArgumentError, match="not allowed with"):
        region_parser(None).parse_args(["--region-feature", "--no-region-feature"])
    with pytest.raises(argparse.ArgumentError, match="expected True or False, got 'maybe'"):
        region_parser().parse_args(["--region-feature", "maybe"])


def test_training_spellings_become_the_dataclass_flag():
    assert translate_training_argv(["--no-region-feature", "--x", "1"]) == ["--add_region_feature", "False", "--x",
                                                                           "1"]
    assert translate_training_argv(["--region-feature"]) == ["--add_region_feature", "True"]
    assert translate_training_argv(["--region-feature", "--bf16", "True"]) == ["--add_region_feature", "True",
                                                                               "--bf16", "True"]
    assert translate_training_argv(["--region-feature", "false"]) == ["--add_region_feature", "False"]
    assert translate_training_argv(["--region-feature=0"]) == ["--add_region_feature", "False"]
    assert translate_training_argv(["--add_region_feature", "True"]) == ["--add_region_feature", "True"]
    with pytest.raises(ValueError, match="takes no value"):
        translate_training_argv(["--no-region-feature=1"])


def test_refused_flags_say_why():
    parser = argparse.ArgumentParser(prog="t")
    parser.add_argument("--port", type=int, default=1)
    add_refused_flags(parser, "--moderate", "--num-gpus", takes_value=("--num-gpus",))
    assert parser.parse_args(["--port", "2"]).port == 2
    for words, reason in ((["--moderate"], NO_OP_FLAGS["--moderate"]), (["--num-gpus", "2"], "--device")):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as stop:
            parser.parse_args(words)
        assert stop.value.code == 2 and f"{words[0]} is not supported" in err.getvalue() and reason in err.getvalue()
    assert "--moderate" not in parser.format_help()


def test_validate_checks_dataset_type_after_parsing(tmp_path):
    code, _, err = help_of(["data", "validate", str(tmp_path / "a.json"), "--dataset-type", "nonsense"])
    assert code == 2 and "unknown 'nonsense'" in err and "vg_object" in err
