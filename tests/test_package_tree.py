"""The package's structure as docs/design.md states it, checked on the sources: no module outside
``gspo_megatron/models/`` imports a model family's package, and no family imports another's
(each reaches the shared layers through ``models/layers/`` and the rest through the face)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

from gspo_megatron.models import FAMILIES

FAMILY_PACKAGES = {f.package for f in FAMILIES}


def _imports(path: Path) -> set:
    """Every module a source file imports (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _sources():
    for root in ("gspo_megatron", "checkpoints_convert", "tools", "tests"):
        yield from (REPO / root).rglob("*.py")


def _family_of(module: str):
    return next((p for p in FAMILY_PACKAGES if module == p or module.startswith(p + ".")), None)


def test_no_module_outside_models_imports_a_family_package():
    models = REPO / "gspo_megatron" / "models"
    offenders = []
    for path in _sources():
        if models in path.parents:
            continue
        hits = sorted(m for m in _imports(path) if _family_of(m))
        if hits:
            offenders.append(f"{path.relative_to(REPO)}: {hits[0]}")
    assert offenders == []


def test_no_family_imports_another():
    offenders = []
    for family in FAMILY_PACKAGES:
        folder = REPO / Path(*family.split("."))
        assert folder.is_dir(), family
        for path in folder.rglob("*.py"):
            others = sorted(m for m in _imports(path) if _family_of(m) not in (None, family))
            if others:
                offenders.append(f"{path.relative_to(REPO)}: {others[0]}")
    assert offenders == []
