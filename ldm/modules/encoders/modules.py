"""Text encoders of the conditioning stage: BERTEmbedder (LDM-1.4B) and FrozenCLIPEmbedder (Stable Diffusion v1);
FrozenOpenCLIPEmbedder (SD 2.x) lives in :mod:`ldm.modules.encoders.open_clip` and is re-exported here, where configs
name it. Their shared base is :mod:`ldm.modules.encoders.base`.

Both map a prompt (a string, a list of strings, or token ids ``[B, 77]``) to ``[B, 77, D]`` hidden states and accept an
``embedding_manager``: a callable ``(token_ids, token_embeddings) -> token_embeddings`` that Textual Inversion uses to
put learned vectors in place of placeholder tokens *before* position embeddings are added.

Differences from the original code, all deliberate:

* ``device`` is accepted for config compatibility but never used: inputs follow the device of the module's parameters.
* Tokenizers are resolved without requiring a network (see :mod:`ldm.modules.encoders.tokenizers`) and only on first
  use, so building a model from a config needs neither network nor tokenizer files.
* The CLIP text model is built from a config without weights (they come from the Stable Diffusion checkpoint), and its
  state-dict keys are ``transformer.text_model.*`` under transformers 4 and 5 alike, as in real SD checkpoints. The
  obsolete ``transformer.text_model.embeddings.position_ids`` entry of 2022 checkpoints is dropped on load.

Both embedders also expose a small uniform API for the EmbeddingManager: ``is_clip``, ``embed_dim``, ``max_length``,
``token_embedding``, ``position_embedding``, ``tokenize``, ``content_token_ids`` and ``decode_ids``.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from ldm.modules.encoders.base import AbstractEncoder, EmbeddingManagerFn, TextInput, _as_texts, _TextEmbedder
from ldm.modules.encoders.open_clip import FrozenOpenCLIPEmbedder
from ldm.modules.encoders.tokenizers import (
    CLIP_HUB_ID,
    LoadedTokenizer,
    hub_file,
    load_bert_tokenizer,
    load_clip_tokenizer,
)
from ldm.modules.x_transformer import Encoder, TransformerWrapper

logger = logging.getLogger(__name__)

POSITION_IDS_KEY = "transformer.text_model.embeddings.position_ids"

# The text tower of openai/clip-vit-large-patch14 (what SD v1 uses), for building it with no config file at hand.
BUILTIN_CLIP_TEXT_CONFIGS: dict[str, dict] = {
    CLIP_HUB_ID: dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        projection_dim=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        pad_token_id=1,
        bos_token_id=49406,
        eos_token_id=49407,
    ),
}


class BERTTokenizer(AbstractEncoder):
    """bert-base-uncased WordPiece tokenization to ``[B, max_length]`` ids, loaded on first use.

    The ids stay on the CPU (``device`` is accepted for config compatibility only); the embedder moves them.
    """

    def __init__(
        self,
        device: str = "cpu",
        vq_interface: bool = True,
        max_length: int = 77,
        tokenizer_path: str | None = None,
    ) -> None:
        super().__init__()
        self.vq_interface = vq_interface
        self.max_length = max_length
        self.tokenizer_path = tokenizer_path

    @property
    def loaded(self) -> LoadedTokenizer:
        return load_bert_tokenizer(self.tokenizer_path)

    @property
    def tokenizer(self):
        """The Hugging Face tokenizer (``BertTokenizerFast``)."""
        return self.loaded.tokenizer

    def forward(self, text: str | Sequence[str]) -> torch.Tensor:
        return self.loaded.ids(_as_texts(text), self.max_length)

    @torch.no_grad()
    def encode(self, text: str | Sequence[str]):
        """Ids, or ``(None, None, [None, None, ids])`` with the VQ-model interface of the original."""
        tokens = self(text)
        return (None, None, [None, None, tokens]) if self.vq_interface else tokens

    def decode(self, text):
        return text


class BERTEmbedder(_TextEmbedder):
    """The LDM-1.4B text encoder: BERT tokenizer + a transformer trained from scratch with the diffusion model."""

    def __init__(
        self,
        n_embed: int,
        n_layer: int,
        vocab_size: int = 30522,
        max_seq_len: int = 77,
        device: str = "cuda",
        use_tokenizer: bool = True,
        embedding_dropout: float = 0.0,
        tokenizer_path: str | None = None,
    ) -> None:
        super().__init__()
        self.use_tknz_fn = use_tokenizer
        self.tknz_fn = BERTTokenizer(vq_interface=False, max_length=max_seq_len, tokenizer_path=tokenizer_path)
        self.transformer = TransformerWrapper(
            num_tokens=vocab_size,
            max_seq_len=max_seq_len,
            attn_layers=Encoder(dim=n_embed, depth=n_layer),
            emb_dropout=embedding_dropout,
        )

    def _loaded_tokenizer(self) -> LoadedTokenizer:
        return self.tknz_fn.loaded

    @property
    def is_clip(self) -> bool:
        return False

    @property
    def max_length(self) -> int:
        return self.tknz_fn.max_length

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.transformer.token_emb

    @property
    def position_embedding(self) -> nn.Embedding | None:
        pos_emb = self.transformer.pos_emb
        return None if pos_emb is None else pos_emb.emb

    def forward(self, text: TextInput, embedding_manager: EmbeddingManagerFn | None = None) -> torch.Tensor:
        if not self.use_tknz_fn and not isinstance(text, torch.Tensor):
            raise TypeError("this BERTEmbedder was built with use_tokenizer=False: pass token ids, not text")
        tokens = self._token_ids(text)
        return self.transformer(tokens, return_embeddings=True, embedding_manager=embedding_manager)


def _config_from_file(config_file: Path):
    from transformers import CLIPTextConfig

    with open(config_file, encoding="utf-8") as handle:
        config = json.load(handle)
    return CLIPTextConfig.from_dict(config.get("text_config", config))


def clip_text_config(version: str):
    """The ``CLIPTextConfig`` for ``version``: a local folder's config.json, the HF cache/hub, or the built-in table.

    The config may be a CLIPTextConfig or a full CLIPConfig (then its ``text_config`` is used). For a hub id with a
    built-in entry the hub is never contacted (only the cache is looked at), so building SD v1 needs no network.
    """
    from transformers import CLIPTextConfig

    local = Path(version).expanduser()
    if local.is_dir():
        return _config_from_file(local / "config.json")
    config_file = hub_file(version, "config.json", allow_network=version not in BUILTIN_CLIP_TEXT_CONFIGS)
    if config_file is not None:
        logger.info("CLIP text config of %s from %s", version, config_file)
        return _config_from_file(config_file)
    if version not in BUILTIN_CLIP_TEXT_CONFIGS:
        raise OSError(f"no CLIP text config for {version!r}: not a local folder, not in the Hugging Face cache/hub")
    logger.info("CLIP text config of %s: built-in", version)
    return CLIPTextConfig(**BUILTIN_CLIP_TEXT_CONFIGS[version])


class _TextModelHolder(nn.Module):
    """Holds a transformers-5 ``CLIPTextModel`` as ``text_model``: keys read ``text_model.*`` as in transformers 4."""

    def __init__(self, text_model: nn.Module) -> None:
        super().__init__()
        self.text_model = text_model

    def forward(self, input_ids: torch.Tensor, **kwargs):
        return self.text_model(input_ids=input_ids, **kwargs)


def build_clip_text_transformer(config) -> nn.Module:
    """A randomly initialised ``CLIPTextModel`` whose state-dict keys start with ``text_model.``.

    Attention runs on ``scaled_dot_product_attention`` (fused kernels on GPU); it agrees with the original's eager
    attention to about 1e-6.
    """
    from transformers import CLIPTextModel

    config._attn_implementation = "sdpa"
    model = CLIPTextModel(config)
    return model if hasattr(model, "text_model") else _TextModelHolder(model)


def _drop_position_ids(state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: discard the obsolete (and sometimes corrupt) ``position_ids`` buffer of 2022 files."""
    state_dict.pop(prefix + POSITION_IDS_KEY, None)


