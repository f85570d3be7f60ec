"""SDXL's conditioning: two text encoders and the size embeddings, behind the original's ``GeneralConditioner``.

SDXL base conditions on (in this order, as the released file's ``conditioner.embedders.N``):

0. CLIP ViT-L/14 text (``FrozenCLIPEmbedder``, transformers ``CLIPTextModel``): the hidden states after layer 11
   of 12, no final LayerNorm; tokens padded with the end token, as SD v1.
1. OpenCLIP ViT-bigG-14 text (``FrozenOpenCLIPEmbedder2``): the penultimate block's output WITHOUT ``ln_final``,
   and the pooled text embedding (``ln_final`` of the last block at the end token, times ``text_projection``);
   tokens padded with 0.
2-4. ``ConcatTimestepEmbedderND`` of the original size, the crop's top-left corner and the target size: the
   sinusoidal embedding (cos half, then sin) of each of the two numbers, concatenated.

:class:`GeneralConditioner` runs them on a batch dict and concatenates the outputs by rank: 3-D outputs along the
feature axis into ``crossattn`` (CLIP-L first: 768 + 1280 = 2048 wide), 2-D ones into ``vector`` (1280 + 3 x 2 x 256 =
2816 wide), which the UNet's ``label_emb`` takes.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch
from einops import rearrange
from torch import nn

from ldm.errors import ConfigError
from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.modules.encoders.base import EmbeddingManagerFn, TextInput
from ldm.modules.encoders.modules import FrozenCLIPEmbedder as _SDv1CLIPEmbedder
from ldm.modules.encoders.open_clip import FrozenOpenCLIPEmbedder
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

EmbedderOutput = torch.Tensor | tuple[torch.Tensor, ...]


class FrozenCLIPEmbedder(_SDv1CLIPEmbedder):
    """CLIP text encoder with the original sgm options: ``layer`` "last" (SD v1's output), "pooled" or "hidden"
    (``hidden_states[layer_idx]``: SDXL uses 11 of the 12 layers' outputs, no final LayerNorm)."""

    LAYERS = ("last", "pooled", "hidden")
    init_adds_position = False  # SDXL: a learned word starts at its init word's token embedding (see EmbeddingManager)

    def __init__(
        self,
        version: str = "openai/clip-vit-large-patch14",
        device: str = "cuda",
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "last",
        layer_idx: int | None = None,
        always_return_pooled: bool = False,
        tokenizer_path: str | None = None,
        text_config: Mapping | None = None,
    ) -> None:
        super().__init__(version, device, max_length, tokenizer_path, text_config)
        if layer not in self.LAYERS:
            raise ConfigError(f"FrozenCLIPEmbedder layer must be one of {self.LAYERS}, not '{layer}'")
        if layer == "hidden":
            n_layers = self.transformer.text_model.config.num_hidden_layers
            if layer_idx is None or not 0 <= layer_idx <= n_layers:
                raise ConfigError(f'layer "hidden" needs layer_idx in 0..{n_layers} (the hidden state to return)')
        self.layer = layer
        self.layer_idx = layer_idx
        self.return_pooled = always_return_pooled
        if not freeze:
            self.transformer.train()
            self.transformer.requires_grad_(True)

    def forward(self, text: TextInput, embedding_manager: EmbeddingManagerFn | None = None) -> EmbedderOutput:
        tokens = self._token_ids(text)
        with self._substitution(embedding_manager):
            out = self.transformer(input_ids=tokens, output_hidden_states=self.layer == "hidden")
        if self.layer == "last":
            z = out.last_hidden_state
        elif self.layer == "pooled":
            z = out.pooler_output[:, None, :]
        else:
            z = out.hidden_states[self.layer_idx]
        return (z, out.pooler_output) if self.return_pooled else z


class FrozenOpenCLIPEmbedder2(FrozenOpenCLIPEmbedder):
    """SDXL's OpenCLIP text encoder (ViT-bigG-14).

    ``legacy=False`` (SDXL): the context is the chosen block's output WITHOUT ``ln_final``; with
    ``always_return_pooled`` the pooled, projected text embedding comes too. ``legacy=True`` behaves as SD 2.x's
    :class:`FrozenOpenCLIPEmbedder`.
    """

    def __init__(
        self,
        arch: str = "ViT-bigG-14",
        version: str | None = "laion2b_s39b_b160k",
        device: str = "cuda",
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "last",
        always_return_pooled: bool = False,
        legacy: bool = True,
        text_config: Mapping | None = None,
        tokenizer_path: str | None = None,
    ) -> None:
        super().__init__(arch, version, device, max_length, freeze, layer, text_config, tokenizer_path)
        if always_return_pooled and legacy:
            raise ConfigError("FrozenOpenCLIPEmbedder2: always_return_pooled needs legacy: False")
        self.return_pooled = always_return_pooled
        self.legacy = legacy

    def forward(self, text: TextInput, embedding_manager: EmbeddingManagerFn | None = None) -> EmbedderOutput:
        if self.legacy:
            return super().forward(text, embedding_manager)
        tokens = self._token_ids(text)
        outputs = self.model.block_outputs(tokens, embedding_manager)
        z = outputs[-1 - self.layer_idx]
        return (z, self.model.pooled(outputs[-1], tokens)) if self.return_pooled else z


class ConcatTimestepEmbedderND(nn.Module):
    """``[B, d]`` numbers (e.g. a height and a width) -> ``[B, d * outdim]``: each number's sinusoidal embedding."""

    def __init__(self, outdim: int) -> None:
        super().__init__()
        self.outdim = outdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 1:
            x = x[:, None]
        if x.ndim != 2:
            raise ValueError(f"ConcatTimestepEmbedderND takes [B, d] numbers, got shape {tuple(x.shape)}")
        emb = timestep_embedding(rearrange(x, "b d -> (b d)"), self.outdim)
        return rearrange(emb, "(b d) e -> b (d e)", b=x.shape[0])


class GeneralConditioner(nn.Module):
    """The original's conditioner: ``embedders`` run on the batch keys they name; outputs concatenated by rank.

    Each ``emb_models`` entry is a config (``target``, ``params``) plus ``input_key`` (or ``input_keys``),
    ``is_trainable`` (default False: frozen, run without gradients) and ``ucg_rate`` (probability of zeroing that
    embedder's output per sample, for classifier-free-guidance training; applied on every call as in the original, so
    inference configs set none). ``forward(batch)`` returns ``{"crossattn": [B, L, sum of widths],
    "vector": [B, sum of widths]}`` (and ``concat`` for 4-D outputs).
    """

    OUTPUT_DIM2KEYS = {2: "vector", 3: "crossattn", 4: "concat", 5: "concat"}
    KEY2CATDIM = {"vector": 1, "crossattn": 2, "concat": 1}

    def __init__(self, emb_models: Sequence[Mapping]) -> None:
        super().__init__()
        embedders = []
        for n, config in enumerate(emb_models):
            embedder = instantiate_from_config(config)
            embedder.is_trainable = bool(config.get("is_trainable", False))
            embedder.ucg_rate = float(config.get("ucg_rate", 0.0))
            if config.get("legacy_ucg_val", None) is not None:
                raise ConfigError(f"emb_models[{n}]: legacy_ucg_val is not supported; use ucg_rate")
            if "input_key" in config:
                embedder.input_keys = [config["input_key"]]
            elif "input_keys" in config:
                embedder.input_keys = list(config["input_keys"])
            else:
                raise KeyError(f"emb_models[{n}] ({config.get('target')}) needs input_key or input_keys")
            if not embedder.is_trainable:
                embedder.eval().requires_grad_(False)
            embedders.append(embedder)
        self.embedders = nn.ModuleList(embedders)

    def text_embedders(self) -> list[tuple[int, nn.Module]]:
        """``(index, embedder)`` of the text encoders (those reading ``txt``): where a learned word needs a vector."""
        return [(i, e) for i, e in enumerate(self.embedders) if e.input_keys == ["txt"]]

    def forward(
        self,
        batch: Mapping[str, Any],
        force_zero_embeddings: Sequence[str] = (),
        embedding_managers: Mapping[int, EmbeddingManagerFn] | None = None,
        zero_samples: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Conditioning of ``batch``; ``embedding_managers`` maps an embedder's index to the callable that puts the
        learned vectors into its token embeddings (gradients then flow to them although the embedder is frozen).

        ``force_zero_embeddings`` zeroes the outputs of the embedders reading those keys for every sample;
        ``zero_samples`` (input key -> boolean ``[B]``) only for the samples marked, in the same pass: an SDXL batch
        with a few empty captions (caption dropout) then costs one run of the text encoders, not two."""
        managers = dict(embedding_managers or {})
        zero_masks = dict(zero_samples or {})
        output: dict[str, torch.Tensor] = {}
        for n, embedder in enumerate(self.embedders):
            inputs = [self._on_device(batch[k]) for k in embedder.input_keys]
            kwargs = {"embedding_manager": managers[n]} if n in managers else {}
            with torch.set_grad_enabled(torch.is_grad_enabled() and (embedder.is_trainable or n in managers)):
                out = embedder(*inputs, **kwargs)
            for emb in out if isinstance(out, (list, tuple)) else [out]:
                key = self.OUTPUT_DIM2KEYS[emb.dim()]
                if embedder.ucg_rate > 0.0:
                    keep = torch.bernoulli((1.0 - embedder.ucg_rate) * torch.ones(emb.shape[0], device=emb.device))
                    emb = keep.view(-1, *([1] * (emb.dim() - 1))) * emb
                if any(k in force_zero_embeddings for k in embedder.input_keys):
                    emb = torch.zeros_like(emb)
                for k in embedder.input_keys:
                    if k in zero_masks:
                        marked = self._on_device(zero_masks[k]).view(-1, *([1] * (emb.dim() - 1)))
                        emb = torch.where(marked, torch.zeros_like(emb), emb)
                output[key] = torch.cat((output[key], emb), self.KEY2CATDIM[key]) if key in output else emb
        return output

    def _on_device(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(self._device())
        return value

    def _device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        return torch.device("cpu")
