"""The placeholder vectors of textual inversion: their initialisation, their substitution into the text encoder,
and their files.

Wherever the tokenizer produced a placeholder's token id, the looked-up token embedding is replaced by the learned
vector(s) *before* position embeddings are added (BERT-style and CLIP paths alike). With ``num_vectors_per_token``
K > 1 each occurrence is expanded into K consecutive vectors and the sequence is truncated back to its length.

Differences from the original, all deliberate:
- the init word may be several tokens: their mean (K = 1) or the tokens spread over the K vectors, with a note;
- a placeholder that is not one known token (or an init word with an unknown token) raises
  :class:`PlaceholderError` suggesting alternatives (the checks live in :mod:`ldm.modules.placeholders`);
- an embedding with more vectors than ``num_vectors_per_token`` just works (the original threw a shape error);
- files are read and written through :mod:`ldm.modules.embedding_formats` (``weights_only`` loading, a width check,
  plain tensors in the two-key format every tool reads: ``string_to_token`` and ``string_to_param``).
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ldm.modules.embedding_formats import (
    EmbeddingFileError,
    LoadedEmbeddings,
    check_width,
    original_payload,
    read_embeddings,
    resolve_token_id,
    save_original,
)
from ldm.modules.placeholders import SUGGESTED_PLACEHOLDERS, PlaceholderError, Vocabulary, all_placeholders, check_placeholders

__all__ = ["EmbeddingFileError", "EmbeddingManager", "PlaceholderError", "SUGGESTED_PLACEHOLDERS", "read_embedding_file"]

logger = logging.getLogger(__name__)

PROGRESSIVE_SCALE = 2000


class EmbeddingManager(nn.Module):
    def __init__(
        self,
        embedder: Any,
        placeholder_strings: list[str] | None = None,
        initializer_words: list[str] | None = None,
        per_image_tokens: bool = False,
        num_vectors_per_token: int = 1,
        progressive_words: bool = False,
        embedding_manager_ckpt: str | None = None,
        init_noise: float = 0.0,
        **kwargs: Any,
    ) -> None:
        """``embedding_manager_ckpt`` (an embedding file to start from) is loaded by the model once the manager is
        built (:meth:`ldm.models.diffusion.ddpm.LatentDiffusion.setup_personalization`), so it is only named here.

        ``init_noise`` > 0 starts each vector at its init-word row plus Gaussian noise of that size relative to the
        row's RMS (drawn from torch's generator, so ``--seed`` decides it): the vectors of a multi-vector word then
        start apart instead of all at the same word. The context regulariser still compares with the init word."""
        super().__init__()
        self.embedder = [embedder]  # a list keeps the (frozen) encoder out of this module's parameters
        self.string_to_token_dict: dict[str, torch.Tensor] = {}
        self.string_to_param_dict = nn.ParameterDict()
        self.initial_embeddings = nn.ParameterDict()
        self.progressive_words = progressive_words
        self.progressive_counter = 0
        self.max_vectors_per_token = num_vectors_per_token
        self.is_clip = bool(embedder.is_clip)
        placeholders = all_placeholders(placeholder_strings, per_image_tokens)
        init_words = list(initializer_words or [])
        tokens = check_placeholders(self.vocabulary, placeholders, init_words)
        for idx, placeholder in enumerate(placeholders):
            self.string_to_token_dict[placeholder] = torch.tensor(tokens[placeholder])
            if idx < len(init_words) and init_words[idx]:
                vectors = self.initial_vectors(init_words[idx], num_vectors_per_token)
                self.initial_embeddings[placeholder] = nn.Parameter(vectors.clone(), requires_grad=False)
                if init_noise > 0:
                    rms = vectors.pow(2).mean(dim=-1, keepdim=True).sqrt()
                    vectors = vectors + init_noise * rms * torch.randn(vectors.shape)
            else:
                vectors = torch.rand(num_vectors_per_token, embedder.embed_dim)
            self.string_to_param_dict[placeholder] = nn.Parameter(vectors, requires_grad=True)

    @property
    def vocabulary(self) -> Vocabulary:
        """The text encoder's tokenizer, for the placeholder and init-word checks."""
        return Vocabulary.of_embedder(self.embedder[0])

    @property
    def token_dim(self) -> int:
        return int(self.embedder[0].embed_dim)

    @torch.no_grad()
    def initial_vectors(self, word: str, k: int) -> torch.Tensor:
        """K rows for ``word``: its token embedding (SD v1's CLIP: plus the position-0 embedding, as the original).

        The original added position 0 because it embedded the word with CLIP's embeddings module; it never ran on
        OpenCLIP or SDXL. There (embedders with ``init_adds_position = False``) a user expects the init vector to be
        the init word's token embedding itself, as diffusers and kohya start it, so nothing is added.

        Several tokens: their mean when K = 1, else the tokens spread in order over the K rows.
        """
        embedder = self.embedder[0]
        ids = self.vocabulary.init_word_ids(word)
        table = embedder.token_embedding.weight.detach().float().cpu()
        vectors = table[torch.tensor(ids)]
        if self.is_clip and getattr(embedder, "init_adds_position", True):
            vectors = vectors + embedder.position_embedding.weight[0].detach().float().cpu()
        if len(ids) == 1:
            return vectors.repeat(k, 1)
        if k == 1:
            logger.warning("init word '%s' is %d tokens: starting from the mean of their embeddings", word, len(ids))
            return vectors.mean(dim=0, keepdim=True)
        logger.warning("init word '%s' is %d tokens: spreading them over the %d vectors", word, len(ids), k)
        return vectors[torch.arange(k) * len(ids) // k]

    def forward(self, tokenized_text: torch.Tensor, embedded_text: torch.Tensor) -> torch.Tensor:
        """Embeddings [B, N, D] of ``tokenized_text`` [B, N] with every placeholder's vectors substituted.

        Placeholders are substituted one after another, each on the token row as the ones before left it: a
        two-vector ``*`` shifts everything after it by one, and a ``&`` after it is found at its shifted place.
        """
        tokens = tokenized_text
        for placeholder, token in self.string_to_token_dict.items():
            param = self.string_to_param_dict[placeholder]
            param = param.to(device=embedded_text.device, dtype=embedded_text.dtype)
            single = self.max_vectors_per_token == 1 and param.shape[0] == 1
            k = 1 if single else self.vectors_in_use(param.shape[0])
            tokens, embedded_text = self.insert_vectors(tokens, embedded_text, token.tolist(), param[:k])  # host id, no scalar op
        return embedded_text

    def vectors_in_use(self, available: int, count_call: bool = True) -> int:
        """How many of a placeholder's vectors are inserted now (progressive words grow one per 2000 calls)."""
        if not self.progressive_words:
            return available
        self.progressive_counter += int(count_call)
        return min(available, 1 + self.progressive_counter // PROGRESSIVE_SCALE)

    @staticmethod
    def insert_vectors(tokens: torch.Tensor, embedded: torch.Tensor, token: int,
                       vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each occurrence of ``token`` becomes the k rows of ``vectors``; the tail beyond the length is cut.

        Returns the token rows shifted the same way (the inserted rows hold -1, which no placeholder matches) and
        the new embeddings.
        """
        if vectors.shape[0] == 1:
            mask = (tokens == token).unsqueeze(-1)
            return tokens, torch.where(mask, vectors[0], embedded)
        k, n = vectors.shape[0], tokens.shape[1]
        filler = tokens.new_full((k,), -1)
        token_rows, rows = [], []
        for b in range(tokens.shape[0]):
            token_row, row = tokens[b], embedded[b]
            cols = (token_row == token).nonzero().flatten().tolist()
            for col in sorted(cols, reverse=True):
                token_row = torch.cat([token_row[:col], filler, token_row[col + 1 :]])[:n]
                row = torch.cat([row[:col], vectors, row[col + 1 :]])[:n]
            token_rows.append(token_row)
            rows.append(row)
        return torch.stack(token_rows), torch.stack(rows)

    @torch.no_grad()
    def substitution_mask(self, tokenized_text: torch.Tensor) -> torch.Tensor:
        """Bool ``[B, N]``: the rows that :meth:`forward` fills with learned vectors (the same insertions and cuts;
        with progressive words, the vectors in use at the last call)."""
        tokens = tokenized_text
        marks = torch.zeros(*tokenized_text.shape, 1, device=tokenized_text.device)
        for placeholder, token in self.string_to_token_dict.items():
            k = self.vectors_in_use(self.string_to_param_dict[placeholder].shape[0], count_call=False)
            tokens, marks = self.insert_vectors(tokens, marks, int(token), torch.ones(k, 1, device=marks.device))
        return marks[..., 0] > 0

    @contextlib.contextmanager
    def initial_vectors_in_place(self) -> Iterator[None]:
        """While active, every placeholder stands for its init word's vectors (what the prompt meant before training)."""
        missing = [s for s in self.string_to_param_dict if s not in self.initial_embeddings]
        if missing:
            raise PlaceholderError(f"placeholders {missing} have no init word; the context regulariser needs one")
        learned, counter = self.string_to_param_dict, self.progressive_counter
        self.string_to_param_dict = self.initial_embeddings
        try:
            yield
        finally:
            self.string_to_param_dict, self.progressive_counter = learned, counter

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
        return original_payload(self.string_to_param_dict, self.string_to_token_dict, extra)

    def save(self, ckpt_path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
        save_original(ckpt_path, self.string_to_param_dict, self.string_to_token_dict, extra)

    def load(self, ckpt_path: str | os.PathLike) -> None:
        """Replace the placeholders and vectors by those of an embedding file in any supported format.

        The width must match this model's text encoder. Each placeholder gets the token id this model's tokenizer
        gives it (see :func:`ldm.modules.embedding_formats.resolve_token_id`); any number of vectors per placeholder
        works.
        """
        loaded = read_embedding_file(ckpt_path)
        check_width(loaded, self.token_dim)
        self.use_embeddings(loaded)

    def use_embeddings(self, loaded: LoadedEmbeddings) -> None:
        """Replace the placeholders and vectors by ``loaded``'s (already checked to fit this encoder's width)."""
        tokens = {p: torch.tensor(resolve_token_id(self.vocabulary, p, loaded.token_ids.get(p), loaded.path)) for p in loaded.vectors}
        self.string_to_token_dict = tokens
        self.string_to_param_dict = nn.ParameterDict(
            {s: nn.Parameter(v.reshape(-1, self.token_dim).float()) for s, v in loaded.vectors.items()}
        )


def read_embedding_file(path: str | os.PathLike) -> LoadedEmbeddings:
    """The :class:`~ldm.modules.embedding_formats.LoadedEmbeddings` of any supported embedding file (no pickled code runs)."""
    return read_embeddings(path)
