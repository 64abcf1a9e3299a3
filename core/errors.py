"""One clear line and a non-zero exit for mistakes a user can fix, instead of a traceback."""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """A problem with the user's input or machine (unknown model, prompt too long, no GPU, ...)."""


def cli(main: F) -> F:
    """Wrap a script's `main` so a UserError prints `error: ...` on stderr and exits with status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
