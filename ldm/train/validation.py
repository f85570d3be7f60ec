"""A deterministic validation loss for inversion: the diffusion loss on one fixed batch.

The training loss of a diffusion model is a poor signal: every step draws other images, timesteps and noise, so its
step-to-step spread hides the trend (good and failed inversions have loss curves that look alike). Following
Voronov et al. ("Is This Loss Informative?", NeurIPS 2023), this module fixes everything that is random once:

* the images (each training image in turn, unflipped), encoded to the posterior *mean* (no latent sampling);
* the captions (the dataset's templates taken in order, ``[filewords]`` filled in);
* the timesteps, spread evenly over the whole schedule (item ``k`` of ``n`` at ``(k + 0.5) / n`` of it);
* the noise, drawn once from a dedicated ``torch.Generator`` seeded by ``seed``.

The loss on that batch changes only when the learned vectors change, so two calls with the same vectors give the
same number bit for bit. It never draws from the global random generators (Python's, NumPy's or torch's): a
training run gives the same steps with or without it.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from ldm.data.personalized import FILEWORDS
from ldm.errors import ConfigError
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

logger = logging.getLogger(__name__)

LOSS_KEY = "val/loss_det"


@dataclass
class FixedBatch:
    """Everything a deterministic loss evaluation needs, on the model's device."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    captions: list[str]


def spread_timesteps(n: int, num_timesteps: int) -> torch.Tensor:
    """``n`` timesteps evenly over ``[0, num_timesteps)``, at the middle of equal bins (no endpoint twice)."""
    return ((torch.arange(n, dtype=torch.float64) + 0.5) * num_timesteps / n).long().clamp_(0, num_timesteps - 1)


def fixed_images_and_captions(dataset: Any, n: int) -> tuple[np.ndarray, list[str]]:
    """``n`` items: image ``k % num_images`` unflipped, caption from template ``k % len(templates)``.

    Datasets without ``get_image``/``templates`` (not a template-caption dataset) give their first ``n`` items,
    read with every global random generator saved and restored, so the training stream is untouched.
    """
    if hasattr(dataset, "get_image") and getattr(dataset, "templates", None):
        images, captions = [], []
        for k in range(n):
            index = k % dataset.num_images
            caption = dataset.templates[k % len(dataset.templates)].format(dataset.placeholder_string)
            if dataset.filewords is not None:
                caption = caption.replace(FILEWORDS, dataset.filewords[index])
            images.append(dataset.get_image(index, False))
            captions.append(caption)
        return np.stack(images), captions
    with preserved_global_rng():
        items = [dataset[k % len(dataset)] for k in range(n)]
    return np.stack([np.asarray(item["image"]) for item in items]), [item["caption"] for item in items]


class preserved_global_rng:
    """Saves Python's, NumPy's and torch's (CPU and CUDA) random states on entry and restores them on exit."""

    def __enter__(self) -> None:
        import random

        self._py, self._np = random.getstate(), np.random.get_state()
        self._fork = torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else [])
        self._fork.__enter__()

    def __exit__(self, *exc: Any) -> None:
        import random

        self._fork.__exit__(*exc)
        random.setstate(self._py)
        np.random.set_state(self._np)


@torch.no_grad()
def build_fixed_batch(model: Any, dataset: Any, size: int, seed: int) -> FixedBatch:
    """Encode the fixed images to their posterior means and draw the fixed noise from its own generator."""
    images, captions = fixed_images_and_captions(dataset, size)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(device=model.device, dtype=torch.float32).contiguous()
    with preserved_global_rng():
        posterior = model.encode_first_stage(x)
        mean = posterior.mean if isinstance(posterior, DiagonalGaussianDistribution) else posterior
        latents = model.scale_factor * mean.detach()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    timesteps = spread_timesteps(size, model.num_timesteps).to(latents.device)
    return FixedBatch(latents, noise, timesteps, captions)


@torch.no_grad()
def deterministic_loss(model: Any, batch: FixedBatch) -> float:
    """The mean simple loss (MSE to the model's target) on ``batch``, in eval mode, without touching any RNG."""
    was_training = model.training
    model.eval()
    try:
        with preserved_global_rng():
            cond = model.get_learned_conditioning(batch.captions)
            _, loss_dict = model.p_losses(batch.latents, cond, batch.timesteps, noise=batch.noise)
    finally:
        model.train(was_training)
    key = next(k for k in loss_dict if k.endswith("/loss_simple"))
    return float(loss_dict[key])


class DeterministicLoss(pl.Callback):
    """Logs ``val/loss_det`` (the loss on a fixed batch) before the first step and every ``every_n_steps`` steps.

    ``history`` keeps ``(step, value)`` for the early stopping of :mod:`ldm.train.early_stopping`; it travels in
    the run's checkpoints (``state_dict``), so a resumed run continues it. The batch itself is not stored: it is a
    function of the images, the frozen first stage and ``seed``, and is made again on resume; its fingerprint is
    stored, and a resumed run whose batch differs (other images or model) says so, since its history then mixes
    two measures.
    """

    def __init__(self, every_n_steps: int = 10, batch_size: int = 8, seed: int = 0) -> None:
        super().__init__()
        if every_n_steps < 1 or batch_size < 1:
            raise ConfigError("DeterministicLoss needs every_n_steps >= 1 and batch_size >= 1")
        self.every_n_steps, self.batch_size, self.seed = every_n_steps, batch_size, seed
        self.batch: FixedBatch | None = None
        self.history: list[tuple[int, float]] = []
        self.restored_fingerprint: str | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dataset = trainer.datamodule.datasets["train"] if trainer.datamodule is not None else trainer.train_dataloader.dataset
        dataset = getattr(dataset, "data", dataset)  # WrappedDataset
        self.batch = build_fixed_batch(pl_module, dataset, self.batch_size, self.seed)
        if self.restored_fingerprint is not None:
            if self.restored_fingerprint and self.restored_fingerprint != batch_fingerprint(self.batch):
                logger.warning("the deterministic-loss batch differs from the one of the interrupted run (other images "
                               "or model?): %s continues a history measured on another batch", LOSS_KEY)
            return
        self.history = []
        if trainer.global_step == 0:
            self.record(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "fingerprint": batch_fingerprint(self.batch) if self.batch is not None else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(int(step), float(value)) for step, value in state_dict["history"]]
        self.restored_fingerprint = state_dict.get("fingerprint") or ""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.record(trainer, pl_module)

    def record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """Compute the loss now, log it and keep it in ``history``."""
        value = deterministic_loss(pl_module, self.batch)
        self.history.append((trainer.global_step, value))
        log_now(trainer, {LOSS_KEY: value})
        return value


def batch_fingerprint(batch: FixedBatch) -> str:
    """A SHA-256 of the batch's latents, noise, timesteps and captions (to tell a resumed run's batch from another)."""
    digest = hashlib.sha256()
    for tensor in (batch.latents, batch.noise, batch.timesteps):
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update("\n".join(batch.captions).encode())
    return digest.hexdigest()


def log_now(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Write ``metrics`` at the current step to every logger now (``LightningModule.log`` would keep only the
    steps that fall on ``log_every_n_steps``)."""
    if trainer.is_global_zero:
        for each in trainer.loggers:
            each.log_metrics(metrics, step=trainer.global_step)
