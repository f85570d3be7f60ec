"""First-stage autoencoders of latent diffusion: they map images to the latent space the UNet works in and back.

``AutoencoderKL`` (Stable Diffusion, LDM text-to-image) encodes to a diagonal Gaussian posterior; ``VQModel`` and
``VQModelInterface`` quantise to a codebook; ``IdentityFirstStage`` leaves the input as it is (pixel-space
diffusion). Parameter names follow the original so its checkpoints load unchanged. ``AutoencoderKL`` can also be
trained by ``main.py`` (:mod:`ldm.models.autoencoder_training`: reconstruction + KL, without the original's LPIPS and
discriminator); the VQ models are inference only.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from einops import rearrange
from torch import nn

from ldm.checkpoint import load_state_dict
from ldm.models.autoencoder_training import AutoencoderKLTrainingMixin
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)


def _load_state_dict(path: str, ignore_keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint, without keys starting with ``ignore_keys``."""
    sd = load_state_dict(path, what="first_stage_config.params.ckpt_path")
    return {k: v for k, v in sd.items() if not any(k.startswith(ik) for ik in ignore_keys)}


class _FirstStageBase(pl.LightningModule):
    """What both autoencoders share: input extraction from a batch and checkpoint loading."""

    image_key: str

    def get_input(self, batch: Mapping[str, Any], k: str) -> torch.Tensor:
        """``batch[k]`` as a float ``[N, C, H, W]`` tensor (batches store images channels-last)."""
        x = batch[k]
        if len(x.shape) == 3:
            x = x[..., None]
        return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = ()) -> None:
        """Load weights from ``path`` (non-strict, as the original), dropping keys that start with ``ignore_keys``."""
        missing, unexpected = self.load_state_dict(_load_state_dict(path, ignore_keys), strict=False)
        logger.info("Restored from %s (%d missing, %d unexpected keys)", path, len(missing), len(unexpected))

    def _init_common(self, image_key: str, colorize_nlabels: int | None, monitor: str | None) -> None:
        self.image_key = image_key
        if colorize_nlabels is not None:
            assert isinstance(colorize_nlabels, int)
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor


class AutoencoderKL(AutoencoderKLTrainingMixin, _FirstStageBase):
    """Autoencoder with a KL-regularised continuous latent of ``embed_dim`` channels."""

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        lossconfig: Mapping[str, Any],
        embed_dim: int,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
    ) -> None:
        super().__init__()
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        assert ddconfig["double_z"]
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim
        self._init_common(image_key, colorize_nlabels, monitor)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """The posterior over latents of the images ``x`` (in [-1, 1])."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images from (unscaled) latents ``z``."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, input: torch.Tensor, sample_posterior: bool = True
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruction of ``input`` through a posterior sample (or its mode), and the posterior."""
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook quantisation with a straight-through gradient (taming's ``VectorQuantizer2``).

    ``forward(z)`` returns ``(z_q, loss, (None, None, indices))``; with ``legacy`` the commitment weight ``beta``
    multiplies the codebook term, as in the original.
    """

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25, legacy: bool = True, sane_index_shape: bool = False):
        super().__init__()
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.legacy = legacy
        self.sane_index_shape = sane_index_shape
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[None, None, torch.Tensor]]:
        z = rearrange(z, "b c h w -> b h w c").contiguous()
        flat = z.view(-1, self.e_dim)
        weight = self.embedding.weight
        d = flat.pow(2).sum(dim=1, keepdim=True) + weight.pow(2).sum(dim=1) - 2 * flat @ weight.t()
        indices = torch.argmin(d, dim=1)
        z_q = self.embedding(indices).view(z.shape)
        codebook = torch.mean((z_q - z.detach()) ** 2)
        commitment = torch.mean((z_q.detach() - z) ** 2)
        loss = commitment + self.beta * codebook if self.legacy else self.beta * commitment + codebook
        z_q = rearrange(z + (z_q - z).detach(), "b h w c -> b c h w").contiguous()
        if self.sane_index_shape:
            indices = indices.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
        return z_q, loss, (None, None, indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape: Sequence[int] | None = None) -> torch.Tensor:
        """Codebook vectors of ``indices``; with ``shape`` = (b, h, w, c) returned as ``[b, c, h, w]``."""
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q


class VQModel(_FirstStageBase):
    """Autoencoder with a vector-quantised latent (codebook of ``n_embed`` vectors of ``embed_dim``)."""

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        lossconfig: Mapping[str, Any],
        n_embed: int,
        embed_dim: int,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
        remap: Any = None,
        sane_index_shape: bool = False,
        **unused_training_kwargs: Any,
    ) -> None:
        super().__init__()
        if remap is not None:
            raise NotImplementedError("codebook index remapping is not supported")
        self.embed_dim = embed_dim
        self.n_embed = n_embed
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=0.25, sane_index_shape=sane_index_shape)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self._init_common(image_key, colorize_nlabels, monitor)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def encode_to_prequant(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[None, None, torch.Tensor]]:
        """``(quantised latent, codebook loss, (None, None, indices))``."""
        return self.quantize(self.encode_to_prequant(x))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, code_b: torch.Tensor) -> torch.Tensor:
        """Images from codebook indices ``[b, h, w]``. Kept for API compatibility (upstream code uses it); nothing in this project calls it."""
        b, h, w = code_b.shape
        quant = self.quantize.get_codebook_entry(code_b.reshape(-1), (b, h, w, self.embed_dim))
        return self.decode(quant)

    def forward(self, input: torch.Tensor, return_pred_indices: bool = False) -> tuple[torch.Tensor, ...]:
        quant, diff, (_, _, ind) = self.encode(input)
        dec = self.decode(quant)
        return (dec, diff, ind) if return_pred_indices else (dec, diff)


class VQModelInterface(VQModel):
    """``VQModel`` as the diffusion model uses it: ``encode`` stops before quantisation, ``decode`` quantises."""

    def __init__(self, embed_dim: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, embed_dim=embed_dim, **kwargs)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_to_prequant(x)

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant))


class IdentityFirstStage(nn.Module):
    """A first stage that does nothing (diffusion directly on the input). Kept for API compatibility: upstream
    configs may name it as ``first_stage_config``; no shipped config does."""

    def __init__(self, *args: Any, vq_interface: bool = False, **kwargs: Any) -> None:
        super().__init__()
        self.vq_interface = vq_interface

    def encode(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x

    def decode(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x

    def quantize(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.vq_interface:
            return x, None, [None, None, None]
        return x

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x
