"""What every generation and evaluation command shares: building a model from a config and a checkpoint, loading an
embedding into it, checking prompts, and sampling pictures.

Checkpoints are read through :mod:`ldm.checkpoint` only. Loading is non-strict, as in the original, but a checkpoint
that does not fit the config (most UNet or text-encoder weights missing or of another shape, e.g. a Stable Diffusion
checkpoint given with an LDM config) is a one-line :class:`~ldm.checkpoint.CheckpointError` instead of a model that
silently runs on random weights.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.checkpoint import CheckpointError, load_checkpoint, require_weights
from ldm.config import ConfigError, load_model_config
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SD_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
LDM_CONFIG = "configs/latent-diffusion/txt2img-1p4B-eval_with_tokens.yaml"
SHAPES_CONFIG = "configs/shapes/shapes-ldm-inference.yaml"
# Strings that look like a placeholder: <token>, '*' and '@' (the README's), the Hebrew letters of per-image tokens.
_PLACEHOLDER_LIKE = re.compile(r"<[^<>\s]+>|[*@]|[\u05d0-\u05ea]")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_config_path(config: str | os.PathLike) -> Path:
    """``config`` as given, else relative to the repository (the default configs work from any folder)."""
    path = Path(config)
    if path.is_file():
        return path
    if not path.is_absolute() and (REPO / path).is_file():
        return REPO / path
    raise ConfigError(f"--config: file '{config}' does not exist; pass a model config .yaml (e.g. {SD_CONFIG})")


def load_config(config: str | os.PathLike | DictConfig) -> DictConfig:
    """A model config: ``config`` itself, or the file it names (see :func:`resolve_config_path`)."""
    if isinstance(config, DictConfig):
        return config
    return load_model_config(resolve_config_path(config), "--config", SD_CONFIG)


def load_model_from_config(
    config: str | os.PathLike | DictConfig,
    ckpt: str | os.PathLike,
    device: str | torch.device,
    embedding_path: str | os.PathLike | None = None,
    *,
    ckpt_flag: str = "--ckpt",
) -> Any:
    """A LatentDiffusion model in eval mode on ``device``: built from ``config``, weights from ``ckpt``, embedding loaded.

    Without ``embedding_path`` the config's placeholders are dropped, so a prompt's ``*`` is an ordinary token.
    """
    cfg = load_config(config)
    config_name = str(config) if not isinstance(config, DictConfig) else "<config>"
    checkpoint = load_checkpoint(ckpt, what=ckpt_flag)
    if "global_step" in checkpoint:
        logger.info("checkpoint %s: global step %s", ckpt, checkpoint["global_step"])
    state_dict = require_weights(checkpoint, ckpt, ckpt_flag)
    has_personalization = OmegaConf.select(cfg, "model.params.personalization_config") is not None
    if embedding_path is not None and not has_personalization and learns_words_without_config(cfg):
        cfg = OmegaConf.merge(cfg, {"model": {"params": {"personalization_config": EMBEDDING_ONLY_MANAGER}}})
        has_personalization = True
    if embedding_path is not None and not has_personalization:
        raise ConfigError(f"config '{config_name}' has no personalization_config, so it cannot use --embedding_path; use {LDM_CONFIG} or {SD_CONFIG}")
    model = instantiate_from_config(cfg.model)
    try:
        model.load_pretrained(state_dict, str(ckpt))
    except CheckpointError as err:
        raise CheckpointError(
            f"{err}; or, if the checkpoint is the one you want, pass its config with --config (in use: '{config_name}'; "
            f"the shipped shapes model's is {SHAPES_CONFIG})"
        ) from err
    if getattr(model, "embedding_manager", None) is not None:
        if embedding_path is None:
            model.embedding_manager = None
        else:
            model.embedding_manager.load(embedding_path)
    return model.to(device).eval()


# SD 2.x and SDXL inference configs are the original's, without a personalization_config: with --embedding_path a
# manager is added that the file's placeholders then replace (SDXLDiffusion turns it into one per text encoder).
EMBEDDING_ONLY_MANAGER = {"target": "ldm.modules.embedding_manager.EmbeddingManager", "params": {"placeholder_strings": ["*"]}}


def learns_words_without_config(cfg: DictConfig) -> bool:
    """Whether ``cfg`` is an SD 2.x (OpenCLIP) or SDXL model, whose embeddings need no personalization_config."""
    target = str(OmegaConf.select(cfg, "model.target") or "")
    encoder = str(OmegaConf.select(cfg, "model.params.cond_stage_config.target") or "")
    return target.endswith("SDXLDiffusion") or "FrozenOpenCLIPEmbedder" in encoder


def text_encoder(model: Any) -> Any:
    """The model's (first) text encoder: ``cond_stage_model``, or SDXL's CLIP-L."""
    encoder = getattr(model, "cond_stage_model", None)
    return encoder if encoder is not None else model.cond_stage_text_encoder


def prompt_conditioning(model: Any, prompts: list[str], height: int, width: int) -> Any:
    """The conditioning of ``prompts``; SDXL's with the size conditioning of generation: original = target = (H, W),
    crop (0, 0)."""
    if hasattr(model, "size_batch"):
        return model.get_learned_conditioning(model.size_batch(prompts, height, width))
    return model.get_learned_conditioning(prompts)


def precision_context(precision: str, device: str | torch.device) -> contextlib.AbstractContextManager:
    """``full``: nothing; ``autocast``: bf16 autocast on the CPU, fp16 on CUDA/MPS."""
    if precision == "full":
        return contextlib.nullcontext()
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16 if kind == "cpu" else torch.float16)


def _manager(model: Any) -> Any:
    return getattr(model, "embedding_manager", None)


def prompt_warnings(model: Any, prompt: str) -> list[str]:
    """One-line warnings for a prompt: placeholders the embedding does not define, and truncation past 77 tokens."""
    manager = _manager(model)
    defined = list(manager.string_to_token_dict) if manager is not None else []
    warnings = []
    undefined = sorted({m.group(0) for m in _PLACEHOLDER_LIKE.finditer(prompt)} - set(defined))
    for word in undefined:
        if defined:
            names = ", ".join(f"'{p}'" for p in defined)
            warnings.append(f"prompt {prompt!r} uses '{word}', which the embedding does not define (it defines {names}); it is read as an ordinary word")
        else:
            warnings.append(f"prompt {prompt!r} uses '{word}' but no embedding is loaded (--embedding_path); it is read as an ordinary word")
    embedder = text_encoder(model)
    length, ids = expanded_length(model, prompt)
    if length > embedder.max_length:
        warnings.append(
            f"prompt {prompt!r} is {length} tokens long after expanding multi-vector placeholders ({ids} before); "
            f"the text encoder reads {embedder.max_length}, the rest is cut"
        )
    return warnings


def expanded_length(model: Any, prompt: str) -> tuple[int, int]:
    """(tokens the encoder would need for ``prompt`` with every placeholder expanded to its K vectors, plain count);
    both include the start and end tokens."""
    ids = text_encoder(model).content_token_ids(prompt)
    manager = _manager(model)
    extra = 0
    if manager is not None:
        for placeholder, token in manager.string_to_token_dict.items():
            k = manager.string_to_param_dict[placeholder].shape[0]
            extra += (k - 1) * ids.count(int(token))
    return len(ids) + extra + 2, len(ids) + 2


def latent_factor(model: Any) -> int:
    """The first stage's downsampling: a space-to-depth first stage states it; an autoencoder halves per level."""
    stated = getattr(getattr(model, "first_stage_model", None), "factor", None)
    return int(stated) if stated else 2 ** int(getattr(model, "num_downs", 3))


