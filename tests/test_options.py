"""One options declaration: the CLI flags, the API keywords and the messages all come from `options.OPTIONS`."""

from __future__ import annotations

import argparse
import inspect
import re

import pytest
from helpers.builders import build_cnn
from helpers.files import save

from onnx_lowrank import api
from onnx_lowrank.cli.main import _parser, main
from onnx_lowrank.errors import InvalidOptionError
from onnx_lowrank.options import OPTIONS
from onnx_lowrank.sweep import sweep

API_FUNCTIONS = (api.analyze, api.plan, api.apply, api.compress, sweep)
POSITIONALS = {"input", "output", "command", "run", "help", "version"}


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("function", API_FUNCTIONS, ids=lambda f: f.__name__)
def test_api_defaults_are_the_declared_ones(function):
    for name, parameter in inspect.signature(function).parameters.items():
        if name in OPTIONS and parameter.default is not inspect.Parameter.empty:
            assert parameter.default == OPTIONS[name].default, name


def test_every_flag_is_declared_and_every_declaration_is_a_flag():
    used = set()
    for command, parser in _subcommands().items():
        for action in parser._actions:
            if action.dest in POSITIONALS:
                continue
            assert action.dest in OPTIONS, f"{command} {action.option_strings} is not declared in options.OPTIONS"
            used.add(action.dest)
            if action.default not in ([], None) or OPTIONS[action.dest].default is not None:
                assert action.default == OPTIONS[action.dest].default or action.default == [], action.dest
    assert used == set(OPTIONS)


def test_every_api_keyword_a_user_sets_is_declared():
    internal = {"model", "analysis", "progress", "latency_cache", "evaluate", "min_score", "latency_repeats", "timer"}
    for function in API_FUNCTIONS:
        for name in inspect.signature(function).parameters:
            assert name in OPTIONS or name in internal, f"{function.__name__}({name}=...) is not declared"


@pytest.mark.parametrize(
    "flags, flag_message, keywords, keyword_message",
    [
        (["--budget", "1.5"], "--budget must be a fraction in (0, 1]. Got 1.5 instead.",
         {"budget": 1.5}, "The 'budget' parameter of compress must be a fraction in (0, 1]. Got 1.5 instead."),
        (["--budget", "0.5", "--max-groups", "0"], "--max-groups must be a whole number >= 1. Got 0 instead.",
         {"budget": 0.5, "max_groups": 0}, "The 'max_groups' parameter of compress must be a whole number >= 1."),
        (["--budget", "0.5", "--shrinkage", "-1"], "--shrinkage must be a finite number >= 0. Got -1.0 instead.",
         {"budget": 0.5, "shrinkage": -1.0}, "The 'shrinkage' parameter of compress must be a finite number >= 0."),
        (["--budget", "0.5", "--exclude", "("], "--exclude must be a valid regular expression. Got '(' instead.",
         {"budget": 0.5, "exclude": "("}, "The 'exclude' parameter of compress must be a valid regular expression."),
        (["--target-error", "-0.1"], "--target-error must be a number >= 0. Got -0.1 instead.",
         {"target_error": -0.1}, "The 'target_error' parameter of compress must be a number >= 0."),
        (["--budget", "0.5", "--threads", "0"], "--threads must be a whole number >= 1. Got 0 instead.",
         {"budget": 0.5, "threads": 0}, "The 'threads' parameter of compress must be a whole number >= 1."),
        (["--budget", "0.5", "--rank-multiple", "0"], "--rank-multiple must be a whole number >= 1.",
         {"budget": 0.5, "rank_multiple": 0}, "The 'rank_multiple' parameter of compress must be a whole number"),
        (["--budget", "0.5", "--calibration", "x", "--weight-only"],
         "--calibration and --weight-only contradict each other", {"budget": 0.5, "calibration": "x",
                                                                    "weight_only": True},
         "calibration and weight_only contradict each other"),
    ],
)
def test_one_message_on_the_command_line_and_in_python(tmp_path, capsys, flags, flag_message, keywords,
                                                      keyword_message):
    path = save(build_cnn(), tmp_path / "m.onnx")
    out = tmp_path / "c.onnx"
    assert main(["compress", str(path), str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert flag_message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    with pytest.raises(InvalidOptionError, match=re.escape(keyword_message)):
        api.compress(path, **keywords)


def test_sweep_options_come_from_the_declarations(tmp_path, capsys):
    path = save(build_cnn(), tmp_path / "m.onnx")
    assert main(["sweep", str(path), "--budgets", "0.9,1.5"]) == 2
    assert "--budgets must be fractions in (0, 1] separated by commas" in capsys.readouterr().err
    assert main(["sweep", str(path), "--budgets", "abc"]) == 2
    assert "Got 'abc' instead." in capsys.readouterr().err
    assert main(["sweep", str(path), "--allocator", "alds,best"]) == 2
    assert "--allocator must be names from auto, alds, uniform, energy" in capsys.readouterr().err
    with pytest.raises(InvalidOptionError, match="The 'allocators' parameter of sweep"):
        sweep(path, [0.5], allocators=["best"])


def test_report_in_a_missing_folder_is_refused_before_any_work(tmp_path, capsys):
    path = save(build_cnn(), tmp_path / "m.onnx")
    assert main(["analyze", str(path), "--report", str(tmp_path / "nowhere" / "r.json")]) == 2
    assert "--report must be a file name in an existing folder" in capsys.readouterr().err


def test_the_readme_documents_every_flag_and_only_declared_ones():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("| option | meaning |"):]
    table = table[:table.index("\n\n")]
    documented = set(re.findall(r"`(--?[a-z][a-z-]*)", table))
    declared = {option.cli_flag for option in OPTIONS.values()}
    declared |= {flag for option in OPTIONS.values() for flag, _ in option.more_flags}
    declared |= {option.short for option in OPTIONS.values() if option.short}
    assert documented <= declared, documented - declared
    assert declared <= documented, f"undocumented in the README's option table: {sorted(declared - documented)}"
