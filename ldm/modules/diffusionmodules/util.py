"""Building blocks and schedules shared by the diffusion UNet and the samplers.

This holds the noise schedules (``make_beta_schedule``), the DDIM timestep / coefficient helpers, the sinusoidal
timestep embedding, small layer factories (``conv_nd``, ``linear``, ``normalization`` ...), and gradient
checkpointing.

Checkpointing differs from the original on purpose: the original used a custom autograd function that asked
``torch.autograd.grad`` for the gradients of every module parameter, which fails when all weights are frozen and only
an input needs a gradient (Textual Inversion: the text conditioning comes from one learned embedding). Here
:func:`checkpoint` uses ``torch.utils.checkpoint`` (non-reentrant), which handles that case. A module-level switch
(:func:`set_gradient_checkpointing`) turns it on or off in every block of a model.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import repeat
from torch import nn

logger = logging.getLogger(__name__)

def make_beta_schedule(
    schedule: str,
    n_timestep: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> np.ndarray:
    """The betas of a diffusion noise schedule, as float64 numpy array of length ``n_timestep``."""
    with torch.device("cpu"):  # also when a model is being built under a meta/cuda device context
        return _beta_schedule(schedule, n_timestep, linear_start, linear_end, cosine_s)


def _beta_schedule(schedule: str, n_timestep: int, linear_start: float, linear_end: float, cosine_s: float) -> np.ndarray:
    if schedule == "linear":
        betas = torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64) ** 2
    elif schedule == "cosine":
        steps = torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * np.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        betas = torch.clamp(1 - alphas[1:] / alphas[:-1], min=0, max=0.999)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64)
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64) ** 0.5
    else:
        raise ValueError(f"schedule '{schedule}' unknown.")
    return betas.numpy()


def make_ddim_timesteps(
    ddim_discr_method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int, verbose: bool = True
) -> np.ndarray:
    """The DDPM timesteps a DDIM sampler visits (ascending), shifted by one as in the original.

    The shift can push the last step to T when the step count divides T - 1 (e.g. 3 steps of 1000: 0, 333, 666,
    999); the original then failed with an index error, here that step is left out.
    """
    if ddim_discr_method == "uniform":
        c = num_ddpm_timesteps // num_ddim_timesteps
        ddim_timesteps = np.asarray(list(range(0, num_ddpm_timesteps, c)))
    elif ddim_discr_method == "quad":
        ddim_timesteps = (np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps) ** 2).astype(int)
    else:
        raise NotImplementedError(f'There is no ddim discretization method called "{ddim_discr_method}"')
    steps_out = ddim_timesteps + 1
    steps_out = steps_out[steps_out < num_ddpm_timesteps]
    if verbose:
        logger.info("Selected timesteps for ddim sampler: %s", steps_out)
    return steps_out


def make_ddim_sampling_parameters(
    alphacums: torch.Tensor | np.ndarray, ddim_timesteps: np.ndarray, eta: float, verbose: bool = True
) -> tuple[Any, Any, np.ndarray]:
    """DDIM coefficients for the selected timesteps: ``(sigmas, alphas, alphas_prev)`` (the original's order).

    ``alphas = alphacums[ddim_timesteps]``; ``alphas_prev[0]`` is ``alphacums[0]``, not 1, as in the original;
    ``sigmas = eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))``. Types follow the original: for a tensor
    ``alphacums``, ``alphas`` is a tensor of its dtype and ``sigmas`` a float64 tensor; ``alphas_prev`` is float64
    numpy. ``1 - a`` is rounded in ``alphacums``' precision, as in the original.

    Kept for API compatibility: the samplers use :func:`ldm.models.diffusion.sampling.ddim_schedule`.
    """
    is_tensor = isinstance(alphacums, torch.Tensor)
    cums = alphacums.detach().cpu().numpy() if is_tensor else np.asarray(alphacums)
    a = cums[ddim_timesteps]
    alphas_prev = np.asarray([cums[0]] + cums[ddim_timesteps[:-1]].tolist(), dtype=np.float64)
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - a) * (1 - a / alphas_prev))
    if verbose:
        logger.info("Selected alphas for ddim sampler: a_t: %s; a_(t-1): %s", a, alphas_prev)
        logger.info("For the chosen value of eta, which is %s, this results in sigma_t schedule %s", eta, sigmas)
    if is_tensor:
        return torch.from_numpy(sigmas), alphacums[ddim_timesteps], alphas_prev
    return sigmas, a, alphas_prev


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor:
    """``a[t]`` per batch element, shaped ``[b, 1, 1, ...]`` to broadcast against a tensor of ``x_shape``."""
    b = t.shape[0]
    out = a.gather(-1, t)
    return out.reshape(b, *((1,) * (len(x_shape) - 1)))


def noise_like(shape: Sequence[int], device: torch.device | str, repeat: bool = False) -> torch.Tensor:
    """Standard normal noise; with ``repeat`` one sample is shared by the whole batch.

    Kept for API compatibility (upstream code uses it); nothing in this project calls it.
    """
    if repeat:
        noise = torch.randn((1, *shape[1:]), device=device)
        return noise.repeat(shape[0], *((1,) * (len(shape) - 1)))
    return torch.randn(shape, device=device)


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: int = 10000, repeat_only: bool = False
) -> torch.Tensor:
    """Sinusoidal embeddings ``[cos | sin]`` of a 1-D tensor of (possibly fractional) timesteps: ``[N, dim]``."""
    if repeat_only:
        return repeat(timesteps, "b -> b d", d=dim)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]  # made on the device: a host-made copy would wait for it
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def zero_module(module: nn.Module) -> nn.Module:
    """Zero the parameters of ``module`` in place and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module: nn.Module, scale: float) -> nn.Module:
    """Multiply the parameters of ``module`` by ``scale`` in place and return it. Kept for API compatibility (upstream code uses it); nothing in this project calls it."""
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch dimension."""
    return tensor.mean(dim=list(range(1, len(tensor.shape))))


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always computes in float32 (input and affine parameters) and returns the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def normalization(channels: int) -> nn.Module:
    """The UNet's normalisation layer: 32 groups, float32 statistics."""
    return GroupNorm32(32, channels)


