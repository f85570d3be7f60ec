"""The placeholder vectors of textual inversion: their initialisation, their substitution into the text encoder,
and their files.

Wherever the tokenizer produced a placeholder's token id, the looked-up token embedding is replaced by the learned
vector(s) *before* position embeddings are added (BERT-style and CLIP paths alike). With ``num_vectors_per_token``
K > 1 each occurrence is expanded into K consecutive vectors and the sequence is truncated back to its length.

Differences from the original, all deliberate:
- the init word may be several tokens: their mean (K = 1) or the tokens spread over the K vectors, with a note;
- a placeholder that is not one token raises :class:`PlaceholderError` suggesting single-token alternatives;
- an embedding with more vectors than ``num_vectors_per_token`` just works (the original threw a shape error);
- files are read with ``weights_only`` loading, checked for width, and written with plain tensors (still the
  two-key format every tool reads: ``string_to_token`` and ``string_to_param``).
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from ldm.checkpoint import atomic_torch_save

logger = logging.getLogger(__name__)

PROGRESSIVE_SCALE = 2000
SUGGESTED_PLACEHOLDERS = ("*", "@", "&", "#", "$", "%", "^", "~", "א", "ב")


class PlaceholderError(ValueError):
    """A placeholder string that is not exactly one token of the model's tokenizer."""


class EmbeddingFileError(ValueError):
    """An embedding file that cannot be used with this model; ``str()`` is a one-line message."""


def single_token_alternatives(embedder: Any, taken: set[str] = frozenset()) -> list[str]:
    return [s for s in SUGGESTED_PLACEHOLDERS if s not in taken and len(embedder.content_token_ids(s)) == 1]


def token_for_placeholder(embedder: Any, string: str, taken: set[str] = frozenset()) -> int:
    """The one token id of ``string``; a clear error with single-token suggestions otherwise."""
    ids = embedder.content_token_ids(string)
    if len(ids) != 1:
        hint = ", ".join(f"'{s}'" for s in single_token_alternatives(embedder, taken)[:5])
        raise PlaceholderError(
            f"placeholder '{string}' maps to {len(ids)} tokens of this model's tokenizer, not one; "
            f"choose a single-token placeholder such as {hint} (--placeholder_string)"
        )
    return ids[0]


