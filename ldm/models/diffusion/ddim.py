"""DDIM sampling (Song et al. 2021) with classifier-free guidance, behind the original ``DDIMSampler`` API.

The sampler itself is the pure function :func:`ldm.models.diffusion.sampling.sample_ddim`; this class only adapts the
call signature user scripts rely on: ``sample(S, batch_size, shape, conditioning, ...)`` returning
``(samples, intermediates)``, and the original's schedule attributes (``ddim_timesteps``, ``ddim_alphas``, ...). It
follows the model's device (the original forced CUDA).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from ldm.models.diffusion.sampling import (
    DDIMSchedule,
    EpsFn,
    StepCallback,
    cfg_eps,
    check_batch,
    ddim_schedule,
    ddim_sigmas,
    ddim_step,
    sample_ddim,
)
from ldm.modules.diffusionmodules.util import extract_into_tensor

Intermediates = dict[str, list[torch.Tensor]]


def original_callbacks(
    x_T: torch.Tensor, total: int, log_every_t: int, callback: Callable | None, img_callback: Callable | None
) -> tuple[Intermediates, StepCallback]:
    """The original API's side outputs as one step callback: ``callback(i)``, ``img_callback(pred_x0, i)``, and the
    intermediates it returned (``x_T`` first, then every ``log_every_t``-th step and the first step)."""
    intermediates: Intermediates = {"x_inter": [x_T], "pred_x0": [x_T]}

    def on_step(step: dict[str, Any]) -> None:
        if callback is not None:
            callback(step["i"])
        if img_callback is not None:
            img_callback(step["pred_x0"], step["i"])
        if step["index"] % log_every_t == 0 or step["index"] == total - 1:
            intermediates["x_inter"].append(step["x"])
            intermediates["pred_x0"].append(step["pred_x0"])

    return intermediates, on_step


def start_noise(model: Any, batch_size: int, shape: tuple[int, ...], x_T: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    """``x_T`` on the model's device, or fresh noise of ``(batch_size, *shape)`` drawn from ``generator``."""
    device = model.betas.device
    return torch.randn((batch_size, *shape), device=device, generator=generator) if x_T is None else x_T.to(device)


