"""How much a learned word overrides the rest of a prompt: an editability signal a real run can compute.

A learned word that fails editability in the shapes world still reconstructs its concept, but "a photo of a * on a
blue background" comes out on a muted gray-blue: the word carries the training pictures' background and wins over
the named one. No judge exists for a real model, so this module measures the override from what every
LatentDiffusion-family model has (the text encoder with the embedding manager, and the denoiser), for prompts that
put the word next to a context phrase (``"a photo of a * on a blue background"``), against the same prompts with the
init word's vectors in place (what the prompt meant before training):

* ``text_override``: the mean squared change of the text encoder's outputs outside the placeholder's own rows,
  relative to their mean square (the context regulariser's quantity, read on prompts it was not trained on);
* ``text_contrast``: how far the context rows of prompts that differ only in their context phrase stay apart,
  relative to the same distance with the init word (below 1: the word blurs the difference the phrase makes);
  ``text_contrast_min``: the same for the one context the word blurs most;
* ``unet_contrast`` (``_min``): the same ratios on the denoiser's prediction from fixed noise at high timesteps
  (where sampling decides the background), i.e. how much naming a context still moves what the model draws.

Everything runs without gradients and draws its noise from a seeded generator (same vectors, same numbers).
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import torch


def set_reference(model: Any, init_word: str) -> None:
    """Give every placeholder without init-word vectors (a word loaded from a file, not trained here) ``init_word``'s,
    as many rows as it has vectors: the reference the signals compare with."""
    manager = model.embedding_manager
    for placeholder, vectors in manager.string_to_param_dict.items():
        if placeholder not in manager.initial_embeddings:
            rows = manager.initial_vectors(init_word, vectors.shape[0]).to(vectors.device)
            manager.initial_embeddings[placeholder] = torch.nn.Parameter(rows, requires_grad=False)


def _conditioning(model: Any, prompts: Sequence[str], initial: bool) -> torch.Tensor:
    manager = model.embedding_manager
    if initial:
        with manager.initial_vectors_in_place():
            return model.get_learned_conditioning(list(prompts))
    return model.get_learned_conditioning(list(prompts))


def _context_mask(model: Any, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    """Bool ``[B, N]``: the rows not filled by learned vectors."""
    tokens = model.cond_stage_model.tokenize(list(prompts)).to(device)
    return ~model.embedding_manager.substitution_mask(tokens)


@torch.no_grad()
def text_override(model: Any, prompts: Sequence[str]) -> float:
    """Mean squared change of the context rows by the learned vectors, over their mean square with the init word."""
    learned, initial = _conditioning(model, prompts, False), _conditioning(model, prompts, True)
    keep = _context_mask(model, prompts, learned.device)
    change = (learned - initial).pow(2).mean(dim=-1)[keep].mean()
    return float(change / initial.pow(2).mean(dim=-1)[keep].mean())


def _pairwise(rows: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, B]``: the mean squared difference between every two prompts' rows (``rows`` ``[B, N, ...]``; with
    ``mask`` ``[B, N]``, only the rows both prompts keep)."""
    count = rows.shape[0]
    out = torch.zeros(count, count, dtype=torch.float64)
    for a, b in itertools.combinations(range(count), 2):
        diff = (rows[a] - rows[b]).pow(2).reshape(rows.shape[1], -1).mean(dim=-1)
        out[a, b] = out[b, a] = (diff[mask[a] & mask[b]] if mask is not None else diff).mean().double()
    return out


def _ratios(learned: torch.Tensor, initial: torch.Tensor) -> tuple[float, float]:
    """Learned over init-word spread: over all pairs, and the smallest per prompt (the context the word blurs most)."""
    count = learned.shape[0]
    if count < 2:
        raise ValueError("the contrast signals need at least two prompts that differ in their context phrase")
    per_prompt = learned.sum(dim=1) / initial.sum(dim=1)
    return float(learned.sum() / initial.sum()), float(per_prompt.min())


@torch.no_grad()
def text_contrast(model: Any, prompts: Sequence[str]) -> tuple[float, float]:
    """How far prompts differing only in their context phrase stay apart in the encoder's context rows, learned word
    over init word: over all pairs, and for the prompt whose context it blurs most."""
    mask = _context_mask(model, prompts, next(model.parameters()).device)
    return _ratios(_pairwise(_conditioning(model, prompts, False), mask), _pairwise(_conditioning(model, prompts, True), mask))


def _predictions(model: Any, cond: torch.Tensor, noise: torch.Tensor, timesteps: Sequence[int]) -> torch.Tensor:
    """``[B, T, ...]``: the denoiser's prediction for every prompt from the same noise, at each timestep."""
    out = []
    for t in timesteps:
        x = noise.expand(cond.shape[0], *noise.shape[1:])
        out.append(model.apply_model(x, torch.full((cond.shape[0],), int(t), device=noise.device, dtype=torch.long), cond))
    return torch.stack(out, dim=1)


@torch.no_grad()
def unet_contrast(model: Any, prompts: Sequence[str], timesteps: Sequence[int] = (999, 900, 800),
                  seed: int = 0) -> tuple[float, float]:
    """How much the prompts' different context phrases move the denoiser's prediction from one fixed noise, learned
    word over init word: over all pairs, and for the prompt whose context it mutes most."""
    device = next(model.parameters()).device
    shape = (1, model.channels, model.image_size, model.image_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    learned = _pairwise(_predictions(model, _conditioning(model, prompts, False), noise, timesteps))
    return _ratios(learned, _pairwise(_predictions(model, _conditioning(model, prompts, True), noise, timesteps)))


def override_signals(model: Any, prompts: Sequence[str]) -> dict[str, float]:
    """Every signal for ``prompts`` (the word next to different context phrases)."""
    text, text_min = text_contrast(model, prompts)
    unet, unet_min = unet_contrast(model, prompts)
    return {"text_override": text_override(model, prompts), "text_contrast": text, "text_contrast_min": text_min,
            "unet_contrast": unet, "unet_contrast_min": unet_min}
