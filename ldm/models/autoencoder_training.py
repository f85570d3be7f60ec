"""Training of ``AutoencoderKL`` by ``main.py``: the original's generator step, without the discriminator.

The original trains the autoencoder with two optimizers (the autoencoder's and the patch discriminator's); its loss
here, :class:`ldm.modules.losses.ReconstructionKLLoss`, has no discriminator, so one optimizer remains: Adam over the
encoder, decoder and the two 1x1 convolutions with the original's betas (0.5, 0.9). ``log_images`` gives the
original's three grids (inputs, reconstructions, decodings of random latents), which ``main.ImageLogger`` writes.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ldm.errors import ConfigError


class AutoencoderKLTrainingMixin:
    """``training_step``, ``configure_optimizers`` and ``log_images`` of ``AutoencoderKL``."""

    learning_rate: float

    def _check_trainable_loss(self) -> None:
        if not callable(getattr(self.loss, "forward", None)) or isinstance(self.loss, torch.nn.Identity):
            raise ConfigError(
                "model.params.lossconfig is torch.nn.Identity (an inference config): to train the autoencoder set "
                "model.params.lossconfig.target to ldm.modules.losses.ReconstructionKLLoss"
            )

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        self._check_trainable_loss()
        inputs = self.get_input(batch, self.image_key)
        reconstructions, posterior = self(inputs)
        loss, log = self.loss(inputs, reconstructions, posterior, split="train")
        self.log("train/loss", loss.detach(), prog_bar=False, logger=True, on_step=True, on_epoch=True, batch_size=inputs.shape[0])
        self.log_dict(log, prog_bar=False, logger=True, on_step=True, on_epoch=False, batch_size=inputs.shape[0])
        return loss

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        inputs = self.get_input(batch, self.image_key)
        reconstructions, posterior = self(inputs, sample_posterior=False)
        _, log = self.loss(inputs, reconstructions, posterior, split="val")
        self.log_dict(log, prog_bar=False, logger=True, on_step=False, on_epoch=True, batch_size=inputs.shape[0])

    def autoencoder_parameters(self) -> list[torch.nn.Parameter]:
        """What the original's autoencoder optimizer holds (not the loss's ``logvar``: the original leaves it out)."""
        parts = (self.encoder, self.decoder, self.quant_conv, self.post_quant_conv)
        return [p for part in parts for p in part.parameters()]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self._check_trainable_loss()
        return torch.optim.Adam(self.autoencoder_parameters(), lr=self.learning_rate, betas=(0.5, 0.9))

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 8, **unused_kwargs: Any) -> dict[str, torch.Tensor]:
        """``inputs``, ``reconstructions`` (through the posterior's mode) and ``samples`` (random latents decoded)."""
        inputs = self.get_input(batch, self.image_key)[:N].to(self.device)
        posterior = self.encode(inputs)
        return {
            "inputs": inputs,
            "reconstructions": self.decode(posterior.mode()),
            "samples": self.decode(torch.randn_like(posterior.mode())),
        }
