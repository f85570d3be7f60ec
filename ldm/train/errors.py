"""User-facing errors: the exceptions that mean "bad input", and how a command reports them (one line, exit 2)."""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from ldm.checkpoint import CheckpointError
from ldm.data.images import DataRootError, ImageLoadError
from ldm.data.personalized import TemplateError
from ldm.models.diffusion.fast_step import CompileSettingError
from ldm.models.diffusion.training import NonFiniteLossError
from ldm.modules.embedding_manager import EmbeddingFileError, PlaceholderError

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config file or command-line option that cannot be used; ``str()`` is a one-line message."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    CheckpointError,
    CompileSettingError,
    ConfigError,
    DataRootError,
    ImageLoadError,
    EmbeddingFileError,
    PlaceholderError,
    NonFiniteLossError,
    TemplateError,
)


def run_cli(main: Callable[[], Any]) -> None:
    """Run a command's ``main``; bad input ends it with ``error: <one line>`` on stderr and exit status 2."""
    try:
        main()
    except USER_ERRORS as err:
        message = " ".join(str(err).split())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
