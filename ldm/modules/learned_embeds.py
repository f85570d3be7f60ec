"""The file every inversion run on a CLIP-tokenized model (SD v1, SD 2.x) writes for other tools, next to
``embeddings.pt``: diffusers' ``learned_embeds.safetensors``.

diffusers' ``load_textual_inversion`` cannot read ``embeddings.pt`` (it takes the two-key layout for an AUTOMATIC1111
file and asks for its ``name`` key and a ``*`` entry), so without this file a user has to find
``scripts/embedding_tool.py convert`` first. ``{token: [K, D]}`` is the layout diffusers writes itself; AUTOMATIC1111
and ComfyUI read it too (there the prompt word is the file's name). Our placeholder and its token id ride along in the
safetensors metadata (diffusers ignores them), so the file reads back here as the same word.

The token: diffusers refuses a token its tokenizer already knows, and the usual placeholder ``*`` is one, so a
placeholder that is not already written ``<...>`` is wrapped in angle brackets (``*`` -> ``<*>``; ``<cat-toy>``
stays). A prompt "a photo of <*>" in diffusers then draws what "a photo of *" draws here.

SDXL runs need nothing from here: their ``embeddings.safetensors`` (``{"clip_l", "clip_g"}``) is already the file
AUTOMATIC1111 and ComfyUI read, and diffusers reads it with one ``load_textual_inversion`` call per text encoder.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from ldm.modules.embedding_formats import save_diffusers

LEARNED_EMBEDS = "learned_embeds"


def diffusers_token(placeholder: str) -> str:
    """The token a word is stored under for diffusers: the placeholder if written ``<...>``, else ``<placeholder>``."""
    if len(placeholder) > 2 and placeholder.startswith("<") and placeholder.endswith(">"):
        return placeholder
    return f"<{placeholder}>"


def learned_embeds_names(placeholders: list[str]) -> dict[str, str]:
    """``{placeholder: file name}``: ``learned_embeds.safetensors`` for one word, ``learned_embeds-<i>.safetensors``
    for several (a diffusers file holds one token; ``_2`` is avoided, it names the second half of an SDXL pair)."""
    if len(placeholders) == 1:
        return {placeholders[0]: f"{LEARNED_EMBEDS}.safetensors"}
    return {p: f"{LEARNED_EMBEDS}-{i}.safetensors" for i, p in enumerate(placeholders)}


def save_learned_embeds(
    folder: str | os.PathLike,
    vectors: Mapping[str, torch.Tensor],
    token_ids: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write each placeholder's diffusers file into ``folder`` (atomically); the paths written."""
    written = []
    for placeholder, name in learned_embeds_names(list(vectors)).items():
        token_id = token_ids.get(placeholder)
        written.append(save_diffusers(
            Path(folder) / name, diffusers_token(placeholder), vectors[placeholder], placeholder=placeholder,
            token_id=None if token_id is None else int(token_id), metadata=metadata,
        ))
    return written
