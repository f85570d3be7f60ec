"""Distributions over latents: the KL autoencoder's diagonal Gaussian posterior, and the Gaussian KL divergence.

``DiagonalGaussianDistribution`` wraps the encoder's output (mean and log-variance stacked on the channel axis).
Sampling draws from the global RNG of the parameters' device, so on CPU ``torch.manual_seed`` reproduces the
original's samples.
"""
from __future__ import annotations

import numpy as np
import torch


class AbstractDistribution:
    """Something that can be sampled and has a mode."""

    def sample(self) -> torch.Tensor:
        raise NotImplementedError()

    def mode(self) -> torch.Tensor:
        raise NotImplementedError()


class DiracDistribution(AbstractDistribution):
    """All mass on one value. Kept for API compatibility (upstream code uses it); nothing in this project calls it."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def sample(self) -> torch.Tensor:
        return self.value

    def mode(self) -> torch.Tensor:
        return self.value


class DiagonalGaussianDistribution(AbstractDistribution):
    """Gaussian with diagonal covariance; ``parameters`` is ``cat([mean, logvar], dim=1)``.

    The log-variance is clamped to [-30, 20]. With ``deterministic`` the variance is zero.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean + std * eps`` with ``eps ~ N(0, I)`` drawn on the parameters' device (global RNG by default)."""
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.parameters.device, dtype=self.parameters.dtype
        )
        return self.mean + self.std * eps

    def _zero(self) -> torch.Tensor:
        return torch.zeros(1, device=self.parameters.device, dtype=self.parameters.dtype)

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other) per sample, summed over (C, H, W); ``other`` defaults to N(0, I)."""
        if self.deterministic:
            return self._zero()
        if other is None:
            return 0.5 * torch.sum(torch.pow(self.mean, 2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum(
            torch.pow(self.mean - other.mean, 2) / other.var
            + self.var / other.var
            - 1.0
            - self.logvar
            + other.logvar,
            dim=[1, 2, 3],
        )

    def nll(self, sample: torch.Tensor, dims: list[int] | tuple[int, ...] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of ``sample``, summed over ``dims``."""
        if self.deterministic:
            return self._zero()
        logtwopi = np.log(2.0 * np.pi)
        return 0.5 * torch.sum(logtwopi + self.logvar + torch.pow(sample - self.mean, 2) / self.var, dim=list(dims))

    def mode(self) -> torch.Tensor:
        return self.mean


def normal_kl(
    mean1: torch.Tensor | float,
    logvar1: torch.Tensor | float,
    mean2: torch.Tensor | float,
    logvar2: torch.Tensor | float,
) -> torch.Tensor:
    """Elementwise KL divergence between two Gaussians given by mean and log-variance (scalars broadcast).

    Kept for API compatibility (upstream code uses it); nothing in this project calls it.
    """
    tensor = next((obj for obj in (mean1, logvar1, mean2, logvar2) if isinstance(obj, torch.Tensor)), None)
    assert tensor is not None, "at least one argument must be a Tensor"
    logvar1, logvar2 = (
        x if isinstance(x, torch.Tensor) else torch.tensor(x).to(tensor) for x in (logvar1, logvar2)
    )
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )
