"""docs/faults.md names, for every bad input and fault, the test that produces its message:
every test it names must exist, so the table cannot outlive the behaviour it documents."""

from __future__ import annotations

import ast
import re

from conftest import REPO


def test_every_test_named_in_the_faults_table_exists():
    text = (REPO / "docs" / "faults.md").read_text()
    named = re.findall(r"\|\s*(test_\w+\.py)::(test_\w+)\s*\|", text)
    assert len(named) > 40
    missing = []
    for module, name in named:
        path = REPO / "tests" / module
        defined = set()
        if path.is_file():
            defined = {
                n.name
                for n in ast.walk(ast.parse(path.read_text()))
                if isinstance(n, ast.FunctionDef)
            }
        if name not in defined:
            missing.append(f"{module}::{name}")
    assert not missing, missing
