"""One of our Stable Diffusion checkpoints as a diffusers pipeline: the same weights, the same outputs, in the other
stack.

The UNet and the VAE go through diffusers' own converters (``create_unet_diffusers_config_from_ldm``,
``convert_ldm_unet_checkpoint``, ``create_vae_diffusers_config_from_ldm``, ``convert_ldm_vae_checkpoint`` in
``diffusers.loaders.single_file_utils``), which read our inference configs as they are, because our configs and key
layouts are the original's. What we supply is what diffusers would otherwise fetch from the Hugging Face hub (and so
what an offline user lacks): the text encoder's shape as a transformers ``CLIPTextConfig``, the tokenizer (the
project's shipped CLIP vocabulary) and the scheduler (the config's own noise schedule).

* SD v1 (``FrozenCLIPEmbedder``): transformers' ``CLIPTextModel``, weights as they are.
* SD 2.x (``FrozenOpenCLIPEmbedder``): the OpenCLIP text tower as a ``CLIPTextModel`` without the blocks the
  config's ``layer`` skips ("penultimate": diffusers' SD 2.x text encoder has one layer fewer), so its last hidden
  state (after the final LayerNorm) is our conditioning; the tokenizer pads with ``!`` (id 0) as open_clip's does.
* SDXL (the conditioner's two text encoders): CLIP-L as a ``CLIPTextModel`` (diffusers reads its
  ``hidden_states[-2]``, so the config must take the penultimate layer, as SDXL does), OpenCLIP-bigG as a
  ``CLIPTextModelWithProjection`` (``hidden_states[-2]`` without the final LayerNorm, and the projected pooled
  vector); the UNet config is told that its ``label_emb`` is SDXL's size embedding (diffusers' helper guesses that
  from the context width 2048 of the real model, which a smaller model lacks).

diffusers is a test/peer extra: only ``scripts/convert_to_diffusers.py`` and the tests import this module, never
``main.py`` or the generation scripts.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ldm.errors import ConfigError

SD1, SD2, SDXL = "sd1", "sd2", "sdxl"


def model_family(config: DictConfig) -> str:
    """``sd1``, ``sd2`` or ``sdxl`` from the config's text encoder(s); a one-line :class:`ConfigError` for anything
    else (the LDM BERT models have no diffusers pipeline that reads our vectors)."""
    params = config.model.params
    if "conditioner_config" in params:
        return SDXL
    target = str(OmegaConf.select(params, "cond_stage_config.target") or "")
    if target.endswith("FrozenOpenCLIPEmbedder"):
        return SD2
    if target.endswith("FrozenCLIPEmbedder"):
        return SD1
    raise ConfigError(
        f"the config's text encoder is {target or 'missing'}; only Stable Diffusion v1 (FrozenCLIPEmbedder), 2.x "
        "(FrozenOpenCLIPEmbedder) and SDXL (conditioner_config) models have a diffusers pipeline to export to"
    )


def _plain(config: Any) -> Any:
    return OmegaConf.to_container(config, resolve=True) if isinstance(config, (DictConfig, ListConfig)) else config


def _vae_factor(config: DictConfig) -> int:
    return 2 ** (len(config.model.params.first_stage_config.params.ddconfig.ch_mult) - 1)


def _text_entries(config: DictConfig) -> list[tuple[str, DictConfig]]:
    """``[(state-dict prefix, encoder config)]`` of the text encoders, in the order diffusers numbers them."""
    params = config.model.params
    if model_family(config) != SDXL:
        prefix = "cond_stage_model.model." if model_family(config) == SD2 else "cond_stage_model.transformer."
        return [(prefix, params.cond_stage_config)]
    entries = [(i, e) for i, e in enumerate(params.conditioner_config.params.emb_models) if e.get("input_key") == "txt"]
    if len(entries) != 2:
        raise ConfigError(f"an SDXL conditioner has two text encoders (input_key: txt); this config has {len(entries)}")
    (i, clip_l), (j, clip_g) = entries
    return [(f"conditioner.embedders.{i}.transformer.", clip_l), (f"conditioner.embedders.{j}.model.", clip_g)]


def _size_embedding_width(config: DictConfig) -> int:
    """``outdim`` of SDXL's size embedders (256 in the real model): diffusers' ``addition_time_embed_dim``."""
    widths = {int(e.params.outdim) for e in config.model.params.conditioner_config.params.emb_models if e.get("input_key") != "txt"}
    if len(widths) != 1:
        raise ConfigError(f"the SDXL conditioner's size embedders have widths {sorted(widths)}; diffusers takes one")
    return widths.pop()


def diffusers_unet_config(config: DictConfig) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` config of ``config``'s UNet (diffusers' helper; SDXL's size embedding made explicit,
    SD 2.x v-models' attention upcast as in diffusers' own folders)."""
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    unet_config = create_unet_diffusers_config_from_ldm(_plain(config), {})
    unet_config["sample_size"] = int(config.model.params.image_size)
    if unet_config["attention_head_dim"] is None:
        # heads given as channels per head (num_head_channels, the shapes SD models'): diffusers' helper reads that
        # only with linear projections; its "attention_head_dim" is the number of heads, one entry per level
        unet = config.model.params.unet_config.params
        unet_config["attention_head_dim"] = [int(unet.model_channels) * int(m) // int(unet.num_head_channels)
                                             for m in unet.channel_mult]
    if model_family(config) == SD2 and config.model.params.get("parameterization") == "v":
        unet_config["upcast_attention"] = True  # as diffusers' SD 2.x 768-v folders: float32 softmax under float16
    if model_family(config) == SDXL:
        unet_config.update(class_embed_type=None, addition_embed_type="text_time",
                           addition_time_embed_dim=_size_embedding_width(config),
                           projection_class_embeddings_input_dim=int(config.model.params.unet_config.params.adm_in_channels))
    return unet_config


