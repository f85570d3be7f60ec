"""The loss of a KL autoencoder trained here: L1 reconstruction plus a weighted KL term, per image.

This is the original's ``LPIPSWithDiscriminator`` (the loss Stable Diffusion's ``AutoencoderKL`` was trained with)
without its two parts that need more than this project has: the LPIPS perceptual term (its VGG weights cannot be
downloaded here) and the patch discriminator (an adversarial second optimizer, needed for sharp textures of real
photographs, not for the flat colours of the shapes world). What remains is kept as the original computes it:

* ``rec = |x - x_rec|`` per pixel, then ``nll = rec / exp(logvar) + logvar`` summed over the pixels of an image and
  averaged over the batch. The original declares ``logvar`` a parameter but never gives it to an optimizer, so it
  stays at ``logvar_init``; here it is a buffer, under the same key ``loss.logvar``.
* ``kl`` is the posterior's KL divergence to N(0, I), summed over the latent and averaged over the batch, weighted
  by ``kl_weight`` (1e-6 in Stable Diffusion's autoencoder configs).
"""
from __future__ import annotations

import torch
from torch import nn

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution


class ReconstructionKLLoss(nn.Module):
    """``sum(|x - x_rec|) / exp(logvar) + logvar`` per image + ``kl_weight * KL(posterior || N(0, I))``."""

    def __init__(self, kl_weight: float = 1.0e-6, logvar_init: float = 0.0) -> None:
        super().__init__()
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
        self.kl_weight = kl_weight
        self.register_buffer("logvar", torch.full((), float(logvar_init)))

    def forward(
        self, inputs: torch.Tensor, reconstructions: torch.Tensor, posteriors: DiagonalGaussianDistribution,
        split: str = "train",
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of a batch and what to log (``<split>/total_loss``, ``rec_loss`` (mean per pixel), ...)."""
        rec = (inputs.contiguous() - reconstructions.contiguous()).abs()
        nll = rec / torch.exp(self.logvar) + self.logvar
        batch = inputs.shape[0]
        nll_loss = nll.sum() / batch
        kl_loss = posteriors.kl().sum() / batch
        loss = nll_loss + self.kl_weight * kl_loss
        log = {
            f"{split}/total_loss": loss.detach(),
            f"{split}/logvar": self.logvar.detach(),
            f"{split}/kl_loss": kl_loss.detach(),
            f"{split}/nll_loss": nll_loss.detach(),
            f"{split}/rec_loss": rec.detach().mean(),
        }
        return loss, log
