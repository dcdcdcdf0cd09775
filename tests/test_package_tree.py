"""The package's structure as docs/design.md states it, checked on the sources: no module outside
``gspo_megatron/models/`` imports a model family's package, no family imports another's (each
reaches the shared layers through ``models/layers/`` and the rest through the face), and the
folders of ``gspo_megatron/`` import each other without a cycle (imports under TYPE_CHECKING,
which never run, aside)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

from gspo_megatron.models import FAMILIES

FAMILY_PACKAGES = {f.package for f in FAMILIES}


def _imports(path: Path, typing_only: bool = True) -> set:
    """Every module a source file imports, at module level or in a function (absolute names);
    ``typing_only=False`` leaves out those under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    skip = set()
    if not typing_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip.update(id(n) for n in ast.walk(node))
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
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


def _folder(module: str):
    """The folder of gspo_megatron/ a module lives in (None: a top-level module, or outside)."""
    parts = module.split(".")
    if parts[0] != "gspo_megatron" or len(parts) < 2:
        return None
    return parts[1] if (REPO / "gspo_megatron" / parts[1]).is_dir() else None


def test_folders_import_each_other_without_a_cycle():
    package = REPO / "gspo_megatron"
    edges = {}
    for path in package.rglob("*.py"):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        here = _folder(module)
        if here is None:
            continue
        for imported in _imports(path, typing_only=False):
            there = _folder(imported)
            if there not in (None, here):
                edges.setdefault(here, {}).setdefault(there, f"{module} imports {imported}")
    reached = set(edges) | {b for targets in edges.values() for b in targets}
    assert {"learner", "distributed", "config", "rollout", "models", "loss"} <= reached

    def path_back(start, goal, seen):
        for nxt in edges.get(start, {}):
            if nxt == goal:
                return [nxt]
            if nxt not in seen:
                rest = path_back(nxt, goal, seen | {nxt})
                if rest:
                    return [nxt] + rest
        return None

    cycles = []
    for a, targets in edges.items():
        for b, why in targets.items():
            back = path_back(b, a, {b})
            if back:
                cycles.append(f"{a} -> {' -> '.join([b] + back)} ({why})")
    assert cycles == []


def test_every_moved_command_is_in_the_readme():
    """Each moved module that runs as ``python -m`` is in the README's table of moved paths,
    with the path it has now, and that module exists."""
    from gspo_megatron.moved import MOVED

    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("### Module paths that moved") :]
    for old, new in MOVED.items():
        module = REPO / Path(*new.split("."))
        source = module.with_suffix(".py") if module.with_suffix(".py").is_file() else None
        assert source or (module / "__init__.py").is_file(), new
        if source and '__name__ == "__main__"' in source.read_text():
            assert f"| `python -m {old}` | `python -m {new}` |" in table, old