class EmbeddingManager(nn.Module):
    def __init__(
        self,
        embedder: Any,
        placeholder_strings: list[str] | None = None,
        initializer_words: list[str] | None = None,
        per_image_tokens: bool = False,
        num_vectors_per_token: int = 1,
        progressive_words: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.embedder = [embedder]  # a list keeps the (frozen) encoder out of this module's parameters
        self.string_to_token_dict: dict[str, torch.Tensor] = {}
        self.string_to_param_dict = nn.ParameterDict()
        self.initial_embeddings = nn.ParameterDict()
        self.progressive_words = progressive_words
        self.progressive_counter = 0
        self.max_vectors_per_token = num_vectors_per_token
        self.is_clip = bool(embedder.is_clip)
        placeholders = list(placeholder_strings or ["*"])
        if per_image_tokens:
            from ldm.data.personalized import per_img_token_list

            placeholders.extend(per_img_token_list)
        init_words = list(initializer_words or [])
        for idx, placeholder in enumerate(placeholders):
            token = token_for_placeholder(embedder, placeholder, taken=set(placeholders))
            self.string_to_token_dict[placeholder] = torch.tensor(token)
            if idx < len(init_words) and init_words[idx]:
                vectors = self.initial_vectors(init_words[idx], num_vectors_per_token)
                self.initial_embeddings[placeholder] = nn.Parameter(vectors.clone(), requires_grad=False)
            else:
                vectors = torch.rand(num_vectors_per_token, embedder.embed_dim)
            self.string_to_param_dict[placeholder] = nn.Parameter(vectors, requires_grad=True)

    @property
    def token_dim(self) -> int:
        return int(self.embedder[0].embed_dim)

    @torch.no_grad()
    def initial_vectors(self, word: str, k: int) -> torch.Tensor:
        """K rows for ``word``: its token embedding (CLIP: plus the position-0 embedding, as the original).

        Several tokens: their mean when K = 1, else the tokens spread in order over the K rows.
        """
        embedder = self.embedder[0]
        ids = embedder.content_token_ids(word)
        if not ids:
            raise PlaceholderError(f"init word '{word}' has no tokens; pass a word with --init_word")
        table = embedder.token_embedding.weight.detach().float().cpu()
        vectors = table[torch.tensor(ids)]
        if self.is_clip:
            vectors = vectors + embedder.position_embedding.weight[0].detach().float().cpu()
        if len(ids) == 1:
            return vectors.repeat(k, 1)
        if k == 1:
            logger.warning("init word '%s' is %d tokens: starting from the mean of their embeddings", word, len(ids))
            return vectors.mean(dim=0, keepdim=True)
        logger.warning("init word '%s' is %d tokens: spreading them over the %d vectors", word, len(ids), k)
        return vectors[torch.arange(k) * len(ids) // k]

    def forward(self, tokenized_text: torch.Tensor, embedded_text: torch.Tensor) -> torch.Tensor:
        """Embeddings [B, N, D] of ``tokenized_text`` [B, N] with every placeholder's vectors substituted."""
        for placeholder, token in self.string_to_token_dict.items():
            param = self.string_to_param_dict[placeholder]
            param = param.to(device=embedded_text.device, dtype=embedded_text.dtype)
            if self.max_vectors_per_token == 1 and param.shape[0] == 1:
                mask = (tokenized_text == token.to(tokenized_text.device)).unsqueeze(-1)
                embedded_text = torch.where(mask, param[0], embedded_text)
            else:
                embedded_text = self.insert_vectors(tokenized_text, embedded_text, int(token), param)
        return embedded_text

    def vectors_in_use(self, available: int) -> int:
        """How many of a placeholder's vectors are inserted now (progressive words grow one per 2000 calls)."""
        if not self.progressive_words:
            return available
        self.progressive_counter += 1
        return min(available, 1 + self.progressive_counter // PROGRESSIVE_SCALE)

    def insert_vectors(self, tokens: torch.Tensor, embedded: torch.Tensor, token: int, param: torch.Tensor) -> torch.Tensor:
        """Multi-vector path: each occurrence becomes k rows; the tail beyond the sequence length is cut."""
        k = self.vectors_in_use(param.shape[0])
        n = tokens.shape[1]
        rows = []
        for b in range(tokens.shape[0]):
            row = embedded[b]
            cols = (tokens[b] == token).nonzero().flatten().tolist()
            for col in sorted(cols, reverse=True):
                row = torch.cat([row[:col], param[:k], row[col + 1 :]])[:n]
            rows.append(row)
        return torch.stack(rows)

    def embedding_parameters(self):
        return self.string_to_param_dict.parameters()

    def get_embedding_norms_squared(self) -> torch.Tensor:
        all_params = torch.cat(list(self.string_to_param_dict.values()), dim=0)
        return (all_params * all_params).sum(dim=-1)

    def embedding_to_coarse_loss(self) -> torch.Tensor:
        """Squared distance of each vector set to its init-word embedding (the paper's coarse regulariser)."""
        loss = torch.zeros(())
        num = len(self.initial_embeddings)
        for key, init in self.initial_embeddings.items():
            optimized = self.string_to_param_dict[key]
            diff = optimized - init.to(optimized.device)
            loss = loss.to(optimized.device) + (diff @ diff.T) / num
        return loss

    def state_to_save(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The original two-key format (plain tensors, so safe loaders read it), plus optional metadata keys."""
        payload: dict[str, Any] = {
            "string_to_token": {s: t.detach().clone().cpu() for s, t in self.string_to_token_dict.items()},
            "string_to_param": {s: p.detach().clone().cpu() for s, p in self.string_to_param_dict.items()},
        }
        payload.update(extra or {})
        return payload

    def save(self, ckpt_path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
        atomic_torch_save(self.state_to_save(extra), ckpt_path)

    def load(self, ckpt_path: str | os.PathLike) -> None:
        """Replace the placeholders and vectors by those of an embedding file in any supported format.

        The width must match this model's text encoder. Each placeholder gets the token id this model's tokenizer
        gives it (see :func:`ldm.modules.embedding_formats.resolve_token_id`); any number of vectors per placeholder
        works.
        """
        from ldm.modules.embedding_formats import Vocabulary, check_width, resolve_token_id

        loaded = read_embedding_file(ckpt_path)
        check_width(loaded, self.token_dim)
        vocab = Vocabulary.of_embedder(self.embedder[0])
        tokens = {p: torch.tensor(resolve_token_id(vocab, p, loaded.token_ids.get(p), ckpt_path)) for p in loaded.vectors}
        self.string_to_token_dict = tokens
        self.string_to_param_dict = nn.ParameterDict(
            {s: nn.Parameter(v.reshape(-1, self.token_dim).float()) for s, v in loaded.vectors.items()}
        )


def read_embedding_file(path: str | os.PathLike) -> Any:
    """The :class:`~ldm.modules.embedding_formats.LoadedEmbeddings` of any supported embedding file (no pickled code runs)."""
    from ldm.modules.embedding_formats import read_embeddings

    return read_embeddings(path)
