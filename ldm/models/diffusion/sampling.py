"""DDIM and PLMS as small pure functions, in the style of k-diffusion: ``sample_ddim(eps_fn, x, schedule, ...)``.

Each sampler takes a noise predictor ``eps_fn(x, t) -> eps`` (guidance already folded in, see :func:`cfg_eps`), the
starting noise and a :class:`DDIMSchedule`, and returns the final latent; nothing is kept between calls. A
``callback`` sees every step (``{"i", "index", "t", "x", "pred_x0"}``), which is how the ``DDIMSampler`` and
``PLMSSampler`` adapters rebuild the original API's intermediates.

The numerics are the original's, bit for bit: uniform steps ``range(0, T, T // S) + 1``; the "previous" alpha of the
first step is ``alphas_cumprod[0]``, not 1; sigma is computed with the original's float32/float64 mix; and DDIM draws
its step noise even when sigma is 0, so a seed gives the original's images.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.modules.diffusionmodules.util import make_ddim_timesteps

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> predicted noise
ModelEpsFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]  # (x_t, t, conditioning) -> predicted noise
StepCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class DDIMSchedule:
    """Per-step quantities of a DDIM/PLMS run of ``len(timesteps)`` steps (indexed by step index, not by t)."""

    timesteps: np.ndarray  # int, ascending
    alphas: torch.Tensor  # float32: alphas_cumprod[timesteps]
    alphas_prev: torch.Tensor  # float64
    sqrt_one_minus_alphas: torch.Tensor  # float32

    def __len__(self) -> int:
        return len(self.timesteps)

    def first(self, n: int) -> DDIMSchedule:
        """The schedule of the ``n`` least noisy steps (to denoise from step ``n`` down to 0)."""
        return DDIMSchedule(self.timesteps[:n], self.alphas[:n], self.alphas_prev[:n], self.sqrt_one_minus_alphas[:n])


def ddim_schedule(alphas_cumprod: torch.Tensor, num_steps: int, discretize: str = "uniform", verbose: bool = False) -> DDIMSchedule:
    """The sub-sequence of ``num_steps`` timesteps and its alphas (``verbose``: log the timesteps chosen)."""
    ac = alphas_cumprod.detach().to("cpu", torch.float32)
    timesteps = make_ddim_timesteps(discretize, num_steps, ac.shape[0], verbose=verbose)
    alphas = ac[torch.as_tensor(timesteps)]
    alphas_prev = torch.tensor([ac[0].item()] + ac[torch.as_tensor(timesteps[:-1])].tolist(), dtype=torch.float64)
    return DDIMSchedule(timesteps, alphas, alphas_prev, torch.sqrt(1.0 - alphas))


def ddim_sigmas(schedule: DDIMSchedule, eta: float) -> torch.Tensor:
    """Per-step noise scales (float64): 0 for ``eta`` = 0 (deterministic DDIM), the DDPM posterior's for 1."""
    a, a_prev = schedule.alphas, schedule.alphas_prev
    return eta * torch.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))


def guided_eps(eps_fn: ModelEpsFn, x: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any, scale: float) -> torch.Tensor:
    """Classifier-free guidance ``e_uc + s (e_c - e_uc)`` with one batched call on ``[uc; c]``; s = 1: c only."""
    if uncond is None or scale == 1.0:
        return eps_fn(x, t, cond)
    e_uncond, e_cond = eps_fn(torch.cat([x] * 2), torch.cat([t] * 2), _cat_conditioning(uncond, cond)).chunk(2)
    return e_uncond + scale * (e_cond - e_uncond)


def cfg_eps(eps_fn: ModelEpsFn, cond: Any, uncond: Any = None, scale: float = 1.0) -> EpsFn:
    """The ``(x, t) -> eps`` a sampler calls: the model's prediction for ``cond``, guided away from ``uncond``."""

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return guided_eps(eps_fn, x, t, cond, uncond, scale)

    return eps


def _cat_conditioning(uncond: Any, cond: Any) -> Any:
    if isinstance(cond, dict):
        return {k: _cat_conditioning(uncond[k], cond[k]) for k in cond}
    if isinstance(cond, list):
        return [torch.cat([u, c]) for u, c in zip(uncond, cond)]
    return torch.cat([uncond, cond])


def check_batch(conditioning: Any, batch_size: int) -> None:
    """Conditioning must have one row per sample (a clear error instead of a broadcasting surprise)."""
    if conditioning is None:
        return
    first = conditioning[list(conditioning)[0]] if isinstance(conditioning, dict) else conditioning
    first = first[0] if isinstance(first, list) else first
    if isinstance(first, torch.Tensor) and first.shape[0] != batch_size:
        raise ValueError(f"got {first.shape[0]} conditionings but batch-size is {batch_size}")


