"""The BERT-style text transformer of LDM-1.4B (``text2img-large``).

CompVis conditioned their 1.45B text-to-image model on a transformer trained from scratch, built from a copy of an early
version of lucidrains' *x-transformers*. This module re-implements the subset that model uses: a bidirectional,
pre-norm encoder (LayerNorm -> multi-head attention -> residual, LayerNorm -> GELU feed-forward -> residual) behind
learned absolute position embeddings, and a final LayerNorm. The attribute names reproduce the original state-dict
keys exactly (``token_emb``, ``pos_emb.emb``, ``attn_layers.layers.{i}.{0,1}``, ``norm``, ``to_logits``) so the
public checkpoint loads unchanged.

Textual Inversion hooks in at the token-embedding level: :meth:`TransformerWrapper.forward` accepts an
``embedding_manager`` that may replace placeholder-token embeddings before the position embeddings are added.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

DEFAULT_DIM_HEAD = 64

EmbeddingManagerFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class AbsolutePositionalEmbedding(nn.Module):
    """Learned position embeddings, one per position up to ``max_seq_len``."""

    def __init__(self, dim: int, max_seq_len: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the embeddings of positions ``0 .. x.shape[1]-1`` as ``[1, n, dim]``."""
        positions = torch.arange(x.shape[1], device=x.device)
        return self.emb(positions)[None, :, :]


class Residual(nn.Module):
    """Adds the branch input back to the branch output (no parameters)."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return x + residual


class FeedForward(nn.Module):
    """``Linear -> GELU (exact) -> Dropout -> Linear``, with the original's nesting (``net.0.0``, ``net.2``)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = int(dim * mult)
        self.net = nn.Sequential(
            nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU()),
            nn.Dropout(dropout),
            nn.Linear(inner_dim, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Bidirectional multi-head self-attention; q/k/v without bias, output projection with bias."""

    def __init__(self, dim: int, dim_head: int = DEFAULT_DIM_HEAD, heads: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = dim_head * heads
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_k = nn.Linear(dim, inner_dim, bias=False)
        self.to_v = nn.Linear(dim, inner_dim, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.to_out = nn.Linear(inner_dim, dim)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend over ``x`` ``[b, n, dim]``; ``mask`` ``[b, n]`` (True = keep) masks queries and keys."""
        q, k, v = (self._split_heads(proj(x)) for proj in (self.to_q, self.to_k, self.to_v))
        dots = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        if mask is not None:
            pair_mask = mask[:, None, :, None] & mask[:, None, None, :]
            dots = dots.masked_fill(~pair_mask, -torch.finfo(dots.dtype).max)
        attn = self.dropout(dots.softmax(dim=-1))
        out = torch.matmul(attn, v)
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class Encoder(nn.Module):
    """Pre-norm bidirectional transformer: ``depth`` x ([LayerNorm, Attention, Residual], [LayerNorm, FeedForward,
    Residual]).

    Keyword names follow x-transformers (``attn_*`` go to :class:`Attention`, ``ff_*`` to :class:`FeedForward`).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int = 8,
        attn_dim_head: int = DEFAULT_DIM_HEAD,
        attn_dropout: float = 0.0,
        ff_mult: int = 4,
        ff_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.depth = depth
        self.layers = nn.ModuleList()
        for _ in range(depth):
            attention = Attention(dim, dim_head=attn_dim_head, heads=heads, dropout=attn_dropout)
            feed_forward = FeedForward(dim, mult=ff_mult, dropout=ff_dropout)
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), attention, Residual()]))
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), feed_forward, Residual()]))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for norm, block, residual_fn in self.layers:
            residual = x
            h = norm(x)
            h = block(h, mask=mask) if isinstance(block, Attention) else block(h)
            x = residual_fn(h, residual)
        return x


class TransformerWrapper(nn.Module):
    """Token + position embeddings, an :class:`Encoder`, a final LayerNorm and (unused for LDM) a logits head."""

    def __init__(
        self,
        *,
        num_tokens: int,
        max_seq_len: int,
        attn_layers: Encoder,
        emb_dim: int | None = None,
        max_mem_len: int = 0,
        emb_dropout: float = 0.0,
        num_memory_tokens: int | None = None,
        tie_embedding: bool = False,
        use_pos_emb: bool = True,
    ) -> None:
        super().__init__()
        if max_mem_len or num_memory_tokens:
            raise ValueError("memory tokens / memories are not supported (no LDM config uses them)")
        dim = attn_layers.dim
        emb_dim = dim if emb_dim is None else emb_dim
        self.max_seq_len = max_seq_len
        self.num_tokens = num_tokens
        self.token_emb = nn.Embedding(num_tokens, emb_dim)
        self.pos_emb = AbsolutePositionalEmbedding(emb_dim, max_seq_len) if use_pos_emb else None
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.project_emb = nn.Linear(emb_dim, dim) if emb_dim != dim else nn.Identity()
        self.attn_layers = attn_layers
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.to_logits = None if tie_embedding else nn.Linear(dim, num_tokens)

    def embed(self, x: torch.Tensor, embedding_manager: EmbeddingManagerFn | None = None) -> torch.Tensor:
        """Token embeddings (optionally edited by ``embedding_manager(ids, embeddings)``) plus position embeddings."""
        h = self.token_emb(x)
        if embedding_manager is not None:
            h = embedding_manager(x, h).to(h.dtype)
        if self.pos_emb is not None:
            h = h + self.pos_emb(h)
        return self.project_emb(self.emb_dropout(h))

    def forward(
        self,
        x: torch.Tensor,
        return_embeddings: bool = False,
        mask: torch.Tensor | None = None,
        embedding_manager: EmbeddingManagerFn | None = None,
    ) -> torch.Tensor:
        """Encode token ids ``x`` ``[b, n]``: hidden states ``[b, n, dim]`` if ``return_embeddings``, else logits."""
        h = self.embed(x, embedding_manager)
        h = self.norm(self.attn_layers(h, mask=mask))
        if return_embeddings:
            return h
        if self.to_logits is None:
            return h @ self.token_emb.weight.t()
        return self.to_logits(h)
