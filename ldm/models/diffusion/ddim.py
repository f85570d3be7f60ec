"""DDIM sampling (Song et al. 2021) with classifier-free guidance, behind the original ``DDIMSampler`` API.

The update rule and schedule are the pure functions of :mod:`ldm.models.diffusion.sampling`; this class keeps the
call signature user scripts rely on: ``sample(S, batch_size, shape, conditioning, ...)`` returning
``(samples, intermediates)``. It follows the model's device (the original forced CUDA).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ldm.models.diffusion.sampling import DDIMSchedule, check_batch, ddim_schedule, ddim_update, guided_eps, run_steps, step_scalars
from ldm.modules.diffusionmodules.util import extract_into_tensor


class DDIMSampler:
    def __init__(self, model: Any, schedule: str = "linear", **kwargs: Any) -> None:
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule
        self.sched: DDIMSchedule | None = None

    def model_eps(self, x: torch.Tensor, t: torch.Tensor, c: Any) -> torch.Tensor:
        """The model's noise prediction (converted from a v or x0 output; guidance is linear, so before or after)."""
        return self.model.eps_from_output(x, t, self.model.apply_model(x, t, c))

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0, verbose: bool = True) -> None:
        self.sched = ddim_schedule(self.model.alphas_cumprod, ddim_num_steps, ddim_eta, ddim_discretize, verbose=False)
        self.ddim_timesteps = self.sched.timesteps
        self.ddim_alphas = self.sched.alphas
        self.ddim_alphas_prev = self.sched.alphas_prev.numpy()
        self.ddim_sigmas = self.sched.sigmas
        self.ddim_sqrt_one_minus_alphas = self.sched.sqrt_one_minus_alphas

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
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Sample ``batch_size`` latents of ``shape`` (C, H, W) in ``S`` steps."""
        check_batch(conditioning, batch_size)
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        device = self.model.betas.device
        img = torch.randn((batch_size, *shape), device=device, generator=generator) if x_T is None else x_T.to(device)

        def step(x: torch.Tensor, ts: torch.Tensor, index: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            if mask is not None:
                x = self.model.q_sample(x0, ts) * mask + (1.0 - mask) * x
            return self.p_sample_ddim(
                x, conditioning, ts, index, quantize_denoised=quantize_x0, temperature=temperature,
                noise_dropout=noise_dropout, unconditional_guidance_scale=unconditional_guidance_scale,
                unconditional_conditioning=unconditional_conditioning, generator=generator,
            )

        return run_steps(step, img, self.ddim_timesteps, desc="DDIM Sampler", verbose=verbose, log_every_t=log_every_t,
                         callback=callback, img_callback=img_callback)

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
        e_t = guided_eps(self.model_eps, x, t, c, unconditional_conditioning, unconditional_guidance_scale)
        scalars = step_scalars(self.sched, index, x.shape[0], x.device)
        # drawn even when sigma is 0, as the original does, so a seed gives the original's images
        noise = torch.randn(x.shape, device=x.device, generator=generator) * temperature
        if noise_dropout > 0.0:
            noise = torch.nn.functional.dropout(noise, p=noise_dropout)
        quantize = (lambda x0: self.model.first_stage_model.quantize(x0)[0]) if quantize_denoised else None
        return ddim_update(x, e_t, scalars, noise, quantize)

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
        def step(x: torch.Tensor, ts: torch.Tensor, index: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return self.p_sample_ddim(x, cond, ts, index, unconditional_guidance_scale=unconditional_guidance_scale,
                                      unconditional_conditioning=unconditional_conditioning)

        x, _ = run_steps(step, x_latent, self.ddim_timesteps[:t_start], desc="Decoding image")
        return x