def diffusers_unet(config: DictConfig, state: dict[str, torch.Tensor]) -> Any:
    """diffusers' ``UNet2DConditionModel`` with the weights of ``model.diffusion_model.*``."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet_config = diffusers_unet_config(config)
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(state, unet_config))
    return unet.eval()


def diffusers_vae(config: DictConfig, state: dict[str, torch.Tensor]) -> Any:
    """diffusers' ``AutoencoderKL`` with the weights of ``first_stage_model.*`` and the config's ``scale_factor``."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    vae_config = create_vae_diffusers_config_from_ldm(_plain(config), state)
    vae_config["sample_size"] = int(config.model.params.image_size) * _vae_factor(config)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(state, vae_config))
    return vae.eval()


def _flattened(model: Any, converted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5.6 keeps ``CLIPTextModel``'s modules at the top (no ``text_model.``): drop the prefix there."""
    if hasattr(model, "text_model"):
        return converted
    return {k.removeprefix("text_model."): v for k, v in converted.items()}


def _is_open_clip(encoder: DictConfig) -> bool:
    return not str(encoder.target).endswith("FrozenCLIPEmbedder")


def _clip_text_config(encoder: DictConfig, sdxl: bool) -> Any:
    """CLIP ViT-L's ``CLIPTextConfig`` (SDXL: only if the config reads the penultimate layer, as diffusers does)."""
    from transformers import CLIPTextConfig

    from ldm.modules.encoders.modules import clip_text_config
    from ldm.modules.encoders.tokenizers import CLIP_HUB_ID

    params = encoder.get("params") or {}
    if params.get("text_config") is not None:
        text_config = CLIPTextConfig(**_plain(params.text_config))
    else:
        text_config = clip_text_config(str(params.get("version") or CLIP_HUB_ID))
    if sdxl and (params.get("layer") != "hidden" or params.get("layer_idx") != text_config.num_hidden_layers - 1):
        raise ConfigError(
            f"the SDXL CLIP-L encoder reads layer {params.get('layer')} {params.get('layer_idx')}; diffusers' SDXL pipeline "
            f"reads the penultimate hidden state (layer: hidden, layer_idx: {text_config.num_hidden_layers - 1})"
        )
    return text_config


def _open_clip_text_config(encoder: DictConfig, sdxl: bool) -> Any:
    """An OpenCLIP text tower as a ``CLIPTextConfig``: without the blocks SD 2.x skips, whole for SDXL (diffusers reads
    its penultimate hidden state and its pooled projection there)."""
    from transformers import CLIPTextConfig

    from ldm.modules.encoders.open_clip import FrozenOpenCLIPEmbedder, text_spec

    params = encoder.get("params") or {}
    text_config = params.get("text_config")
    spec = text_spec(str(params.get("arch", "ViT-bigG-14" if sdxl else "ViT-H-14")), None if text_config is None else _plain(text_config))
    skipped = FrozenOpenCLIPEmbedder.LAYERS.index(str(params.get("layer", "last")))
    if sdxl and (skipped != 1 or params.get("legacy", True)):
        raise ConfigError("the SDXL OpenCLIP encoder must read the penultimate layer with legacy: False, as diffusers' SDXL pipeline does")
    return CLIPTextConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.width, intermediate_size=int(spec.width * spec.mlp_ratio),
        num_hidden_layers=spec.layers - (0 if sdxl else skipped), num_attention_heads=spec.heads,
        max_position_embeddings=spec.context_length, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=spec.embed_dim,
        pad_token_id=0, bos_token_id=49406, eos_token_id=49407,
    )


