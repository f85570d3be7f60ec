"""The vocabulary words nearest to learned vectors (cosine against the text encoder's token-embedding table).

A learned word is readable through its neighbours: a good inversion of an orange cross ends near "orange" and
"cross"; one that ends near a function word of its captions ("on", "a") has learned the caption, not the concept.
"""
from __future__ import annotations

from typing import Any

import torch

# words of the caption templates that carry no content; a learned vector nearest to one of them is a warning sign
FUNCTION_WORDS = ("a", "an", "the", "of", "on", "in", "at", "with", "and", "to", "for", "by", "is")


@torch.no_grad()
def nearest_words(embedder: Any, vectors: torch.Tensor, top: int) -> list[list[tuple[str, float]]]:
    """For each row of ``vectors``, the ``top`` (word, cosine) pairs of the embedder's vocabulary, best first."""
    table = torch.nn.functional.normalize(embedder.token_embedding.weight.detach().float(), dim=-1)
    sims = torch.nn.functional.normalize(vectors.detach().float().to(table.device), dim=-1) @ table.T
    values, ids = sims.topk(min(top, table.shape[0]), dim=-1)
    return [
        [(word.replace("</w>", ""), float(v)) for word, v in zip(embedder.decode_ids(row_ids.tolist()), row_values)]
        for row_values, row_ids in zip(values.cpu(), ids.cpu())
    ]