def step_scalars(schedule: DDIMSchedule, sigmas: torch.Tensor, index: int, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(a_t, a_prev, sigma_t, sqrt(1 - a_t)) for step ``index`` as float32 [B,1,1,1] tensors."""
    values = (schedule.alphas[index], schedule.alphas_prev[index], sigmas[index], schedule.sqrt_one_minus_alphas[index])
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


def ddim_step(
    eps_fn: EpsFn,
    x: torch.Tensor,
    t: torch.Tensor,
    index: int,
    schedule: DDIMSchedule,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    noise_dropout: float = 0.0,
    quantize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step at step ``index`` (timestep ``t``): returns (x_prev, pred_x0)."""
    e_t = eps_fn(x, t)
    scalars = step_scalars(schedule, sigmas, index, x.shape[0], x.device)
    noise = torch.randn(x.shape, device=x.device, generator=generator) * temperature  # drawn even when sigma is 0
    if noise_dropout > 0.0:
        noise = torch.nn.functional.dropout(noise, p=noise_dropout)
    return ddim_update(x, e_t, scalars, noise, quantize)


def plms_eps(e_t: torch.Tensor, old_eps: list[torch.Tensor]) -> torch.Tensor:
    """Adams-Bashforth combination of the current and up to three previous noise predictions (orders 2-4)."""
    if len(old_eps) == 1:
        return (3 * e_t - old_eps[-1]) / 2
    if len(old_eps) == 2:
        return (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
    return (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24


def _steps(schedule: DDIMSchedule, desc: str, verbose: bool) -> Iterator[tuple[int, int, int]]:
    """``(i, index, t)`` from the noisiest step to the last: loop counter, step index, timestep."""
    time_range = np.flip(schedule.timesteps)
    total = len(time_range)
    for i, t in enumerate(tqdm(time_range, desc=desc, total=total, disable=not verbose)):
        yield i, total - i - 1, int(t)


def sample_ddim(
    eps_fn: EpsFn,
    x: torch.Tensor,
    schedule: DDIMSchedule,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    temperature: float = 1.0,
    noise_dropout: float = 0.0,
    quantize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    blend: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    desc: str = "DDIM Sampler",
    verbose: bool = True,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) from the noise ``x`` down the ``schedule``; returns the final latent.

    ``eta`` scales the step noise (0: deterministic); ``temperature`` and ``noise_dropout`` alter that noise;
    ``quantize`` maps each predicted x0 onto a VQ codebook; ``blend(x, t)`` replaces x_t before each step (the
    original's inpainting mask: the known region noised to t).
    """
    sigmas = ddim_sigmas(schedule, eta)
    for i, index, t in _steps(schedule, desc, verbose):
        ts = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        if blend is not None:
            x = blend(x, ts)
        x, pred_x0 = ddim_step(eps_fn, x, ts, index, schedule, sigmas, generator=generator, temperature=temperature,
                               noise_dropout=noise_dropout, quantize=quantize)
        if callback is not None:
            callback({"i": i, "index": index, "t": ts, "x": x, "pred_x0": pred_x0})
    return x


def sample_plms(
    eps_fn: EpsFn,
    x: torch.Tensor,
    schedule: DDIMSchedule,
    *,
    callback: StepCallback | None = None,
    desc: str = "PLMS Sampler",
    verbose: bool = True,
) -> torch.Tensor:
    """PLMS (pseudo linear multi-step, Liu et al. 2022) down the ``schedule``; deterministic; returns the final latent.

    The first step is a pseudo improved Euler step (two model calls, the second at the next timestep); later steps
    combine the current and up to three stored noise predictions with Adams-Bashforth weights (:func:`plms_eps`).
    """
    sigmas = ddim_sigmas(schedule, 0.0)
    time_range = np.flip(schedule.timesteps)
    old_eps: list[torch.Tensor] = []
    for i, index, t in _steps(schedule, desc, verbose):
        ts = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        scalars = step_scalars(schedule, sigmas, index, x.shape[0], x.device)
        e_t = eps_fn(x, ts)
        if not old_eps:
            x_euler, _ = ddim_update(x, e_t, scalars)
            # the original's clamp, kept: with a single step the "next" timestep is the current one
            t_next = torch.full_like(ts, int(time_range[min(i + 1, len(time_range) - 1)]))
            e_prime = (e_t + eps_fn(x_euler, t_next)) / 2
        else:
            e_prime = plms_eps(e_t, old_eps)
        old_eps = (old_eps + [e_t])[-3:]
        x, pred_x0 = ddim_update(x, e_prime, scalars)
        if callback is not None:
            callback({"i": i, "index": index, "t": ts, "x": x, "pred_x0": pred_x0})
    return x