def latent_shape(model: Any, height: int, width: int, channels: int | None = None, factor: int | None = None) -> tuple[int, int, int]:
    """``(C, H/f, W/f)``; ``C`` and ``f`` default to the model's (latent channels, autoencoder downsampling)."""
    channels = channels or int(model.channels)
    factor = factor or latent_factor(model)
    if height % factor or width % factor:
        raise ConfigError(f"--H {height} / --W {width} must be multiples of the downsampling factor {factor} (--f)")
    return channels, height // factor, width // factor


@torch.no_grad()
def sample_images(
    model: Any,
    prompts: Sequence[str],
    *,
    steps: int = 50,
    eta: float = 0.0,
    scale: float = 7.5,
    H: int = 512,
    W: int = 512,
    sampler: str = "ddim",
    generator: torch.Generator | None = None,
    x_T: torch.Tensor | None = None,
    C: int | None = None,
    f: int | None = None,
    verbose: bool = True,
) -> torch.Tensor:
    """Pictures ``[len(prompts), 3, H, W]`` in [0, 1] (classifier-free guidance with ``""`` when ``scale != 1``; on
    SDXL ``""`` is the all-zero text conditioning)."""
    from ldm.models.diffusion.ddim import DDIMSampler
    from ldm.models.diffusion.plms import PLMSSampler

    samplers = {"ddim": DDIMSampler, "plms": PLMSSampler}
    if sampler not in samplers:
        raise ConfigError(f"unknown sampler '{sampler}'; choose ddim or plms")
    shape = latent_shape(model, H, W, C, f)
    n = len(prompts)
    uc = prompt_conditioning(model, n * [""], H, W) if scale != 1.0 else None
    cond = prompt_conditioning(model, list(prompts), H, W)
    latents, _ = samplers[sampler](model).sample(
        S=steps, batch_size=n, shape=shape, conditioning=cond, verbose=verbose, eta=eta,
        unconditional_guidance_scale=scale, unconditional_conditioning=uc, x_T=x_T, generator=generator,
    )
    images = model.decode_first_stage(latents)
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


@contextlib.contextmanager
def inference_scope(model: Any, precision: str, device: str | torch.device) -> Iterator[None]:
    """``no_grad`` + the precision context + the model's EMA scope (a no-op without EMA), as the original scripts."""
    with torch.no_grad(), precision_context(precision, device), model.ema_scope():
        yield
