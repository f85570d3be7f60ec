"""Training behaviour of DDPM/LatentDiffusion under Lightning: the plain LDM training of upstream, and textual
inversion (only the placeholder vectors learn; everything else frozen).

Inversion additions over the original:
- a latent cache: the first stage is frozen and the data are fixed up to the horizontal flip, so each (image, flip)
  pair is encoded once and its posterior mean/std kept; every step draws ``z = mean + std * noise``, exactly the
  original's distribution without running the VAE encoder in the loop;
- Lightning checkpoints keep only what training changes (the vectors, optimizer and loop state), never the frozen
  model, so ``-r`` resumes for real while files stay kilobytes (the original emptied them);
- embedding files are written atomically, numbered as the original (``embeddings_gs-499.pt`` after 500 steps).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from ldm.checkpoint import atomic_torch_save
from ldm.errors import UserError
from ldm.models.diffusion.fast_step import compile_training_step, make_adamw
from ldm.provenance import embedding_record
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.learned_embeds import save_learned_embeds
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or infinite; the last finite embedding has been kept."""


# the model reads its latent-cache keys in ``on_before_batch_transfer`` on purpose, whatever data module feeds it
warnings.filterwarnings("ignore", message="You have overridden `on_before_batch_transfer` in `LightningModule` but have passed in a")

FINITE_CHECK_EVERY = 50  # steps between looks at the non-finite flag (at its newest copy on the host)


