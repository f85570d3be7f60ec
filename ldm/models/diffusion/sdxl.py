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
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
from torch import nn

from ldm.models.diffusion.ddpm import LatentDiffusion, freeze_module
from ldm.models.diffusion.schedule import SCHEDULE_BUFFERS
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)


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
        if kwargs.get("personalization_config") is not None:
            raise ValueError("SDXL textual inversion is not supported yet: remove personalization_config from the SDXL config")
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", [])
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

    def register_schedule(self, *args: Any, **kwargs: Any) -> None:
        """The DDPM buffers, computed from the config and not saved (the released files hold none of them)."""
        super().register_schedule(*args, **kwargs)
        for name in SCHEDULE_BUFFERS:
            self.register_buffer(name, getattr(self, name), persistent=False)

    def instantiate_cond_stage(self, config: Any) -> None:
        self.conditioner = instantiate_from_config(config)
        if not any(getattr(e, "is_trainable", False) for e in self.conditioner.embedders):
            freeze_module(self.conditioner)

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
        """``{"crossattn", "vector"}`` for a conditioner batch dict, or for prompts at the default size."""
        if isinstance(c, str):
            c = [c]
        if not isinstance(c, Mapping):
            c = self.size_batch(list(c))
        return self.conditioner(c)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any, return_ids: bool = False) -> torch.Tensor:
        """The UNet's prediction; ``cond`` is the conditioner's ``{"crossattn", "vector"}`` (or the wrapper's dict)."""
        if isinstance(cond, Mapping) and "crossattn" in cond:
            cond = {"c_crossattn": [cond["crossattn"]], "c_adm": cond["vector"]}
        return super().apply_model(x_noisy, t, cond, return_ids)
