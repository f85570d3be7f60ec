"""Placeholders and the tokenizer vocabulary they live in: the one home of every check on a placeholder or init word.

A placeholder (``*``) must be exactly one token of the model's tokenizer, and that token must not be the unknown
token: every word outside the vocabulary becomes ``[UNK]``, so a placeholder that maps to it would stand for all of
them (an embedding learned as ``zebra`` on the shapes model drew the concept for "giraffe" too). An init word must
consist of known tokens, or the vectors silently start from ``[UNK]``'s embedding.

:class:`Vocabulary` is what these checks need of a tokenizer; it is built from a text embedder
(:meth:`Vocabulary.of_embedder`), a loaded tokenizer (:meth:`Vocabulary.of_tokenizer`) or a model config's text
encoder (:func:`vocabulary_of_config`), so ``main.py``, ``merge_embeddings.py``, ``scripts/embedding_tool.py`` and
the :class:`~ldm.modules.embedding_manager.EmbeddingManager` all refuse the same things with the same one-line
:class:`PlaceholderError`.

This module imports nothing of the project at import time (the tokenizer loaders only when a config asks for one).
"""
from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ldm.errors import UserError

SUGGESTED_PLACEHOLDERS = ("*", "@", "&", "#", "$", "%", "^", "~", "א", "ב")

# The original's per-image placeholders (``per_image_tokens: true``): the 22 Hebrew letters (no final forms),
# U+05D0 ... U+05EA; image i is tagged with letter i.
per_img_token_list = [
    "\u05d0", "\u05d1", "\u05d2", "\u05d3", "\u05d4", "\u05d5", "\u05d6", "\u05d7", "\u05d8", "\u05d9", "\u05db",
    "\u05dc", "\u05de", "\u05e0", "\u05e1", "\u05e2", "\u05e4", "\u05e6", "\u05e7", "\u05e8", "\u05e9", "\u05ea",
]


class PlaceholderError(UserError, ValueError):
    """A placeholder that is not exactly one known token, or an unusable init word; ``str()`` is one line."""


@dataclass(frozen=True)
class Vocabulary:
    """What placeholder handling needs of a tokenizer: content ids of a string, id -> token, sizes, the unknown id."""

    content_ids: Callable[[str], list[int]]
    raw_tokens: Callable[[list[int]], list[str]]
    size: int
    unk_id: int | None = None
    words: Callable[[], list[str]] = field(default=list, compare=False)

    @classmethod
    def of_tokenizer(cls, loaded: Any, size: int | None = None) -> Vocabulary:
        """From a :class:`ldm.modules.encoders.tokenizers.LoadedTokenizer` (``size``: the model's table, if known)."""
        tokenizer = loaded.tokenizer
        count = len(tokenizer)
        return cls(
            loaded.content_ids,
            loaded.tokens,
            int(size if size is not None else count),
            getattr(tokenizer, "unk_token_id", None),
            functools.cache(lambda: loaded.tokens(list(range(count)))),
        )

    @classmethod
    def of_embedder(cls, embedder: Any) -> Vocabulary:
        """From a text embedder (``BERTEmbedder``/``FrozenCLIPEmbedder``): its tokenizer, its embedding table's size."""
        return cls.of_tokenizer(embedder.loaded_tokenizer, int(embedder.token_embedding.num_embeddings))

    def token(self, token_id: int) -> str:
        """The vocabulary string of ``token_id`` as a prompt writes it (CLIP's end-of-word mark removed)."""
        return self.raw_tokens([int(token_id)])[0].removesuffix("</w>")

    def is_unknown(self, token_id: int) -> bool:
        return self.unk_id is not None and int(token_id) == self.unk_id

    def single_token(self, string: str) -> int | None:
        """The token id of ``string`` when it is exactly one known token, else None."""
        ids = self.content_ids(string)
        return ids[0] if len(ids) == 1 and not self.is_unknown(ids[0]) else None

    def alternatives(self, taken: Sequence[str] | set[str] = frozenset()) -> list[str]:
        """The suggested placeholders that are single known tokens here and not in ``taken``."""
        return [s for s in SUGGESTED_PLACEHOLDERS if s not in taken and self.single_token(s) is not None]

    def nearest_words(self, word: str, n: int = 3) -> list[str]:
        """Whole-word vocabulary entries spelled most like ``word`` (for suggestions)."""
        candidates = {w.removesuffix("</w>") for w in self.words()}
        candidates = {w for w in candidates if w.isalpha()}
        return difflib.get_close_matches(word.lower(), sorted(candidates), n=n, cutoff=0.5)

    def placeholder_token(self, string: str, taken: Sequence[str] | set[str] = frozenset(),
                          flag: str = "--placeholder_string", tokenizer: str = "this model's") -> int:
        """The one token id of placeholder ``string``; a :class:`PlaceholderError` naming ``flag`` otherwise."""
        ids = self.content_ids(string)
        hint = ", ".join(f"'{s}'" for s in self.alternatives(set(taken) - {string})[:5])
        if len(ids) != 1:
            raise PlaceholderError(
                f"placeholder '{string}' maps to {len(ids)} tokens, so it is not one token of {tokenizer} tokenizer; "
                f"choose a single-token placeholder such as {hint} ({flag})"
            )
        if self.is_unknown(ids[0]):
            raise PlaceholderError(
                f"placeholder '{string}' is not in the vocabulary of {tokenizer} tokenizer: it would be the unknown token "
                f"'{self.token(ids[0])}', which every unknown word shares; choose a single-token placeholder such as "
                f"{hint} ({flag})"
            )
        return ids[0]

    def init_word_ids(self, word: str, flag: str = "--init_word") -> list[int]:
        """The token ids of init word ``word``; a :class:`PlaceholderError` if it has none or an unknown one."""
        ids = self.content_ids(word)
        if not ids:
            raise PlaceholderError(f"init word '{word}' has no tokens; pass a word with {flag}")
        if any(self.is_unknown(i) for i in ids):
            unknown = [w for w in word.split() if any(self.is_unknown(i) for i in self.content_ids(w))] or [word]
            near = self.nearest_words(unknown[0])
            hint = f"known words spelled alike: {', '.join(repr(w) for w in near)}" if near else "pass a word it knows"
            raise PlaceholderError(
                f"init word '{word}': '{unknown[0]}' is not in the vocabulary of this model's tokenizer (it would start from the "
                f"unknown token '{self.token(self.unk_id)}'); {hint} ({flag})"
            )
        return ids