def text_encoder_configs(config: DictConfig) -> list[tuple[str, Any]]:
    """``[(transformers class name, CLIPTextConfig)]`` of the text encoder(s), in diffusers' order."""
    sdxl = model_family(config) == SDXL
    found = []
    for _, encoder in _text_entries(config):
        if _is_open_clip(encoder):
            found.append(("CLIPTextModelWithProjection" if sdxl else "CLIPTextModel", _open_clip_text_config(encoder, sdxl)))
        else:
            found.append(("CLIPTextModel", _clip_text_config(encoder, sdxl)))
    return found


def diffusers_text_encoders(config: DictConfig, state: dict[str, torch.Tensor]) -> list[Any]:
    """The text encoder(s) in diffusers' order (SDXL: CLIP-L, then OpenCLIP-bigG); see the module docstring."""
    import transformers
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    encoders = []
    for (prefix, encoder), (cls_name, text_config) in zip(_text_entries(config), text_encoder_configs(config)):
        model = getattr(transformers, cls_name)(text_config)
        if _is_open_clip(encoder):
            converted = convert_open_clip_checkpoint(model, state, prefix=prefix)
        else:
            converted = convert_ldm_clip_checkpoint(state, remove_prefix=prefix)
        wanted = model.state_dict()
        model.load_state_dict({k: v for k, v in _flattened(model, converted).items() if k in wanted})
        encoders.append(model.eval())
    return encoders


def diffusers_tokenizers(config: DictConfig) -> list[Any]:
    """The CLIP tokenizer of the shipped vocabulary per text encoder; OpenCLIP's pad with ``!`` (id 0) as open_clip does."""
    from ldm.modules.encoders.tokenizers import load_clip_tokenizer

    tokenizers = []
    for _, encoder in _text_entries(config):
        tokenizer = copy.deepcopy(load_clip_tokenizer().tokenizer)  # a copy: the loaded one is shared in the process
        tokenizer.model_max_length = 77
        if _is_open_clip(encoder):
            tokenizer.pad_token = "!"
        tokenizers.append(tokenizer)
    return tokenizers


def diffusers_scheduler(config: DictConfig) -> Any:
    """A DDIM scheduler on the config's noise schedule (our ``linear`` is diffusers' ``scaled_linear``)."""
    from diffusers import DDIMScheduler

    params = config.model.params
    schedule = str(params.get("beta_schedule", "linear"))
    if schedule != "linear":
        raise ConfigError(f"the config's beta_schedule is '{schedule}'; only 'linear' (diffusers' scaled_linear) is exported")
    parameterization = str(params.get("parameterization", "eps"))
    if parameterization not in ("eps", "v"):
        raise ConfigError(f"the config's parameterization is '{parameterization}'; diffusers pipelines take eps or v")
    return DDIMScheduler(
        num_train_timesteps=int(params.get("timesteps", 1000)), beta_start=float(params.get("linear_start", 1e-4)),
        beta_end=float(params.get("linear_end", 2e-2)), beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction" if parameterization == "v" else "epsilon",
    )


def diffusers_pipeline(config: DictConfig, state: dict[str, torch.Tensor]) -> Any:
    """A ``StableDiffusionPipeline`` (no safety checker) or ``StableDiffusionXLPipeline`` (no watermark) with the model
    of ``config`` and ``state``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = dict(vae=diffusers_vae(config, state), unet=diffusers_unet(config, state), scheduler=diffusers_scheduler(config))
    encoders, tokenizers = diffusers_text_encoders(config, state), diffusers_tokenizers(config)
    if model_family(config) == SDXL:
        return StableDiffusionXLPipeline(
            text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizers[0], tokenizer_2=tokenizers[1],
            add_watermarker=False, **parts,
        )
    return StableDiffusionPipeline(text_encoder=encoders[0], tokenizer=tokenizers[0], safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False, **parts)


def export_pipeline(pipeline: Any, out: str | os.PathLike) -> Path:
    """``pipeline.save_pretrained`` into ``out`` through a temporary folder beside it, renamed into place at the end;
    ``out`` must not exist or be empty."""
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"--out '{target}' already exists; name a new folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        pipeline.save_pretrained(temp, safe_serialization=True)
        if target.exists():
            target.rmdir()
        os.replace(temp, target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return target
