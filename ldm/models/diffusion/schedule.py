"""The forward-process schedule of DDPM: betas and every quantity derived from them.

Computed in numpy float64 and cast to float32 once, as the original does, so the buffers (and through them every
loss and sample) match the original checkpoints' numerics bit for bit.
"""
from __future__ import annotations

import numpy as np
import torch

from ldm.modules.diffusionmodules.util import make_beta_schedule

SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def schedule_arrays(
    given_betas: np.ndarray | None = None,
    beta_schedule: str = "linear",
    timesteps: int = 1000,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
    v_posterior: float = 0.0,
) -> dict[str, np.ndarray]:
    """Every schedule quantity in float64, keyed by the buffer names of :data:`SCHEDULE_BUFFERS`."""
    if given_betas is not None:
        betas = np.asarray(given_betas, dtype=np.float64)
    else:
        betas = make_beta_schedule(beta_schedule, timesteps, linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    posterior_variance = (1 - v_posterior) * betas * (1.0 - ac_prev) / (1.0 - ac) + v_posterior * betas
    return {
        "betas": betas,
        "alphas": alphas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_variance": posterior_variance,
        # the variance is 0 at t = 0, hence the clip before the log
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    }


def lvlb_weights(buffers: dict[str, torch.Tensor], alphas: np.ndarray, parameterization: str) -> torch.Tensor:
    """Per-t weights of the variational bound term, from the float32 buffers (as the original computes them)."""
    if parameterization == "eps":
        w = buffers["betas"] ** 2 / (
            2 * buffers["posterior_variance"] * torch.tensor(alphas, dtype=torch.float32) * (1 - buffers["alphas_cumprod"])
        )
    elif parameterization == "x0":
        ac = torch.tensor(buffers["alphas_cumprod"].numpy(), dtype=torch.float32)
        # upstream's operator precedence, kept on purpose: (2 * 1 - ac), where 2 * (1 - ac) was surely meant; the
        # weights (and so the x0 models' losses) must equal the original's
        w = 0.5 * torch.sqrt(ac) / (2.0 * 1 - ac)
    elif parameterization == "v":  # as SD 2's code: the bound's weights are not defined for v, use ones
        w = torch.ones_like(buffers["betas"], dtype=torch.float32)
    else:
        raise NotImplementedError(f"parameterization '{parameterization}' is not supported (eps, x0 or v)")
    w[0] = w[1]  # the posterior variance is 0 at t = 0: reuse t = 1
    return w
