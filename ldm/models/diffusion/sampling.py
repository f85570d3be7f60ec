"""What the DDIM and PLMS samplers share, as small pure functions: their timestep schedule, classifier-free
guidance, and the deterministic/stochastic DDIM update.

The schedule reproduces the original's numerics exactly (uniform steps ``range(0, T, T // S) + 1``; the "previous"
alpha of the first step is ``alphas_cumprod[0]``, not 1; sigma computed with the original's float32/float64 mix).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.modules.diffusionmodules.util import make_ddim_timesteps

EpsFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


@dataclass(frozen=True)
class DDIMSchedule:
    """Per-step quantities of a DDIM/PLMS run of ``len(timesteps)`` steps (indexed by step index, not by t)."""

    timesteps: Any  # numpy int array, ascending
    alphas: torch.Tensor  # float32: alphas_cumprod[timesteps]
    alphas_prev: torch.Tensor  # float64
    sigmas: torch.Tensor  # float64
    sqrt_one_minus_alphas: torch.Tensor  # float32


def ddim_schedule(alphas_cumprod: torch.Tensor, num_steps: int, eta: float = 0.0, discretize: str = "uniform", verbose: bool = False) -> DDIMSchedule:
    """The sub-sequence of timesteps and its alphas/sigmas (``eta`` = 0: deterministic DDIM)."""
    ac = alphas_cumprod.detach().to("cpu", torch.float32)
    timesteps = make_ddim_timesteps(discretize, num_steps, ac.shape[0], verbose=verbose)
    alphas = ac[torch.as_tensor(timesteps)]
    alphas_prev = torch.tensor([ac[0].item()] + ac[torch.as_tensor(timesteps[:-1])].tolist(), dtype=torch.float64)
    sigmas = eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    return DDIMSchedule(timesteps, alphas, alphas_prev, sigmas, torch.sqrt(1.0 - alphas))


def guided_eps(eps_fn: EpsFn, x: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any, scale: float) -> torch.Tensor:
    """Classifier-free guidance ``e_uc + s (e_c - e_uc)`` with one batched call on ``[uc; c]``; s = 1: c only."""
    if uncond is None or scale == 1.0:
        return eps_fn(x, t, cond)
    e_uncond, e_cond = eps_fn(torch.cat([x] * 2), torch.cat([t] * 2), _cat_conditioning(uncond, cond)).chunk(2)
    return e_uncond + scale * (e_cond - e_uncond)


def _cat_conditioning(uncond: Any, cond: Any) -> Any:
    if isinstance(cond, dict):
        return {k: _cat_conditioning(uncond[k], cond[k]) for k in cond}
    if isinstance(cond, list):
        return [torch.cat([u, c]) for u, c in zip(uncond, cond)]
    return torch.cat([uncond, cond])


def step_scalars(schedule: DDIMSchedule, index: int, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(a_t, a_prev, sigma_t, sqrt(1 - a_t)) for step ``index`` as float32 [B,1,1,1] tensors."""
    values = (schedule.alphas[index], schedule.alphas_prev[index], schedule.sigmas[index], schedule.sqrt_one_minus_alphas[index])
    return tuple(torch.full((batch, 1, 1, 1), float(v), device=device) for v in values)


def ddim_update(
    x: torch.Tensor,
    e_t: torch.Tensor,
    scalars: tuple[torch.Tensor, ...],
    noise: torch.Tensor | None = None,
    quantize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step from x_t: returns (x_prev, pred_x0). ``noise`` (already drawn) is scaled by sigma_t;
    ``quantize`` maps the predicted x0 onto a VQ codebook first (VQ first stages only)."""
    a_t, a_prev, sigma_t, sqrt_one_minus_at = scalars
    pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
    if quantize is not None:
        pred_x0 = quantize(pred_x0)
    dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
    x_prev = a_prev.sqrt() * pred_x0 + dir_xt
    if noise is not None:
        x_prev = x_prev + sigma_t * noise
    return x_prev, pred_x0


def plms_eps(e_t: torch.Tensor, old_eps: list[torch.Tensor]) -> torch.Tensor:
    """Adams-Bashforth combination of the current and up to three previous noise predictions (orders 2-4)."""
    if len(old_eps) == 1:
        return (3 * e_t - old_eps[-1]) / 2
    if len(old_eps) == 2:
        return (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
    return (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24


def check_batch(conditioning: Any, batch_size: int) -> None:
    """Conditioning must have one row per sample (a clear error instead of a broadcasting surprise)."""
    if conditioning is None:
        return
    first = conditioning[list(conditioning)[0]] if isinstance(conditioning, dict) else conditioning
    first = first[0] if isinstance(first, list) else first
    if isinstance(first, torch.Tensor) and first.shape[0] != batch_size:
        raise ValueError(f"got {first.shape[0]} conditionings but batch-size is {batch_size}")


StepFn = Callable[[torch.Tensor, torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]]


def run_steps(
    step: StepFn,
    x: torch.Tensor,
    timesteps: Any,
    *,
    desc: str,
    verbose: bool = True,
    log_every_t: int = 100,
    callback: Callable | None = None,
    img_callback: Callable | None = None,
) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    """The loop both samplers share: visit ``timesteps`` from the last to the first, calling
    ``step(x, t_batch, index, i) -> (x_prev, pred_x0)``; keep the intermediates the original logged."""
    intermediates: dict[str, list[torch.Tensor]] = {"x_inter": [x], "pred_x0": [x]}
    time_range = np.flip(timesteps)
    total = len(time_range)
    for i, t in enumerate(tqdm(time_range, desc=desc, total=total, disable=not verbose)):
        index = total - i - 1
        ts = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        x, pred_x0 = step(x, ts, index, i)
        if callback is not None:
            callback(i)
        if img_callback is not None:
            img_callback(pred_x0, i)
        if index % log_every_t == 0 or index == total - 1:
            intermediates["x_inter"].append(x)
            intermediates["pred_x0"].append(pred_x0)
    return x, intermediates
