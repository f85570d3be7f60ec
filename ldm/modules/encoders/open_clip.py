"""OpenCLIP text towers (Stable Diffusion 2.x: ViT-H-14; SDXL: ViT-bigG-14), key-compatible, without open-clip-torch.

The original code built these with ``open_clip.create_model_and_transforms`` and deleted the vision tower. That
package downloads weights on construction, pulls in the vision models and, from version 2.24 on, runs its text
transformer batch-first, so the original code (which permutes to ``(L, N, D)`` first) silently attends across the
batch with a new open_clip. This module owns its layout instead: the same parameters under the same names
(``model.token_embedding``, ``model.positional_embedding``, ``model.transformer.resblocks.N.*``, ``model.ln_final``,
``model.text_projection``, ``model.logit_scale``), batch-first throughout, causal attention through
``scaled_dot_product_attention``. Weights come from the Stable Diffusion checkpoint; construction needs no network.

Tokenization is OpenAI's CLIP BPE (the vocabulary the project ships) with open_clip's conventions: start token, text,
end token, truncated to 77 with the end token kept last, padded with 0 (not with the end token as the transformers
CLIP tokenizer of SD v1 does; the padding changes the outputs at every position after the text).
"""
from __future__ import annotations

import functools
import html
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldm.errors import ConfigError
from ldm.modules.encoders.base import EmbeddingManagerFn, TextInput, _TextEmbedder
from ldm.modules.encoders.tokenizers import CLIP_HUB_ID, LoadedTokenizer, load_clip_tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenCLIPTextSpec:
    """The shape of an OpenCLIP text tower."""

    width: int
    heads: int
    layers: int
    embed_dim: int
    context_length: int = 77
    vocab_size: int = 49408
    mlp_ratio: float = 4.0


OPEN_CLIP_TEXT_ARCHS: dict[str, OpenCLIPTextSpec] = {
    "ViT-H-14": OpenCLIPTextSpec(width=1024, heads=16, layers=24, embed_dim=1024),  # SD 2.x
    "ViT-bigG-14": OpenCLIPTextSpec(width=1280, heads=20, layers=32, embed_dim=1280),  # SDXL's second encoder
}


def text_spec(arch: str, text_config: Mapping | None = None) -> OpenCLIPTextSpec:
    """The spec of ``arch``, or the explicit ``text_config`` (width, heads, layers, embed_dim, ...) when given."""
    if text_config is not None:
        return OpenCLIPTextSpec(**dict(text_config))
    if arch not in OPEN_CLIP_TEXT_ARCHS:
        known = ", ".join(OPEN_CLIP_TEXT_ARCHS)
        raise ConfigError(f"unknown OpenCLIP arch '{arch}' (known: {known}); or give text_config: {{width, heads, layers, embed_dim}}")
    return OPEN_CLIP_TEXT_ARCHS[arch]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with ``nn.MultiheadAttention``'s parameter names (packed in-projection)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))`` (exact GELU)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(hidden, width))])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _Blocks(nn.Module):
    """Holds ``resblocks`` so the keys read ``transformer.resblocks.N.*`` as in open_clip."""

    def __init__(self, spec: OpenCLIPTextSpec) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(spec.width, spec.heads, spec.mlp_ratio) for _ in range(spec.layers)
        )


class OpenCLIPTextTransformer(nn.Module):
    """The text half of an OpenCLIP model (what Stable Diffusion keeps of it), batch-first."""

    def __init__(self, spec: OpenCLIPTextSpec) -> None:
        super().__init__()
        self.spec = spec
        self.token_embedding = nn.Embedding(spec.vocab_size, spec.width)
        self.positional_embedding = nn.Parameter(torch.empty(spec.context_length, spec.width))
        self.transformer = _Blocks(spec)
        self.ln_final = nn.LayerNorm(spec.width)
        self.text_projection = nn.Parameter(torch.empty(spec.width, spec.embed_dim))
        self.logit_scale = nn.Parameter(torch.full((), math.log(1 / 0.07)))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=spec.width**-0.5)

    def block_outputs(
        self, tokens: torch.Tensor, embedding_manager: EmbeddingManagerFn | None = None, num_blocks: int | None = None
    ) -> list[torch.Tensor]:
        """``[x_0, x_1, ..., x_n]``: the embedded tokens (``x_0``, placeholders substituted, positions added) and the
        output of each of the first ``num_blocks`` blocks (all by default), each ``[B, L, width]``."""
        x = self.token_embedding(tokens)
        if embedding_manager is not None:
            x = embedding_manager(tokens, x).to(x.dtype)
        x = x + self.positional_embedding[: tokens.shape[1]].to(x.dtype)
        outputs = [x]
        for block in self.transformer.resblocks[:num_blocks]:
            outputs.append(block(outputs[-1]))
        return outputs

    def pooled(self, last: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The text embedding: ``ln_final`` of the last block's output at the end token (the largest id), projected."""
        x = self.ln_final(last)
        return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)] @ self.text_projection


