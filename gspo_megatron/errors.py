"""The one exception type users see for bad input.

Every check that rejects a file, a config key, a layout or a data row raises ``GspoError`` with a
single line that names the offending thing and what would be valid. CLIs print that line and
exit with status 2 instead of a traceback.
"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn, TypeVar

T = TypeVar("T")


class GspoError(Exception):
    """Bad input, described in one line."""


def exit_on_error(main: Callable[..., T]) -> Callable[..., T]:
    """Decorator for CLI entry points: a GspoError becomes one line on stderr and exit code 2."""

    def wrapped(*args, **kwargs) -> T:
        try:
            return main(*args, **kwargs)
        except GspoError as err:
            _die(str(err))

    wrapped.__name__ = main.__name__
    wrapped.__doc__ = main.__doc__
    return wrapped


def _die(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)
