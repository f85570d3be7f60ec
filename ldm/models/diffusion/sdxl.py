"""SDXL as a LatentDiffusion: the released file's keys, the original's conditioning, this project's samplers.

The original (Stability-AI/generative-models) wraps the UNet in a ``DiffusionEngine`` with a ``denoiser`` that works
in sigma space. For SDXL base that denoiser (``DiscreteDenoiser`` with ``EpsScaling`` and the legacy DDPM
discretization) feeds the UNet exactly ``x_t`` at the integer timestep ``t`` and reads its output as the noise, so the
model here is an ordinary eps-predicting latent diffusion model over the scaled-linear schedule, and the DDIM/PLMS
samplers, losses and schedule of SD v1 apply unchanged. What differs is kept key-compatible:

* the conditioning stage is ``conditioner`` (a :class:`~ldm.modules.encoders.sdxl.GeneralConditioner`), giving
  ``{"crossattn", "vector"}``; the UNet receives ``context=crossattn`` and ``y=vector`` (``conditioning_key:
  crossattn-adm``);
* the released files hold no schedule buffers: they are computed from the config (not saved);
* ``denoiser.sigmas`` = sqrt((1 - abar) / abar) is provided, and accepted from a file that carries it.

Textual inversion (a ``personalization_config``): a placeholder learns a vector set in each text encoder (see
:class:`~ldm.modules.embedding_manager_sdxl.SDXLEmbeddingManager`). Training batches carry the size conditioning the
trainers users know feed: each image's original size, the top-left corner of the crop the preprocessing took (in
pixels of the training resolution; mirrored with the flip) and the target size (datasets with ``size_conditioning:
true``; else the training size and no crop). The VAE runs in float32 (or bf16), never float16: SDXL's autoencoder
overflows in float16. An empty prompt is the all-zero text conditioning, as the reference sampling code and diffusers
use for an empty negative prompt; the size embeddings stay.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ldm.errors import ConfigError
from ldm.models.diffusion.ddpm import LatentDiffusion, freeze_module
from ldm.models.diffusion.schedule import SCHEDULE_BUFFERS
from ldm.modules.diffusionmodules.util import set_gradient_checkpointing
from ldm.modules.embedding_manager_sdxl import SDXLEmbeddingManager
from ldm.provenance import embedding_record
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
MANAGER_TARGETS = ("ldm.modules.embedding_manager.EmbeddingManager", "ldm.modules.embedding_manager_sdxl.SDXLEmbeddingManager")


class DiscreteDenoiser(nn.Module):
    """Holds ``sigmas`` (ascending, one per DDPM timestep) as the original's denoiser does; not saved, but a file's
    ``denoiser.sigmas`` is accepted (and compared with the config's schedule)."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        ac = alphas_cumprod.detach().to("cpu", torch.float64)
        self.register_buffer("sigmas", ((1 - ac) / ac).sqrt().float(), persistent=False)
        self._register_load_state_dict_pre_hook(self._accept_sigmas)

    def _accept_sigmas(self, state_dict: dict, prefix: str, *args: Any) -> None:
        theirs = state_dict.pop(prefix + "sigmas", None)
        if theirs is None or theirs.is_meta or self.sigmas.is_meta:
            return
        if theirs.shape != self.sigmas.shape or not torch.allclose(theirs.float().cpu(), self.sigmas.cpu(), rtol=1e-4):
            logger.warning("the checkpoint's denoiser.sigmas differ from the config's schedule; the config's are used")


class SDXLDiffusion(LatentDiffusion):
    """SDXL base (and models of its layout): UNet with ``label_emb``, the conditioner, the KL autoencoder.

    ``conditioner_config`` replaces ``cond_stage_config``; ``size`` is the default image size (height = width, in
    pixels) used for the size conditioning when plain prompts are given. Defaults are SDXL base's.
    """

    def __init__(
        self,
        conditioner_config: Any,
        first_stage_config: Any,
        unet_config: Any,
        scale_factor: float = 0.13025,
        conditioning_key: str = "crossattn-adm",
        linear_start: float = 0.00085,
        linear_end: float = 0.012,
        timesteps: int = 1000,
        first_stage_key: str = "jpg",
        cond_stage_key: str = "txt",
        image_size: int = 128,
        channels: int = 4,
        use_ema: bool = False,
        size: int | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("unfreeze_model", False):
            raise ConfigError("model.params.unfreeze_model is not supported on SDXL: only the learned words train; set it to False")
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", [])
        # the learned words start from the loaded token tables: personalization comes after the weights
        personalization_config = kwargs.pop("personalization_config", None)
        gradient_checkpointing = kwargs.pop("gradient_checkpointing", None)
        super().__init__(
            first_stage_config,
            conditioner_config,
            conditioning_key=conditioning_key,
            scale_factor=scale_factor,
            unet_config=unet_config,
            linear_start=linear_start,
            linear_end=linear_end,
            timesteps=timesteps,
            first_stage_key=first_stage_key,
            cond_stage_key=cond_stage_key,
            image_size=image_size,
            channels=channels,
            use_ema=use_ema,
            **kwargs,
        )
        self.size = size or image_size * 2 ** self.num_downs
        self.denoiser = DiscreteDenoiser(self.alphas_cumprod)
        if ckpt_path:
            self.init_from_ckpt(ckpt_path, ignore_keys)
            self.restarted_from_ckpt = True
        if personalization_config is not None:
            self.setup_personalization(personalization_config)
        if gradient_checkpointing is None and self.inverting:
            gradient_checkpointing = False  # as for SD v1 (see LatentDiffusion)
        if gradient_checkpointing is not None:
            set_gradient_checkpointing(self.model, gradient_checkpointing)

    def register_schedule(self, *args: Any, **kwargs: Any) -> None:
        """The DDPM buffers, computed from the config and not saved (the released files hold none of them)."""
        super().register_schedule(*args, **kwargs)
        for name in SCHEDULE_BUFFERS:
            self.register_buffer(name, getattr(self, name), persistent=False)

    def setup_personalization(self, personalization_config: Any) -> None:
        """Freeze the model (unless ``unfreeze_model``) and learn each placeholder in both text encoders."""
        target = personalization_config.get("target")
        if target not in MANAGER_TARGETS:
            raise ConfigError(f"model.params.personalization_config.target '{target}' cannot run on SDXL; use {MANAGER_TARGETS[1]}")
        if not self.unfreeze_model:
            freeze_module(self.conditioner)
            freeze_module(self.model)
        params = dict(personalization_config.get("params", None) or {})
        self.embedding_manager = SDXLEmbeddingManager(self.conditioner, **params)
        if params.get("embedding_manager_ckpt"):
            self.embedding_manager.load(params["embedding_manager_ckpt"])
        for p in self.embedding_manager.embedding_parameters():
            p.requires_grad = True

    @property
    def cond_stage_text_encoder(self) -> nn.Module:
        """The first text encoder (CLIP-L): its tokenizer and length are what prompt checks read."""
        return self.conditioner.text_embedders()[0][1]

    def instantiate_cond_stage(self, config: Any) -> None:
        self.conditioner = instantiate_from_config(config)
        if not any(getattr(e, "is_trainable", False) for e in self.conditioner.embedders):
            freeze_module(self.conditioner)

    def trainable_model_parameters(self) -> list[nn.Parameter]:
        """Training a model from scratch (``configs/shapes/shapes-sdxl-train.yaml``): the UNet and the conditioner's
        embedders marked ``is_trainable`` (SDXL's conditioner has no single ``cond_stage_model``)."""
        params = list(self.model.parameters())
        if self.cond_stage_trainable:
            params += [p for e in self.conditioner.embedders if e.is_trainable for p in e.parameters()]
        if self.learn_logvar:
            params.append(self.logvar)
        return params

    def size_batch(self, prompts: list[str], height: int | None = None, width: int | None = None) -> dict[str, Any]:
        """The conditioner's batch for plain prompts: original = target size (H, W), crop (0, 0), as for generation."""
        h, w = height or self.size, width or self.size
        sizes = torch.tensor([[h, w]] * len(prompts), device=self.device)
        return {
            "txt": prompts,
            "original_size_as_tuple": sizes,
            "crop_coords_top_left": torch.zeros_like(sizes),
            "target_size_as_tuple": sizes.clone(),
        }

    def get_learned_conditioning(self, c: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """``{"crossattn", "vector"}`` for a conditioner batch dict, or for prompts at the default size; the learned
        words substituted in both text encoders; an empty prompt's text parts all zero."""
        if isinstance(c, str):
            c = [c]
        if not isinstance(c, Mapping):
            c = self.size_batch(list(c))
        managers = self.embedding_manager.by_embedder() if self.embedding_manager is not None else None
        empty = torch.tensor([not str(t) for t in c["txt"]])
        # one pass: a second one for the empty captions doubled the text encoders' cost of a training step
        return self.conditioner(c, embedding_managers=managers, zero_samples={"txt": empty} if bool(empty.any()) else None)

    def context_preservation_loss(self, captions: Any, cond: Any) -> torch.Tensor:
        """The context regulariser (see LatentDiffusion) on both encoders at once: ``crossattn`` holds their outputs
        side by side, one row per token, and the two tokenizers share the BPE, so a placeholder fills the same rows in
        both. The pooled text in ``vector`` sums up the whole prompt, the learned word included, and is left free."""
        manager = self.embedding_manager
        with torch.no_grad(), manager.initial_vectors_in_place():
            reference = self.get_learned_conditioning(captions)
        tokens = self.cond_stage_text_encoder.tokenize(list(captions["txt"]))
        keep = ~manager.first.substitution_mask(tokens.to(cond["crossattn"].device))
        return (cond["crossattn"] - reference["crossattn"]).pow(2).mean(dim=-1)[keep].mean()

    def training_batch(self, batch: Mapping[str, Any], n: int | None = None) -> dict[str, Any]:
        """The conditioner's batch for training images: their captions and size conditioning (from the dataset when it
        gives it, else the training size with no crop)."""
        captions = list(batch[self.cond_stage_key])[:n]
        given = {k: batch[k][: len(captions)] for k in SIZE_KEYS if k in batch}
        if len(given) == len(SIZE_KEYS):
            return {"txt": captions, **{k: torch.as_tensor(v).to(self.device) for k, v in given.items()}}
        image = batch[self.first_stage_key]
        return self.size_batch(captions, int(image.shape[1]), int(image.shape[2]))

    def get_input(  # type: ignore[override]
        self, batch: dict, k: str, return_first_stage_outputs: bool = False, force_c_encode: bool = False,
        cond_key: str | None = None, return_original_cond: bool = False, bs: int | None = None,
    ) -> list:
        """``[z, c]``: the scaled latents and the conditioner's batch (encoded unless the model encodes it itself)."""
        x = super(LatentDiffusion, self).get_input(batch, k)[:bs].to(self.device)
        z = self.encode_latents(batch, x)
        xc = self.training_batch(batch, x.shape[0])
        c = self.get_learned_conditioning(xc) if (not self.cond_stage_trainable or force_c_encode) else xc
        out = [z, c]
        if return_first_stage_outputs:
            out.extend([x, self.decode_first_stage(z)])
        if return_original_cond:
            out.append(xc["txt"])
        return out

    def encode_first_stage(self, x: torch.Tensor) -> Any:
        with self.vae_precision() as dtype:
            return self.first_stage_model.encode(x.to(dtype))

    def decode_first_stage(self, z: torch.Tensor, predict_cids: bool = False, force_not_quantize: bool = False) -> torch.Tensor:
        with self.vae_precision() as dtype:
            return self.first_stage_model.decode((1.0 / self.scale_factor * z).to(dtype))

    def vae_precision(self) -> Any:
        """A context for the VAE: float16 autocast is switched off and float16 weights become float32 (SDXL's VAE
        overflows in float16); bf16 and float32 are kept. Yields the dtype to feed it."""
        import contextlib

        @contextlib.contextmanager
        def scope() -> Any:
            if next(self.first_stage_model.parameters()).dtype == torch.float16:
                self.first_stage_model.float()
            kind = self.device.type
            fp16_autocast = torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.float16
            with torch.autocast(kind, enabled=False) if fp16_autocast else contextlib.nullcontext():
                yield next(self.first_stage_model.parameters()).dtype

        return scope()

    def save_embeddings(self, ckpt_dir: Path, step: int) -> None:
        """The original-style files (both halves keyed) and, per placeholder, the shared ``{"clip_l", "clip_g"}``
        safetensors (``embeddings_gs-<step>.safetensors``; with several placeholders ``..._<i>.safetensors``)."""
        super().save_embeddings(ckpt_dir, step)
        if not self.embeddings_are_finite():
            return
        record = embedding_record(step=step, **(self.embedding_provenance or {}))
        placeholders = list(self.embedding_manager.string_to_token_dict)
        for i, placeholder in enumerate(placeholders):
            suffix = "" if len(placeholders) == 1 else f"_{i}"
            for stem in ("embeddings", f"embeddings_gs-{step}"):
                self.embedding_manager.save_shared(ckpt_dir / f"{stem}{suffix}.safetensors", placeholder, record)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any, return_ids: bool = False) -> torch.Tensor:
        """The UNet's prediction; ``cond`` is the conditioner's ``{"crossattn", "vector"}`` (or the wrapper's dict)."""
        if isinstance(cond, Mapping) and "crossattn" in cond:
            cond = {"c_crossattn": [cond["crossattn"]], "c_adm": cond["vector"]}
        return super().apply_model(x_noisy, t, cond, return_ids)
