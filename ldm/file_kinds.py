"""What a file given as weights or an embedding really is, when it is not one: a few bytes of its head tell.

PyTorch's safe unpickler fails on foreign bytes with whatever the bytes happen to trip (``IndexError: pop from empty
list`` for a text file, ``KeyError: 101``, ...), which says nothing to a user who passed the wrong file. The readers
(:mod:`ldm.checkpoint`, :mod:`ldm.modules.embedding_formats`) ask :func:`foreign_kind` first, and name the file's
kind in their one-line error instead: "a text file", "a PNG image", "a Git LFS pointer", "a zip archive that is not a
PyTorch file", ... A file that looks like PyTorch's or safetensors' own format passes (``None``): whether its content
fits is for the reader to say.

This module imports nothing of the project, so every room may use it.
"""
from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

_HEAD_BYTES = 4096
_LOCAL_HEADER_NAME_END = 30 + 256  # a zip entry's name follows its 30-byte local header
_PICKLE_PROTO = b"\x80"  # pickle protocol 2 and later; torch.save's legacy format writes protocol 2
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"\x1f\x8b", "a gzip archive (unpack it first)"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive (unpack it first)"),
    (b"%PDF", "a PDF document"),
    (b"\x93NUMPY", "a NumPy .npy array file"),
)


def foreign_kind(path: str | os.PathLike) -> str | None:
    """A short phrase naming what ``path`` is when it cannot be a PyTorch or safetensors file, else ``None``."""
    p = Path(path)
    with open(p, "rb") as handle:
        head = handle.read(_HEAD_BYTES)
    if not head:
        return "an empty file (0 bytes; an interrupted download or copy?)"
    if head.startswith(b"PK"):
        return _zip_kind(p, head)
    if head.startswith(_PICKLE_PROTO) or _is_safetensors_head(head):
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    text = _as_text(head)
    if text is None:
        return "neither a PyTorch nor a safetensors file (unknown binary content)"
    return _text_kind(text)


def _zip_kind(p: Path, head: bytes) -> str | None:
    """PyTorch's zip format (one top folder holding ``data.pkl``, written first) passes; other zips are named, and so
    is a PyTorch file cut short (its table of contents, at the end, is missing)."""
    try:
        with zipfile.ZipFile(p) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        if b"data.pkl" in head[:_LOCAL_HEADER_NAME_END]:
            return "a truncated PyTorch file (cut short; download or copy it again)"
        return "a damaged or truncated zip archive"
    if any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
        return None
    return "a zip archive that is not a PyTorch file (unpack it first)"


def _is_safetensors_head(head: bytes) -> bool:
    """safetensors: a little-endian u64 header length, then the JSON header's ``{``."""
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < length < 1 << 32


def _as_text(head: bytes) -> str | None:
    """``head`` as text when it is UTF-8 without control bytes (a cut multi-byte character at the end is allowed)."""
    if b"\x00" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:
            return None
        text = head[: err.start].decode("utf-8")
    controls = sum(1 for c in text if ord(c) < 32 and c not in "\t\n\r\f")
    return text if controls == 0 else None


def _text_kind(text: str) -> str:
    """Which text file: a Git LFS pointer, a web page, or plain text (quoting its first line)."""
    stripped = text.lstrip()
    if stripped.startswith("version https://git-lfs"):
        return "a Git LFS pointer (a text stub, not the file itself; fetch it with git lfs pull)"
    if stripped[:15].lower().startswith(("<!doctype html", "<html")):
        return "an HTML page (a download that returned a web page?)"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    shown = first if len(first) <= 40 else first[:40] + "..."
    return f"a text file (first line: {shown!r})" if shown else "a text file (only blank lines)"
