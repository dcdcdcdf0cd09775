"""Reward functions by name: a built-in or an import path ``package.module:function``.

Resolved once at start-up in the trainer (so a typo, a missing module, or a module that fails at
import, SyntaxError and SystemExit included, is one line naming it before any model is built)
and again in the reward worker, which imports the same modules.
"""

from __future__ import annotations

import importlib
from typing import Callable, List

from gspo_megatron.errors import GspoError
from gspo_megatron.rewards.builtin import BUILTIN


def resolve(name: str, where: str = "reward") -> Callable:
    """The function a config name stands for; GspoError (one line) for anything wrong with it."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise GspoError(
            f"{where}='{name}': not a built-in ({', '.join(BUILTIN)}) nor an import "
            f"path 'package.module:function'"
        )
    module, attr = name.split(":", 1)
    try:
        mod = importlib.import_module(module)
    except (Exception, SystemExit) as err:  # whatever the module's own code raised
        if isinstance(err, ModuleNotFoundError) and err.name in _parents(module):
            raise GspoError(f"{where}='{name}': cannot import module '{module}' ({err})") from None
        raise GspoError(
            f"{where}='{name}': importing module '{module}' failed: {describe(err)}"
        ) from None
    try:
        fn = getattr(mod, attr)
    except AttributeError:
        raise GspoError(f"{where}='{name}': module '{module}' has no '{attr}'") from None
    if not callable(fn):
        raise GspoError(f"{where}='{name}': not callable")
    return fn


def _parents(module: str) -> List[str]:
    """'a.b.c' -> ['a', 'a.b', 'a.b.c']: a ModuleNotFoundError for one of these means the path is
    wrong; for any other name, the module was found and one of its own imports failed."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def describe(exc: BaseException, limit: int = 300) -> str:
    """'Type: message' on one line, at most `limit` characters: it goes into one-line logs."""
    try:
        text = " ".join(str(exc).split())
    except Exception:  # a broken __str__ must not hide the exception's type
        text = ""
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
