"""PLMS sampling (pseudo linear multi-step, Liu et al. 2022) behind the original ``PLMSSampler`` API.

The sampler itself is the pure function :func:`ldm.models.diffusion.sampling.sample_plms`; this class adapts the
original call signature, which is :class:`~ldm.models.diffusion.ddim.DDIMSampler`'s, by running that function instead
of DDIM. Deterministic: eta must be 0; the DDIM-only options (mask, temperature, noise dropout, quantization) are
accepted and ignored, as before.
"""
from __future__ import annotations

from typing import Any

import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.sampling import DDIMSchedule, EpsFn, StepCallback, sample_plms


class PLMSSampler(DDIMSampler):
    def run(self, eps: EpsFn, img: torch.Tensor, schedule: DDIMSchedule, callback: StepCallback, *, eta: float, verbose: bool, **ddim_only: Any) -> torch.Tensor:  # type: ignore[override]
        """:func:`sample_plms` from ``img`` down the ``schedule``."""
        if eta != 0:
            raise ValueError("eta must be 0 for PLMS")
        return sample_plms(eps, img, schedule, callback=callback, verbose=verbose)
