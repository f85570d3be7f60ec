"""The bottom of the house: what "bad input" means, and how every command reports it.

Any exception that subclasses :class:`UserError` is a mistake the user can fix (a missing file, a wrong flag, an
unreadable image); :func:`run_cli` turns it into one line on stderr and exit status 2, without a traceback. A new
error only has to subclass :class:`UserError`: no list elsewhere needs to learn about it. This module imports
nothing from the package, so every room (models, data, training, generation, scripts) can depend on it.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

EXIT_USER_ERROR = 2  # argparse's status for bad usage: the same for every kind of bad input


class UserError(Exception):
    """Bad input the user can fix; ``str()`` is the message (folded into one line when reported)."""


class ConfigError(UserError, ValueError):
    """A config file or command-line option that cannot be used."""


def one_line(err: BaseException) -> str:
    """The error's message with every run of whitespace (newlines included) folded into one space."""
    return " ".join(str(err).split())


def run_cli(main_fn: Callable[[], Any]) -> None:
    """Run a command's ``main``; a :class:`UserError` ends it with ``error: <one line>`` on stderr and exit status 2.

    Anything else (a bug) keeps its traceback, so it can be reported.
    """
    try:
        main_fn()
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