@dataclass(frozen=True)
class ZeroPaddedTokenizer(LoadedTokenizer):
    """The CLIP BPE tokenizer with open_clip's conventions: HTML entities unescaped, padding with 0 after the end token."""

    def ids(self, texts: list[str], max_length: int) -> torch.Tensor:
        ids = super().ids([_unescape(t) for t in texts], max_length)
        first_end = (ids == self.tokenizer.eos_token_id).int().argmax(dim=1)
        after_end = torch.arange(ids.shape[1])[None] > first_end[:, None]
        return ids.masked_fill(after_end, 0)

    def content_ids(self, text: str) -> list[int]:
        return super().content_ids(_unescape(text))


def _unescape(text: str) -> str:
    return html.unescape(html.unescape(text))


@functools.lru_cache(maxsize=None)
def load_open_clip_tokenizer(tokenizer_path: str | None = None) -> ZeroPaddedTokenizer:
    """OpenCLIP's tokenizer: the CLIP BPE vocabulary (shipped, or ``tokenizer_path``), zero-padded."""
    base = load_clip_tokenizer(CLIP_HUB_ID, tokenizer_path)
    return ZeroPaddedTokenizer(base.tokenizer, base.source, base.clean)


class FrozenOpenCLIPEmbedder(_TextEmbedder):
    """The SD 2.x text encoder: an OpenCLIP text tower; ``ln_final`` of the last or the penultimate block's output.

    With ``layer="penultimate"`` (every SD 2.x config) the last block is not run. ``arch`` names the tower
    (``ViT-H-14``); ``text_config`` gives another shape explicitly. ``version`` (open_clip's pretrained tag) and
    ``device`` are accepted for config compatibility: the weights come from the checkpoint, inputs follow the
    parameters' device.
    """

    LAYERS = ("last", "penultimate")
    is_clip = True  # CLIP BPE tokens, position embeddings added after the token embeddings
    init_adds_position = False  # a learned word starts at its init word's token embedding (see EmbeddingManager)

    def __init__(
        self,
        arch: str = "ViT-H-14",
        version: str | None = "laion2b_s32b_b79k",
        device: str = "cuda",
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "last",
        text_config: Mapping | None = None,
        tokenizer_path: str | None = None,
    ) -> None:
        super().__init__()
        if layer not in self.LAYERS:
            raise ConfigError(f"FrozenOpenCLIPEmbedder layer must be one of {self.LAYERS}, not '{layer}'")
        self.arch = arch
        self.version = version
        self.layer = layer
        self.layer_idx = self.LAYERS.index(layer)
        self.tokenizer_path = tokenizer_path
        self.max_length = max_length
        self.model = OpenCLIPTextTransformer(text_spec(arch, text_config))
        if freeze:
            self.freeze()

    def freeze(self) -> None:
        self.model.eval().requires_grad_(False)

    def _loaded_tokenizer(self) -> LoadedTokenizer:
        return load_open_clip_tokenizer(self.tokenizer_path)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.model.token_embedding

    @property
    def position_embedding(self) -> SimpleNamespace:
        """The position table as ``.weight`` ``[77, width]`` (open_clip stores it as a bare parameter)."""
        return SimpleNamespace(weight=self.model.positional_embedding)

    def hidden_states(self, text: TextInput, embedding_manager: EmbeddingManagerFn | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Token ids and the block outputs up to the one ``layer`` reads (see ``OpenCLIPTextTransformer.block_outputs``)."""
        tokens = self._token_ids(text)
        num_blocks = len(self.model.transformer.resblocks) - self.layer_idx
        return tokens, self.model.block_outputs(tokens, embedding_manager, num_blocks)

    def forward(self, text: TextInput, embedding_manager: EmbeddingManagerFn | None = None) -> torch.Tensor:
        _, outputs = self.hidden_states(text, embedding_manager)
        return self.model.ln_final(outputs[-1])

