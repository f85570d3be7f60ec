"""Textual inversion on SDXL: a placeholder has a vector set in EACH text encoder.

SDXL reads a prompt with two encoders (CLIP ViT-L/14, 768 wide, and OpenCLIP ViT-bigG/14, 1280 wide; the
conditioner's ``embedders.0`` and ``.1``), so a learned word is two vector sets, both learned together. Each half is
an ordinary :class:`~ldm.modules.embedding_manager.EmbeddingManager` on its encoder, initialised from the init word in
that encoder's own token table; ``num_vectors_per_token``, multi-token init words, progressive words and file loading
work in each half exactly as on SD v1. The two tokenizers share the CLIP BPE vocabulary, so a placeholder has one
token id.

Files: the original-style ``.pt`` keyed by half (:func:`~ldm.modules.embedding_formats.sdxl_payload`) and the
shared ``{"clip_l", "clip_g"}`` safetensors (:func:`~ldm.modules.embedding_formats.save_sdxl`).
"""
from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ldm.errors import ConfigError
from ldm.modules.embedding_formats import SDXL_HALVES, check_sdxl_widths, read_embeddings, save_sdxl, save_sdxl_original, sdxl_payload
from ldm.modules.embedding_manager import EmbeddingManager
from ldm.modules.placeholders import Vocabulary


class SDXLEmbeddingManager(nn.Module):
    """Both halves of SDXL's learned words (``halves.clip_l``, ``halves.clip_g``), driven as one manager.

    ``embedder`` is the SDXL :class:`~ldm.modules.encoders.sdxl.GeneralConditioner`; its two text encoders (the
    embedders reading ``txt``) get one :class:`EmbeddingManager` each, built with the same arguments.
    """

    def __init__(
        self, embedder: Any, placeholder_strings: list[str] | None = None, initializer_words: list[str] | None = None,
        per_image_tokens: bool = False, num_vectors_per_token: int = 1, progressive_words: bool = False,
        embedding_manager_ckpt: str | None = None, init_noise: float = 0.0, **kwargs: Any,
    ) -> None:
        """The EmbeddingManager's arguments, given to both halves (``embedding_manager_ckpt`` is loaded by the model;
        ``init_noise``: each half's vectors start at its own init-word rows plus noise of that relative size)."""
        super().__init__()
        kwargs.update(placeholder_strings=placeholder_strings, initializer_words=initializer_words, per_image_tokens=per_image_tokens,
                      num_vectors_per_token=num_vectors_per_token, progressive_words=progressive_words, init_noise=init_noise)
        text = embedder.text_embedders()
        if len(text) != len(SDXL_HALVES):
            raise ConfigError(f"an SDXL conditioner has {len(SDXL_HALVES)} text encoders (input_key: txt); this one has {len(text)}")
        self.embedder_indices = [index for index, _ in text]
        self.halves = nn.ModuleDict({name: EmbeddingManager(encoder, **kwargs) for name, (_, encoder) in zip(SDXL_HALVES, text)})

    def by_embedder(self) -> dict[int, EmbeddingManager]:
        """``{conditioner embedder index: its half}``: what :class:`GeneralConditioner` takes as ``embedding_managers``."""
        return dict(zip(self.embedder_indices, self.halves.values()))

    @property
    def first(self) -> EmbeddingManager:
        return self.halves["clip_l"]

    # what code written for one manager reads: placeholders, token ids, vectors per placeholder (the CLIP-L half's)
    @property
    def string_to_token_dict(self) -> dict[str, torch.Tensor]:
        return self.first.string_to_token_dict

    @property
    def string_to_param_dict(self) -> nn.ParameterDict:
        return self.first.string_to_param_dict

    @property
    def vocabulary(self) -> Vocabulary:
        return self.first.vocabulary

    @property
    def token_dims(self) -> tuple[int, int]:
        return tuple(int(m.token_dim) for m in self.halves.values())  # type: ignore[return-value]

    def embedding_parameters(self) -> Iterator[nn.Parameter]:
        return itertools.chain.from_iterable(m.embedding_parameters() for m in self.halves.values())

    def get_embedding_norms_squared(self) -> torch.Tensor:
        return torch.cat([m.get_embedding_norms_squared() for m in self.halves.values()])

    def embedding_to_coarse_loss(self) -> torch.Tensor:
        """The original's pull towards the init words, summed over both halves."""
        losses = [m.embedding_to_coarse_loss() for m in self.halves.values()]
        return losses[0] + losses[1].to(losses[0].device)

    @contextlib.contextmanager
    def initial_vectors_in_place(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for manager in self.halves.values():
                stack.enter_context(manager.initial_vectors_in_place())
            yield

    def vectors(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{"clip_l": {placeholder: [K, 768]}, "clip_g": {placeholder: [K, 1280]}}`` (detached)."""
        return {name: {p: v.detach() for p, v in m.string_to_param_dict.items()} for name, m in self.halves.items()}

    def token_ids(self) -> dict[str, int]:
        return {p: int(t) for p, t in self.first.string_to_token_dict.items()}

    def state_to_save(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The original-style payload with both halves keyed (see :func:`~ldm.modules.embedding_formats.sdxl_payload`)."""
        return sdxl_payload(self.vectors(), self.token_ids(), extra)

    def save(self, ckpt_path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
        save_sdxl_original(ckpt_path, self.vectors(), self.token_ids(), extra)

    def save_shared(self, path: str | os.PathLike, placeholder: str, extra: dict[str, Any] | None = None) -> None:
        """One placeholder as the ``{"clip_l", "clip_g"}`` safetensors AUTOMATIC1111, ComfyUI and kohya read."""
        halves = self.vectors()
        save_sdxl(path, placeholder, halves["clip_l"][placeholder], halves["clip_g"][placeholder],
                  token_id=self.token_ids()[placeholder], metadata=extra)

    def load(self, ckpt_path: str | os.PathLike) -> None:
        """Both halves from an SDXL embedding file in any supported layout; a file of another family (or missing a
        half) is one line naming both widths."""
        loaded = read_embeddings(ckpt_path)
        check_sdxl_widths(loaded, self.token_dims)
        for name, manager in self.halves.items():
            manager.use_embeddings(loaded.half(name))
