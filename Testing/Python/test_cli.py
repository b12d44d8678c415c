"""The shape of the `med3dfm` command line: one module per subcommand (Med3DFMLib/commands), the shared
options defined once, and no module that imports the top-level `cli` back (what each subcommand does is
tested in test_segment_cli.py, test_fewshot.py, test_classify.py, test_explain.py, test_pretrain.py)."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

from Med3DFMLib.cli import SUBCOMMANDS, build_parser, main
from Med3DFMLib.commands import options

LIBRARY = Path(__file__).resolve().parents[2] / "Med3DFMLib"


def _subcommands(parser: argparse.ArgumentParser) -> dict:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_each_subcommand_module_adds_the_parser_it_runs():
    parsers = _subcommands(build_parser())
    assert list(parsers) == ["segment", "adapt", "pretrain", "classify", "explain", "devices", "models"]  # the order of `med3dfm --help`
    for subcommand in SUBCOMMANDS:
        own = argparse.ArgumentParser(prog="med3dfm").add_subparsers()
        parser = subcommand.add_parser(own)
        assert parser.prog == f"med3dfm {subcommand.NAME}" and callable(subcommand.run)
        assert parsers[subcommand.NAME].format_help() == parser.format_help()


def test_shared_options_read_the_same_in_every_job_subcommand():
    parsers = _subcommands(build_parser())
    for name in ("segment", "adapt", "pretrain", "classify", "explain"):
        args = parsers[name]._option_string_actions
        assert {"--progress", "--registry", "--debug"} <= set(args), name
        assert args["--progress"].choices == ["json", "tqdm", "none"]
    for name in ("segment", "adapt", "classify", "explain"):
        device = parsers[name]._option_string_actions["--device"]
        assert (list(device.choices), device.default) == (list(options.DEVICES), "auto")
    # --debug before the subcommand is not reset by the subcommand's own --debug
    assert build_parser().parse_args(["--debug", "explain", "x.nrrd", "--model", "m", "--target", "t", "-o", "h.nrrd"]).debug is True


def test_no_module_imports_the_command_line_back():
    """The top-level `cli` puts the subcommands together; nothing below it imports it (no import circle)."""
    for path in LIBRARY.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert "Med3DFMLib.cli" not in imported, path
        if path.parent.name == "commands":  # a subcommand uses the shared options, never another subcommand
            assert {m for m in imported if m and m.startswith("Med3DFMLib.commands")} <= {"Med3DFMLib.commands.options"}, path


def test_no_command_prints_the_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
    with pytest.raises(SystemExit) as version:
        main(["--version"])
    assert version.value.code == 0
