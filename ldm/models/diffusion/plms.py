"""PLMS sampling (pseudo linear multi-step, Liu et al. 2022) behind the original ``PLMSSampler`` API.

The sampler itself is the pure function :func:`ldm.models.diffusion.sampling.sample_plms`; this class adapts the
original call signature, as :class:`~ldm.models.diffusion.ddim.DDIMSampler` does. Deterministic: eta must be 0.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ldm.models.diffusion.ddim import DDIMSampler, Intermediates, original_callbacks, start_noise
from ldm.models.diffusion.sampling import check_batch, sample_plms


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
    ) -> tuple[torch.Tensor, Intermediates]:
        if eta != 0:
            raise ValueError("eta must be 0 for PLMS")
        check_batch(conditioning, batch_size)
        schedule = self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=False)
        img = start_noise(self.model, batch_size, shape, x_T, generator)
        intermediates, on_step = original_callbacks(img, len(schedule), log_every_t, callback, img_callback)
        eps = self.guided(conditioning, unconditional_conditioning, unconditional_guidance_scale)
        return sample_plms(eps, img, schedule, callback=on_step, verbose=verbose), intermediates
