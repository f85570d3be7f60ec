"""Provenance: what made a picture or an embedding, recorded inside the file itself.

* :func:`file_sha256` hashes files (cached by path, modification time and size, so a 4 GB checkpoint is read once).
* :class:`GenerationRecord` describes one generated picture (prompt, seed, sampler, steps, scale, size, checkpoint
  and embedding hashes) and becomes a PNG text chunk: ``parameters`` (one readable block in the style other tools
  show) plus one key per field.
* :func:`embedding_record` describes a trained embedding (seed, step, config, base-model hash, data hashes); the
  training side stores it as extra keys of the ``.pt`` and, through :func:`record_to_metadata`, as safetensors
  metadata. :func:`metadata_to_record` reads it back.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm.io import atomic_write

SOFTWARE = "textual-inversion"
SHORT_HASH = 10
# Record keys whose safetensors metadata value is JSON (everything else is stored as the plain string).
JSON_RECORD_KEYS = frozenset({"seed", "step", "data_sha256"})

_hash_cache: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes; cached by (absolute path, mtime, size)."""
    p = Path(path).resolve()
    stat = p.stat()
    key = (str(p), stat.st_mtime_ns, stat.st_size)
    if key not in _hash_cache:
        digest = hashlib.sha256()
        with open(p, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _hash_cache[key] = digest.hexdigest()
    return _hash_cache[key]


def short_hash(path: str | os.PathLike | None) -> str | None:
    """The first ten hex digits of :func:`file_sha256` (the length model hashes are shown with elsewhere)."""
    return None if path is None else file_sha256(path)[:SHORT_HASH]


@dataclass(frozen=True)
class GenerationRecord:
    """Everything needed to make one picture again."""

    prompt: str
    seed: int
    sampler: str
    steps: int
    scale: float
    eta: float
    width: int
    height: int
    batch_index: int = 0
    model: str | None = None
    model_hash: str | None = None
    embedding: str | None = None
    embedding_hash: str | None = None
    config: str | None = None
    precision: str = "full"

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    def parameters_text(self) -> str:
        """The prompt, then ``Key: value`` pairs on one line (the layout image viewers of other tools parse)."""
        pairs = [
            ("Steps", self.steps), ("Sampler", self.sampler), ("CFG scale", self.scale), ("Seed", self.seed),
            ("Batch index", self.batch_index), ("Size", self.size), ("Eta", self.eta),
            ("Model hash", self.model_hash), ("Model", self.model and Path(self.model).name),
            ("Embedding hash", self.embedding_hash), ("Embedding", self.embedding and Path(self.embedding).name),
            ("Precision", self.precision),
        ]
        return self.prompt + "\n" + ", ".join(f"{k}: {v}" for k, v in pairs if v is not None)

    def text_chunks(self) -> dict[str, str]:
        """``parameters`` plus one entry per field (``size`` as WxH), all strings, ``None`` fields left out."""
        fields = {k: v for k, v in asdict(self).items() if v is not None and k not in ("width", "height")}
        chunks = {"parameters": self.parameters_text(), "size": self.size, "software": SOFTWARE}
        chunks.update({k: str(v) for k, v in fields.items()})
        return chunks

    def pnginfo(self) -> PngInfo:
        info = PngInfo()
        for key, value in self.text_chunks().items():
            info.add_text(key, value)  # Pillow falls back to an iTXt chunk for text that is not Latin-1
        return info


def save_png(image: Image.Image, path: str | os.PathLike, record: GenerationRecord | None = None) -> Path:
    """Write ``image`` as a PNG carrying ``record``'s text chunks, through :func:`ldm.io.atomic_write`."""
    return atomic_write(path, lambda temp: image.save(temp, format="PNG", pnginfo=record.pnginfo() if record else None))


def read_png_text(path: str | os.PathLike) -> dict[str, str]:
    """The text chunks of a PNG (what :func:`save_png` wrote)."""
    with Image.open(path) as image:
        image.load()
        return {str(k): str(v) for k, v in getattr(image, "text", {}).items()}


def _config_text(config: Any) -> str | None:
    if config is None:
        return None
    if isinstance(config, (str, os.PathLike)) and Path(config).is_file():
        return Path(config).read_text(encoding="utf-8")
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(config) if isinstance(config, Mapping) else config)


def embedding_record(
    *,
    seed: int | None,
    step: int,
    config: Any = None,
    base_model: str | os.PathLike | None = None,
    data_files: Iterable[str | os.PathLike] = (),
) -> dict[str, Any]:
    """The training record stored in every embedding file: plain values only (safe loaders read them back).

    ``config`` is a config mapping/OmegaConf object (stored as YAML) or a path to a YAML file; ``base_model`` the
    checkpoint the embedding was trained on (its sha256 is stored); ``data_files`` the training images
    (``{file name: sha256}``).
    """
    record: dict[str, Any] = {
        "seed": None if seed is None else int(seed),
        "step": int(step),
        "config": _config_text(config),
        "base_model": None if base_model is None else Path(base_model).name,
        "base_model_sha256": None if base_model is None else file_sha256(base_model),
        "data_sha256": {Path(f).name: file_sha256(f) for f in sorted(data_files, key=str)},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "software": SOFTWARE,
    }
    return record


def record_to_metadata(record: Mapping[str, Any]) -> dict[str, str]:
    """safetensors metadata (``str -> str``) for a record: JSON for :data:`JSON_RECORD_KEYS`, ``None`` left out."""
    out: dict[str, str] = {}
    for key, value in record.items():
        if value is None:
            continue
        out[key] = json.dumps(value, sort_keys=True, default=str) if key in JSON_RECORD_KEYS or not isinstance(value, str) else value
    return out


def metadata_to_record(metadata: Mapping[str, str]) -> dict[str, Any]:
    """Inverse of :func:`record_to_metadata` (values that are not valid JSON stay strings)."""
    record: dict[str, Any] = {}
    for key, value in metadata.items():
        if key in JSON_RECORD_KEYS:
            try:
                record[key] = json.loads(value)
                continue
            except (TypeError, ValueError):
                pass
        record[key] = value
    return record
