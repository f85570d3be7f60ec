"""The project's one way to write a file: atomically, with one temporary-name scheme and one permission rule.

Every file the project writes (embeddings, checkpoints, images, converted tokenizer vocabularies) goes through
:func:`atomic_write`: the content is written to a hidden temporary file in the target's folder (``.<name>.<random>.tmp``,
so the final rename never crosses file systems), then ``os.replace``-d into place, so a reader or a crash never
sees half a file. The temporary file is removed when writing fails. Whatever the writer (``torch.save``, safetensors,
PIL), the file ends up with the mode a plain ``open(path, "w")`` would give: ``0o666`` less the process umask
(0644 under the usual umask 022); ``tempfile.mkstemp`` alone would leave 0600.

This module imports nothing of the project, so every room may use it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def current_umask() -> int:
    """The process umask, read without changing it where the platform allows (``/proc``), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The permission bits of every written file: what ``open(path, "w")`` creates under the current umask."""
    return 0o666 & ~current_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write ``path`` through ``write(temporary_path)``, then rename it into place; returns ``Path(path)``.

    The parent folder is created. ``write`` receives the path of an existing empty file next to the target and may
    overwrite it by name (``torch.save``, ``safetensors.torch.save_file``, ``PIL.Image.save`` all do).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    temp = Path(temp_name)
    try:
        write(temp)
        os.chmod(temp, file_mode())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text file."""
    return atomic_write(path, lambda temp: temp.write_text(text, encoding="utf-8"))