class DDIMSampler:
    """The original's DDIM sampler object; ``make_schedule`` keeps the schedule for the step-by-step methods
    (:meth:`p_sample_ddim`, :meth:`stochastic_encode`, :meth:`decode`) that the original API offers."""

    def __init__(self, model: Any, schedule: str = "linear", **kwargs: Any) -> None:
        self.model = model
        self.schedule = schedule  # the original's argument; the beta schedule is the model's own
        self.ddim_schedule: DDIMSchedule | None = None
        self.ddim_eta = 0.0

    def model_eps(self, x: torch.Tensor, t: torch.Tensor, c: Any) -> torch.Tensor:
        """The model's noise prediction (converted from a v or x0 output; guidance is linear, so before or after)."""
        return self.model.eps_from_output(x, t, self.model.apply_model(x, t, c))

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0, verbose: bool = True) -> DDIMSchedule:
        """Choose the ``ddim_num_steps`` timesteps (``verbose``: log them) and remember them with ``ddim_eta``."""
        self.ddim_schedule = ddim_schedule(self.model.alphas_cumprod, ddim_num_steps, ddim_discretize, verbose=verbose)
        self.ddim_eta = ddim_eta
        return self.ddim_schedule

    def _made(self) -> DDIMSchedule:
        if self.ddim_schedule is None:
            raise RuntimeError("call make_schedule (or sample) first: the sampler has no schedule yet")
        return self.ddim_schedule

    # the original's schedule attributes, read from the schedule made last
    @property
    def ddim_timesteps(self) -> np.ndarray:
        return self._made().timesteps

    @property
    def ddim_alphas(self) -> torch.Tensor:
        return self._made().alphas

    @property
    def ddim_alphas_prev(self) -> np.ndarray:
        return self._made().alphas_prev.numpy()

    @property
    def ddim_sigmas(self) -> torch.Tensor:
        return ddim_sigmas(self._made(), self.ddim_eta)

    @property
    def ddim_sqrt_one_minus_alphas(self) -> torch.Tensor:
        return self._made().sqrt_one_minus_alphas

    def guided(self, conditioning: Any, unconditional_conditioning: Any = None, unconditional_guidance_scale: float = 1.0) -> EpsFn:
        return cfg_eps(self.model_eps, conditioning, unconditional_conditioning, unconditional_guidance_scale)

    @torch.no_grad()
    def sample(
        self,
        S: int,
        batch_size: int,
        shape: tuple[int, ...],
        conditioning: Any = None,
        callback: Callable | None = None,
        img_callback: Callable | None = None,
        quantize_x0: bool = False,
        eta: float = 0.0,
        mask: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        temperature: float = 1.0,
        noise_dropout: float = 0.0,
        verbose: bool = True,
        x_T: torch.Tensor | None = None,
        log_every_t: int = 100,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Intermediates]:
        """Sample ``batch_size`` latents of ``shape`` (C, H, W) in ``S`` steps."""
        check_batch(conditioning, batch_size)
        schedule = self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=False)
        img = start_noise(self.model, batch_size, shape, x_T, generator)
        intermediates, on_step = original_callbacks(img, len(schedule), log_every_t, callback, img_callback)
        eps = self.guided(conditioning, unconditional_conditioning, unconditional_guidance_scale)
        samples = self.run(eps, img, schedule, on_step, eta=eta, generator=generator, quantize_x0=quantize_x0, mask=mask, x0=x0,
                           temperature=temperature, noise_dropout=noise_dropout, verbose=verbose)
        return samples, intermediates

    def run(
        self,
        eps: EpsFn,
        img: torch.Tensor,
        schedule: DDIMSchedule,
        callback: StepCallback,
        *,
        eta: float,
        generator: torch.Generator | None,
        quantize_x0: bool,
        mask: torch.Tensor | None,
        x0: torch.Tensor | None,
        temperature: float,
        noise_dropout: float,
        verbose: bool,
    ) -> torch.Tensor:
        """The sampler proper, given what :meth:`sample` prepared: here :func:`sample_ddim`."""
        # the original's inpainting: before each step, the known region (mask 1) is x0 noised to t
        blend = None if mask is None else (lambda x, ts: self.model.q_sample(x0, ts) * mask + (1.0 - mask) * x)
        return sample_ddim(eps, img, schedule, eta=eta, generator=generator, callback=callback, temperature=temperature,
                           noise_dropout=noise_dropout, quantize=self._quantizer(quantize_x0), blend=blend, verbose=verbose)

    def _quantizer(self, quantize: bool) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return (lambda x0: self.model.first_stage_model.quantize(x0)[0]) if quantize else None

    @torch.no_grad()
    def p_sample_ddim(
        self,
        x: torch.Tensor,
        c: Any,
        t: torch.Tensor,
        index: int,
        quantize_denoised: bool = False,
        temperature: float = 1.0,
        noise_dropout: float = 0.0,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of the schedule made last (the original API): returns (x_prev, pred_x0)."""
        return ddim_step(
            self.guided(c, unconditional_conditioning, unconditional_guidance_scale), x, t, index, self._made(), self.ddim_sigmas,
            generator=generator, temperature=temperature, noise_dropout=noise_dropout, quantize=self._quantizer(quantize_denoised),
        )

    @torch.no_grad()
    def stochastic_encode(self, x0: torch.Tensor, t: torch.Tensor, use_original_steps: bool = False, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Noise x0 to the DDIM step index ``t`` (for img2img-style use)."""
        if use_original_steps:
            sqrt_ac, sqrt_1m_ac = self.model.sqrt_alphas_cumprod, self.model.sqrt_one_minus_alphas_cumprod
        else:
            sqrt_ac, sqrt_1m_ac = torch.sqrt(self.ddim_alphas), self.ddim_sqrt_one_minus_alphas
        noise = torch.randn_like(x0) if noise is None else noise
        return extract_into_tensor(sqrt_ac.to(x0.device), t, x0.shape) * x0 + extract_into_tensor(sqrt_1m_ac.to(x0.device), t, x0.shape) * noise

    @torch.no_grad()
    def decode(self, x_latent: torch.Tensor, cond: Any, t_start: int, unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None) -> torch.Tensor:
        """Denoise from DDIM step ``t_start`` down to 0 (the counterpart of :meth:`stochastic_encode`)."""
        eps = self.guided(cond, unconditional_conditioning, unconditional_guidance_scale)
        return sample_ddim(eps, x_latent, self._made().first(t_start), eta=self.ddim_eta, desc="Decoding image")