def all_placeholders(placeholder_strings: Sequence[str] | None, per_image_tokens: bool = False) -> list[str]:
    """The placeholders an EmbeddingManager config defines: its strings (``*`` by default), then the per-image ones."""
    return list(placeholder_strings or ["*"]) + (list(per_img_token_list) if per_image_tokens else [])


def check_personalization(encoder: Mapping[str, Any], personalization_params: Mapping[str, Any]) -> None:
    """Check a config's placeholders and init words against its text encoder's tokenizer, before any model is built.

    ``encoder`` is ``model.params.cond_stage_config``, ``personalization_params`` the EmbeddingManager's ``params``.
    """
    vocab, _ = vocabulary_of_config(encoder)
    placeholders = all_placeholders(personalization_params.get("placeholder_strings"), bool(personalization_params.get("per_image_tokens")))
    check_placeholders(vocab, placeholders, list(personalization_params.get("initializer_words") or []))


def check_placeholders(vocab: Vocabulary, placeholders: Sequence[str], init_words: Sequence[str] = ()) -> dict[str, int]:
    """Every placeholder's token id, after checking each placeholder and its init word (if any) against ``vocab``."""
    tokens = {}
    for idx, placeholder in enumerate(placeholders):
        tokens[placeholder] = vocab.placeholder_token(placeholder, taken=set(placeholders))
        if idx < len(init_words) and init_words[idx]:
            vocab.init_word_ids(init_words[idx])
    return tokens


def vocabulary_of_config(encoder: Mapping[str, Any]) -> tuple[Vocabulary, bool]:
    """The :class:`Vocabulary` of a config's text encoder (``model.params.cond_stage_config``) and whether it is CLIP.

    Only the tokenizer is loaded (offline: ``tokenizer_path``, the HF cache or the shipped vocabularies); no model is
    built. The vocabulary size is the encoder's ``vocab_size`` where the config gives one (the shapes model: 53).
    """
    from ldm.modules.encoders.tokenizers import CLIP_HUB_ID, load_bert_tokenizer, load_clip_tokenizer

    params = encoder.get("params") or {}
    target = str(encoder.get("target", ""))
    if target.endswith("FrozenCLIPEmbedder"):
        loaded = load_clip_tokenizer(params.get("version") or CLIP_HUB_ID, params.get("tokenizer_path"))
        return Vocabulary.of_tokenizer(loaded), True
    if "FrozenOpenCLIPEmbedder" in target:  # SD 2.x / SDXL's OpenCLIP: the CLIP BPE vocabulary (``version`` is open_clip's tag)
        return Vocabulary.of_tokenizer(load_clip_tokenizer(CLIP_HUB_ID, params.get("tokenizer_path"))), True
    size = params.get("vocab_size")
    return Vocabulary.of_tokenizer(load_bert_tokenizer(params.get("tokenizer_path")), size), False