def conv_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """A 1-D, 2-D or 3-D convolution."""
    convs = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    if dims not in convs:
        raise ValueError(f"unsupported dimensions: {dims}")
    return convs[dims](*args, **kwargs)


def linear(*args: Any, **kwargs: Any) -> nn.Module:
    """A linear layer (kept as a factory for parity with ``conv_nd``)."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """A 1-D, 2-D or 3-D average pooling layer."""
    pools = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
    if dims not in pools:
        raise ValueError(f"unsupported dimensions: {dims}")
    return pools[dims](*args, **kwargs)


def set_gradient_checkpointing(model: nn.Module, enabled: bool) -> int:
    """Turn activation checkpointing on or off in every block of ``model``; returns how many blocks it set.

    Blocks carry the flag as ``use_checkpoint`` (ResBlock, AttentionBlock, UNetModel) or ``checkpoint``
    (BasicTransformerBlock), as in the original.
    """
    count = 0
    for module in model.modules():
        for attr in ("use_checkpoint", "checkpoint"):
            if isinstance(getattr(module, attr, None), bool):
                setattr(module, attr, enabled)
                count += 1
    return count


def checkpoint(func: Callable[..., Any], inputs: Sequence[Any], params: Any, flag: bool) -> Any:
    """``func(*inputs)``, recomputed in the backward pass instead of storing activations when ``flag`` is set.

    ``params`` is accepted for signature compatibility with the original and not needed: non-reentrant
    ``torch.utils.checkpoint`` finds the parameters itself, and works when every one of them is frozen.
    """
    if flag and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)