class FrozenCLIPEmbedder(_TextEmbedder):
    """The SD v1 text encoder: CLIP ViT-L/14's frozen text transformer; last hidden state after the final LayerNorm.

    ``text_config`` (a ``CLIPTextConfig`` dict) builds another shape without a config file (tiny test models).
    ``freeze: False`` (as the SD 2.x and SDXL embedders take it) leaves the transformer trainable: for training a small
    model from scratch with its text encoder (``configs/shapes/shapes-sd1-train.yaml``); the real SD v1 encoder, and
    every inference and inversion config, keep the default and stay frozen.
    """

    def __init__(
        self,
        version: str = CLIP_HUB_ID,
        device: str = "cuda",
        max_length: int = 77,
        tokenizer_path: str | None = None,
        text_config: dict | None = None,
        freeze: bool = True,
    ) -> None:
        super().__init__()
        self.version = version
        self.tokenizer_path = tokenizer_path
        self._max_length = max_length
        if text_config is not None:
            from transformers import CLIPTextConfig

            config = CLIPTextConfig(**dict(text_config))
        else:
            config = clip_text_config(version)
        self.transformer = build_clip_text_transformer(config)
        self._register_load_state_dict_pre_hook(_drop_position_ids)
        if freeze:
            self.freeze()

    def freeze(self) -> None:
        self.transformer = self.transformer.eval()
        for param in self.parameters():
            param.requires_grad = False

    def _loaded_tokenizer(self) -> LoadedTokenizer:
        return load_clip_tokenizer(self.version, self.tokenizer_path)

    @property
    def tokenizer(self):
        """The Hugging Face ``CLIPTokenizer``."""
        return self._loaded_tokenizer().tokenizer

    @property
    def is_clip(self) -> bool:
        return True

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.transformer.text_model.embeddings.token_embedding

    @property
    def position_embedding(self) -> nn.Embedding | None:
        return self.transformer.text_model.embeddings.position_embedding

    @contextlib.contextmanager
    def _substitution(self, embedding_manager: EmbeddingManagerFn | None) -> Iterator[None]:
        """While active, the token-embedding output passes through ``embedding_manager(input_ids, embeddings)``."""
        if embedding_manager is None:
            yield
            return

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            return embedding_manager(inputs[0], output).to(output.dtype)

        handle = self.token_embedding.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def forward(self, text: TextInput, embedding_manager: EmbeddingManagerFn | None = None) -> torch.Tensor:
        tokens = self._token_ids(text)
        with self._substitution(embedding_manager):
            return self.transformer(input_ids=tokens).last_hidden_state
