"""What every text encoder of the conditioning stage shares: the input and hook types, and the uniform helper API
(device following, memoised tokenization, content token ids) that the EmbeddingManager relies on.

A leaf of ``ldm/modules/encoders``: the BERT, CLIP (:mod:`.modules`) and OpenCLIP (:mod:`.open_clip`) embedders all
build on it, so none of them needs to import another.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
from torch import nn

from ldm.modules.encoders.tokenizers import LoadedTokenizer

TextInput = Union[str, Sequence[str], torch.Tensor]  # a runtime alias: "|" between types there needs Python 3.10
EmbeddingManagerFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _as_texts(text: str | Sequence[str]) -> list[str]:
    return [text] if isinstance(text, str) else list(text)


class AbstractEncoder(nn.Module):
    """Base class of the conditioning encoders."""

    def encode(self, *args, **kwargs):
        """Abstract (as upstream): each encoder defines what it encodes to."""
        raise NotImplementedError


class _TextEmbedder(AbstractEncoder):
    """What both text embedders share: device following, tokenizer access and the uniform helper API."""

    def _loaded_tokenizer(self) -> LoadedTokenizer:
        """Abstract: each embedder names its tokenizer (BERT, CLIP, OpenCLIP's zero-padded CLIP)."""
        raise NotImplementedError

    @property
    def loaded_tokenizer(self) -> LoadedTokenizer:
        """The tokenizer with its text cleaning (what :class:`ldm.modules.placeholders.Vocabulary` is built from)."""
        return self._loaded_tokenizer()

    @property
    def device(self) -> torch.device:
        """The device of the parameters (inputs are moved there)."""
        return next(self.parameters()).device

    @property
    def embed_dim(self) -> int:
        return self.token_embedding.embedding_dim

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids ``[B, max_length]`` on the CPU, with special tokens, truncated and padded as the tokenizer does.

        Rows are memoised per string: training draws its captions from a few dozen templates, so each is tokenized
        once instead of every step.
        """
        cache: dict[str, torch.Tensor] = self.__dict__.setdefault("_token_cache", {})
        texts = _as_texts(texts)
        if len(cache) > 4096:
            cache.clear()  # before picking the new strings: rows of this batch must survive the clearing
        new = [t for t in dict.fromkeys(texts) if t not in cache]
        if new:
            cache.update(zip(new, self._loaded_tokenizer().ids(new, self.max_length)))
        return torch.stack([cache[t] for t in texts])

    def content_token_ids(self, text: str) -> list[int]:
        """Ids of ``text`` without special or padding tokens (a placeholder string must give exactly one)."""
        return self._loaded_tokenizer().content_ids(text)

    def decode_ids(self, ids: Sequence[int]) -> list[str]:
        """Vocabulary strings of ``ids``."""
        return self._loaded_tokenizer().tokens(list(ids))

    def _token_ids(self, text: TextInput) -> torch.Tensor:
        ids = text if isinstance(text, torch.Tensor) else self.tokenize(text)
        return ids.to(device=self.device, dtype=torch.long, non_blocking=True)  # a blocking copy would wait for the device

    def encode(self, text: TextInput, embedding_manager: EmbeddingManagerFn | None = None) -> torch.Tensor:
        return self(text, embedding_manager=embedding_manager)
