"""Kept for API compatibility: the user-facing errors moved to :mod:`ldm.errors` (every room may import that one).

``USER_ERRORS`` is what :func:`run_cli` catches: every subclass of :class:`~ldm.errors.UserError`.
"""
from __future__ import annotations

from ldm.errors import ConfigError, UserError, run_cli

USER_ERRORS: tuple[type[BaseException], ...] = (UserError,)

__all__ = ["ConfigError", "USER_ERRORS", "UserError", "run_cli"]