class DDPMTrainingMixin:
    """Upstream LDM training: loss on a batch, logging, EMA update, AdamW over the trainable weights.

    A NaN or infinite loss is handled without a host synchronisation per step: the step's gradients are zeroed on the
    device (so the weights, e.g. the learned embedding, stay finite), a flag remembers it, and every
    ``FINITE_CHECK_EVERY`` steps the host looks at its newest copy of the flag (on a GPU the previous check's: the
    host never waits for the device), and at the end of training at its current value; either then stops with
    :class:`NonFiniteLossError`. The
    flags (``step_finite``, ``all_finite``) and the host's copy of it (``finite_flag``) are created in ``DDPM.__init__``.
    """

    def shared_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Loss and loss dict of a batch: ``forward`` on the model's inputs (see ``training_inputs``)."""
        return self(*self.training_inputs(batch))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, loss_dict = self.shared_step(batch)
        self.track_finite(loss)
        # prog_bar=False: Lightning would read each back after every step; main.py's ProgressBar shows them at a refresh
        self.log_dict(loss_dict, prog_bar=False, logger=True, on_step=True, on_epoch=True, batch_size=self.batch_size_of(batch))
        step = torch.full((), float(self.global_step), device=self.device)  # made there: no blocking host-to-device copy
        self.log("global_step", step, prog_bar=False, logger=True, on_step=True, on_epoch=False)
        return loss

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        _, loss_dict = self.shared_step(batch)
        with self.ema_scope():
            _, loss_dict_ema = self.shared_step(batch)
        loss_dict_ema = {f"{k}_ema": v for k, v in loss_dict_ema.items()}
        bs = self.batch_size_of(batch)
        self.log_dict(loss_dict, prog_bar=False, logger=True, on_step=False, on_epoch=True, batch_size=bs)
        self.log_dict(loss_dict_ema, prog_bar=False, logger=True, on_step=False, on_epoch=True, batch_size=bs)

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        if self.use_ema:
            self.model_ema(self.model)

    def track_finite(self, loss: torch.Tensor) -> None:
        """Record, on the device, whether this step's loss is finite; look at the record every few steps."""
        ok = torch.isfinite(loss.detach())
        self.step_finite = ok
        self.all_finite = ok if self.all_finite is None else self.all_finite & ok
        if self.global_step % FINITE_CHECK_EVERY == 0:
            self.raise_if_nonfinite(wait=False)

    def raise_if_nonfinite(self, wait: bool = True) -> None:
        """Stop on a non-finite loss. ``wait=False`` (during training) starts a copy of the flag to the host and
        looks at the newest copy already there (on a GPU, the previous check's), so the host never waits for the
        device; ``wait=True`` reads it now."""
        if self.all_finite is None:
            return
        finite = self.finite_flag.read_now(self.all_finite) if wait else self.finite_flag.exchange(self.all_finite)
        if finite is False:
            raise NonFiniteLossError(
                f"the loss became NaN or infinite (by step {self.global_step}); lower the learning rate or use "
                "--precision 32 (the embedding kept is the last finite one)"
            )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the gradients of a step whose loss was not finite, so no weight becomes NaN (no host sync)."""
        ok = self.step_finite
        if ok is None:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0).mul_(ok)

    def on_train_end(self) -> None:
        self.raise_if_nonfinite()

    @staticmethod
    def batch_size_of(batch: dict) -> int:
        for value in batch.values():
            return len(value)
        return 1

    def trainable_model_parameters(self) -> list[torch.nn.Parameter]:
        params = list(self.model.parameters())
        if getattr(self, "cond_stage_trainable", False) and self.cond_stage_model is not None:
            params += list(self.cond_stage_model.parameters())
        if self.learn_logvar:
            params.append(self.logvar)
        return params

    def configure_optimizers(self) -> Any:
        """AdamW over the trainable weights; with ``fused_optimizer: true`` PyTorch's fused kernel (the same update,
        one pass over all weights: 3-7x faster than the for-each form on the CPU, see shapes-sdxl-train.yaml)."""
        params = self.trainable_model_parameters()
        if getattr(self, "fused_optimizer", False):
            opt = make_adamw(params, lr=self.learning_rate)
        else:
            opt = torch.optim.AdamW(params, lr=self.learning_rate)
        if not self.use_scheduler:
            return opt
        scheduler = instantiate_from_config(self.scheduler_config)
        lr_sched = {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=scheduler.schedule), "interval": "step", "frequency": 1}
        return [opt], [lr_sched]


def latent_cache_keys(batch: dict) -> list[tuple]:
    """Each item's latent-cache key: (image index, flipped), and the crop's (top, left) when the dataset draws random
    crops (an item's ``crop``): one latent per distinct picture the encoder is shown."""
    index, flip = torch.as_tensor(batch["index"]).tolist(), torch.as_tensor(batch["flip"]).tolist()
    keys = [(int(i), bool(f)) for i, f in zip(index, flip)]
    if "crop" in batch:
        keys = [key + tuple(int(c) for c in crop) for key, crop in zip(keys, torch.as_tensor(batch["crop"]).tolist())]
    return keys


class InversionTrainingMixin:
    """Textual inversion on LatentDiffusion: latent cache, embedding-only optimizer, small checkpoints.

    Its state (``latent_cache``, ``embedding_provenance``) is created in ``LatentDiffusion.__init__``.
    """

    @property
    def inverting(self) -> bool:
        return self.embedding_manager is not None and not self.unfreeze_model

    def encode_latents(self, batch: dict, x: torch.Tensor) -> torch.Tensor:
        """The scaled latent sample of each image; with the cache, the VAE encoder runs once per (image, flip)."""
        if not (self.cache_latents and "index" in batch and "flip" in batch):
            return self.get_first_stage_encoding(self.encode_first_stage(x)).detach()
        cache = self.latent_cache
        keys = (batch.get("cache_keys") or latent_cache_keys(batch))[: x.shape[0]]
        # each (image, flip) alone: a convolution's last bits depend on the batch it runs in, and the cache must not
        # depend on which batch met a pair first (a resumed run meets it in another one)
        for j, key in enumerate(keys):
            if key in cache:
                continue
            with torch.no_grad():
                post = self.encode_first_stage(x[j : j + 1])
            mean, std = (post.mean, post.std) if isinstance(post, DiagonalGaussianDistribution) else (post, torch.zeros_like(post))
            cache[key] = (mean[0].detach(), std[0].detach())
        mean = torch.stack([cache[k][0] for k in keys]).to(x.device)
        std = torch.stack([cache[k][1] for k in keys]).to(x.device)
        return self.scale_factor * (mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype))

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Note the latent-cache keys on the host before Lightning moves the batch to the device, where reading
        them would make the host wait for the device every step."""
        if isinstance(batch, dict) and "index" in batch and "flip" in batch:
            batch["cache_keys"] = latent_cache_keys(batch)
        return batch

    def on_fit_start(self) -> None:
        compile_training_step(self, self.compile_options)

    def configure_optimizers(self) -> Any:
        if self.embedding_manager is None:
            return super().configure_optimizers()
        embedding_params = list(self.embedding_manager.embedding_parameters())
        if not self.unfreeze_model:
            return make_adamw(embedding_params, lr=self.learning_rate)
        model_params = list(self.cond_stage_model.parameters()) + list(self.model.parameters())
        return torch.optim.AdamW([{"params": embedding_params, "lr": self.learning_rate}, {"params": model_params}], lr=self.model_lr)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only trainable state in Lightning checkpoints, and write the embedding files next to them."""
        if self.embedding_manager is None:
            return
        if self.inverting:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("embedding_manager.")}
        trainer = self.trainer
        if trainer is None or not trainer.is_global_zero:
            return
        ckpt_dir = getattr(trainer.checkpoint_callback, "dirpath", None)
        if ckpt_dir:
            self.save_embeddings(Path(ckpt_dir), max(trainer.global_step - 1, 0))

    def save_embeddings(self, ckpt_dir: Path, step: int) -> None:
        """``embeddings.pt`` (latest) and ``embeddings_gs-<step>.pt``, each written atomically; on CLIP-tokenized
        models also the latest word as diffusers' ``learned_embeds.safetensors`` (:mod:`ldm.modules.learned_embeds`)."""
        if not self.embeddings_are_finite():
            logger.warning("not saving embeddings at step %d: they are not finite", step)
            return
        record = embedding_record(step=step, **(self.embedding_provenance or {}))
        payload = self.embedding_manager.state_to_save(extra=record)
        for name in ("embeddings.pt", f"embeddings_gs-{step}.pt"):
            atomic_torch_save(payload, ckpt_dir / name)
        if getattr(self.embedding_manager, "is_clip", False):
            save_learned_embeds(ckpt_dir, payload["string_to_param"], payload["string_to_token"], record)

    def embeddings_are_finite(self) -> bool:
        return all(torch.isfinite(p).all() for p in self.embedding_manager.embedding_parameters())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Small checkpoints hold only the embedding: load the rest from the model, not from the file."""
        if self.inverting:
            self.strict_loading = False
