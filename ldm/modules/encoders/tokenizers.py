"""Finding and loading the text tokenizers (BERT for LDM-1.4B, CLIP for Stable Diffusion) without needing a network.

The original code called ``from_pretrained("bert-base-uncased")`` / ``from_pretrained("openai/clip-vit-large-patch14")``
and so needed the Hugging Face hub. Here a tokenizer comes from the first source that works:

1. ``tokenizer_path`` (a folder in Hugging Face format; for BERT also a ``vocab.txt`` file, for CLIP also OpenAI's
   ``bpe_simple_vocab_16e6.txt.gz``). An explicit path that cannot be used is an error, never silently skipped.
2. The Hugging Face cache (``bert-base-uncased``, ``openai/clip-vit-large-patch14``), or for CLIP a ``version`` that
   is a local folder holding tokenizer files, or another hub id (downloaded unless ``HF_HUB_OFFLINE`` /
   ``TRANSFORMERS_OFFLINE`` is set, which makes every look-up cache-only and fast). The two known ids are never
   downloaded: their vocabularies are the shipped ones, and a hub request without a network stalls for about half
   a minute.
3. The vocabularies shipped in ``vocab/`` (BERT-base-uncased WordPiece vocabulary; OpenAI CLIP's BPE merges,
   converted once into Hugging Face's ``vocab.json``/``merges.txt`` and cached under the user cache directory).

Every loaded tokenizer is checked against the size of its vocabulary file (transformers 5 silently returns an
almost empty tokenizer for a folder it cannot read). CLIP text is cleaned like the slow Hugging Face CLIPTokenizer that
Stable Diffusion used (``ftfy.fix_text``, whitespace collapse, lower case) whenever the loaded tokenizer is the
*tokenizers*-backed one (always so on transformers 5), so both major versions give the same ids.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ldm.io import atomic_write_text

logger = logging.getLogger(__name__)

VOCAB_DIR = Path(__file__).resolve().parent / "vocab"
SHIPPED_BERT_VOCAB = VOCAB_DIR / "bert-base-uncased" / "vocab.txt"
SHIPPED_CLIP_BPE = VOCAB_DIR / "clip" / "bpe_simple_vocab_16e6.txt.gz"
BERT_HUB_ID = "bert-base-uncased"
CLIP_HUB_ID = "openai/clip-vit-large-patch14"
CLIP_NUM_MERGES = 49152 - 256 - 2
CLIP_VOCAB_SIZE = 49408

_last_sources: dict[str, str] = {}


@dataclass(frozen=True)
class LoadedTokenizer:
    """A Hugging Face tokenizer, where it came from, and the text cleaning to apply before it."""

    tokenizer: object
    source: str
    clean: Callable[[str], str]

    def ids(self, texts: list[str], max_length: int) -> torch.Tensor:
        """Token ids ``[len(texts), max_length]`` (CPU, int64): special tokens added, truncated, padded."""
        batch = self.tokenizer(
            [self.clean(t) for t in texts],
            truncation=True,
            max_length=max_length,
            padding="max_length",
            return_tensors="pt",
        )
        return batch["input_ids"]

    def content_ids(self, text: str) -> list[int]:
        """Ids of ``text`` without special or padding tokens."""
        return list(self.tokenizer.encode(self.clean(text), add_special_tokens=False))

    def tokens(self, ids: list[int]) -> list[str]:
        """The vocabulary strings of ``ids``."""
        return list(self.tokenizer.convert_ids_to_tokens(list(ids)))


def tokenizer_sources() -> dict[str, str]:
    """Where the most recently loaded tokenizer of each family (``"bert"``, ``"clip"``) came from."""
    return dict(_last_sources)


def hub_offline() -> bool:
    """True when the environment asks for no hub access (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    flags = (os.environ.get(name, "") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(flag.strip().upper() in {"1", "ON", "YES", "TRUE"} for flag in flags)


def hub_file(repo_id: str, filename: str, *, allow_network: bool = True) -> Optional[Path]:
    """Local path of ``filename`` of hub repo ``repo_id`` from the cache (or a download when allowed), else None."""
    from huggingface_hub import hf_hub_download

    local_only = hub_offline() or not allow_network
    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=local_only))
    except Exception as err:  # not cached, offline, no network, or not a valid repo id: all mean "not available"
        logger.debug("hub file %s/%s unavailable: %s", repo_id, filename, err)
        return None


def _record(family: str, loaded: LoadedTokenizer) -> LoadedTokenizer:
    _last_sources[family] = loaded.source
    logger.info("%s tokenizer loaded from %s", family.upper(), loaded.source)
    return loaded


def _check_size(tokenizer: object, expected: int, where: Path) -> None:
    if len(tokenizer) < expected:
        raise ValueError(f"tokenizer loaded from {where} has {len(tokenizer)} tokens, expected at least {expected}")


# ----------------------------------------------------------------------------------------------------------- BERT
def _bert_from_dir(folder: Path, source: str) -> LoadedTokenizer:
    from transformers import BertTokenizerFast

    vocab_file = folder / "vocab.txt"
    if not vocab_file.is_file():
        raise FileNotFoundError(f"no vocab.txt in {folder}")
    tokenizer = BertTokenizerFast.from_pretrained(str(folder), do_lower_case=True)
    with open(vocab_file, encoding="utf-8") as handle:
        _check_size(tokenizer, sum(1 for _ in handle), folder)
    return LoadedTokenizer(tokenizer, source, str)


