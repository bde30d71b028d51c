"""Small modules with one role each: no module of ``storage/`` or ``aggregator/`` over 600 lines,
no function of the four packages over 80 lines (a function that long does several things), the
CLI's argparse option tables (``register``) aside."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULE_LINES = {"storage": 600, "aggregator": 600}
FUNCTION_LINES = {"storage": 80, "extractor": 80, "aggregator": 80, "api": 80}
OPTION_TABLES = {"register"}  # api/cli/*_cmd.py: one add_argument after another


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(MODULE_LINES))
def test_modules_are_short(package: str) -> None:
    limit = MODULE_LINES[package]
    long = {
        str(p.relative_to(ROOT)): n
        for p in _files(package)
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > limit
    }
    assert not long, f"modules over {limit} lines: {long}"


@pytest.mark.parametrize("package", sorted(FUNCTION_LINES))
def test_functions_are_short(package: str) -> None:
    limit = FUNCTION_LINES[package]
    long = {}
    for path in _files(package):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > limit and node.name not in OPTION_TABLES:
                    long[f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"] = n
    assert not long, f"functions over {limit} lines: {long}"
