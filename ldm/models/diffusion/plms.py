"""PLMS sampling (pseudo linear multi-step, Liu et al. 2022) behind the original ``PLMSSampler`` API.

Step one is a pseudo improved Euler step (two model calls); later steps combine the stored noise predictions with
Adams-Bashforth weights of order 2-4 (:func:`ldm.models.diffusion.sampling.plms_eps`). Deterministic: eta must be 0.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.sampling import check_batch, ddim_update, guided_eps, plms_eps, run_steps, step_scalars


class PLMSSampler(DDIMSampler):
    @torch.no_grad()
    def sample(  # type: ignore[override]
        self,
        S: int,
        batch_size: int,
        shape: tuple[int, ...],
        conditioning: Any = None,
        callback: Callable | None = None,
        img_callback: Callable | None = None,
        eta: float = 0.0,
        verbose: bool = True,
        x_T: torch.Tensor | None = None,
        log_every_t: int = 100,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        if eta != 0:
            raise ValueError("eta must be 0 for PLMS")
        check_batch(conditioning, batch_size)
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        device = self.model.betas.device
        img = torch.randn((batch_size, *shape), device=device, generator=generator) if x_T is None else x_T.to(device)
        time_range = np.flip(self.ddim_timesteps)
        old_eps: list[torch.Tensor] = []

        def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return guided_eps(self.model_eps, x, t, conditioning, unconditional_conditioning, unconditional_guidance_scale)

        def step(x: torch.Tensor, ts: torch.Tensor, index: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            nonlocal old_eps
            scalars = step_scalars(self.sched, index, batch_size, device)
            e_t = eps(x, ts)
            if not old_eps:
                x_euler, _ = ddim_update(x, e_t, scalars)
                t_next = torch.full_like(ts, int(time_range[min(i + 1, len(time_range) - 1)]))
                e_prime = (e_t + eps(x_euler, t_next)) / 2
            else:
                e_prime = plms_eps(e_t, old_eps)
            old_eps = (old_eps + [e_t])[-3:]
            return ddim_update(x, e_prime, scalars)

        return run_steps(step, img, self.ddim_timesteps, desc="PLMS Sampler", verbose=verbose, log_every_t=log_every_t,
                         callback=callback, img_callback=img_callback)