@functools.lru_cache(maxsize=None)
def load_bert_tokenizer(tokenizer_path: Optional[str] = None) -> LoadedTokenizer:
    """The bert-base-uncased WordPiece tokenizer (``BertTokenizerFast``, lower-casing) from the first working source."""
    if tokenizer_path is not None:
        path = Path(tokenizer_path).expanduser()
        folder = path.parent if path.is_file() and path.name == "vocab.txt" else path
        return _record("bert", _bert_from_dir(folder, f"tokenizer_path {folder}"))
    cached = hub_file(BERT_HUB_ID, "vocab.txt", allow_network=False)
    if cached is not None:
        return _record("bert", _bert_from_dir(cached.parent, f"Hugging Face cache/hub {BERT_HUB_ID} ({cached.parent})"))
    return _record("bert", _bert_from_dir(SHIPPED_BERT_VOCAB.parent, f"shipped vocabulary {SHIPPED_BERT_VOCAB}"))


# ----------------------------------------------------------------------------------------------------------- CLIP
def clean_clip_text(text: str) -> str:
    """The slow Hugging Face CLIPTokenizer's text cleaning: ``ftfy.fix_text``, collapse whitespace, lower case."""
    import ftfy

    return re.sub(r"\s+", " ", ftfy.fix_text(text)).strip().lower()


def _byte_symbols() -> list[str]:
    """CLIP's 256 byte symbols in vocabulary order: printable Latin-1 bytes as themselves, the rest shifted past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    n_other = 256 - len(printable)
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(n_other)]


def _convert_clip_bpe(bpe_gz: Path, out_dir: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` (transformers' CLIP format) for OpenAI's gzipped BPE merges file."""
    lines = gzip.decompress(bpe_gz.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : CLIP_NUM_MERGES + 1]
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{bpe_gz} gives {len(vocab)} vocabulary entries, expected {CLIP_VOCAB_SIZE}")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    atomic_write_text(out_dir / "vocab.json", json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))


def _user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "textual-inversion" / "clip-tokenizer"


def converted_clip_vocab(bpe_gz: Path) -> Path:
    """Folder with the Hugging Face form of ``bpe_gz``, converting it on first use (user cache, else a temp dir)."""
    digest = hashlib.sha256(bpe_gz.read_bytes()).hexdigest()[:16]
    out_dir = _user_cache_dir() / digest
    if (out_dir / "vocab.json").is_file() and (out_dir / "merges.txt").is_file():
        return out_dir
    try:
        _convert_clip_bpe(bpe_gz, out_dir)
    except OSError as err:
        out_dir = Path(tempfile.mkdtemp(prefix="clip-tokenizer-"))
        logger.warning("cannot write the CLIP vocabulary cache (%s); using %s", err, out_dir)
        _convert_clip_bpe(bpe_gz, out_dir)
    return out_dir


def _has_clip_files(folder: Path) -> bool:
    return (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()


def _clip_from_dir(folder: Path, source: str) -> LoadedTokenizer:
    from transformers import CLIPTokenizer

    if not _has_clip_files(folder):
        raise FileNotFoundError(f"no vocab.json + merges.txt in {folder}")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    with open(folder / "vocab.json", encoding="utf-8") as handle:
        _check_size(tokenizer, len(json.load(handle)), folder)
    clean = clean_clip_text if getattr(tokenizer, "is_fast", True) else str
    return LoadedTokenizer(tokenizer, source, clean)


def _clip_from_user_path(path: Path) -> LoadedTokenizer:
    if path.is_file() and path.name.endswith(".txt.gz"):
        return _clip_from_dir(converted_clip_vocab(path), f"tokenizer_path {path} (OpenAI BPE, converted)")
    return _clip_from_dir(path, f"tokenizer_path {path}")


def _clip_from_hub(version: str) -> Optional[LoadedTokenizer]:
    local = Path(version).expanduser()
    if local.is_dir():
        return _clip_from_dir(local, f"version folder {local}") if _has_clip_files(local) else None
    allow_network = version != CLIP_HUB_ID
    vocab = hub_file(version, "vocab.json", allow_network=allow_network)
    merges = None if vocab is None else hub_file(version, "merges.txt", allow_network=allow_network)
    if merges is None or vocab.parent != merges.parent:
        return None
    return _clip_from_dir(vocab.parent, f"Hugging Face cache/hub {version} ({vocab.parent})")


@functools.lru_cache(maxsize=None)
def load_clip_tokenizer(version: str = CLIP_HUB_ID, tokenizer_path: Optional[str] = None) -> LoadedTokenizer:
    """The CLIP BPE tokenizer (pads with ``<|endoftext|>`` as SD v1 does) from the first working source."""
    if tokenizer_path is not None:
        return _record("clip", _clip_from_user_path(Path(tokenizer_path).expanduser()))
    loaded = _clip_from_hub(version)
    if loaded is not None:
        return _record("clip", loaded)
    folder = converted_clip_vocab(SHIPPED_CLIP_BPE)
    return _record("clip", _clip_from_dir(folder, f"shipped vocabulary {SHIPPED_CLIP_BPE} (converted in {folder})"))
