"""DDPM and LatentDiffusion: the frozen text-to-image model of the original work, checkpoint-compatible.

``DDPM`` holds the denoiser (``self.model``, a :class:`DiffusionWrapper` around the UNet), the forward-process
schedule and the noise-prediction loss. ``LatentDiffusion`` adds the first stage (the KL autoencoder), the
conditioning stage (BERT-style or CLIP text encoder) and, for textual inversion, the ``EmbeddingManager`` that owns
the placeholder vectors. Module and buffer names follow the public checkpoints (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.*``, the twelve schedule buffers), so they load unchanged.

Training (optimizer, latent cache, checkpoint hooks) lives in :mod:`ldm.models.diffusion.training`, image logging in
:mod:`ldm.models.diffusion.image_logging`; both are mixed into ``LatentDiffusion`` here.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator

import pytorch_lightning as pl
import torch
from einops import rearrange
from torch import nn

from ldm.checkpoint import CheckpointError, load_state_dict
from ldm.models.autoencoder import VQModelInterface
from ldm.models.diffusion.fast_step import CompileOptions, HostFlag, training_denoiser
from ldm.models.diffusion.image_logging import ImageLoggingMixin
from ldm.models.diffusion.schedule import SCHEDULE_BUFFERS, lvlb_weights, schedule_arrays
from ldm.models.diffusion.training import DDPMTrainingMixin, InversionTrainingMixin
from ldm.modules.diffusionmodules.util import extract_into_tensor, set_gradient_checkpointing
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.util import count_params, default, instantiate_from_config

logger = logging.getLogger(__name__)


def disabled_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replacement for ``.train`` on frozen submodules: Lightning's ``model.train()`` must not flip them back."""
    return self


def freeze_module(module: nn.Module) -> None:
    """Eval mode for good, no gradients: the frozen parts of textual inversion."""
    module.eval()
    module.train = disabled_train.__get__(module)
    for p in module.parameters():
        p.requires_grad = False


# The text encoder's key prefix tells the family: (prefix, name), first match wins.
CHECKPOINT_FAMILIES: tuple[tuple[str, str], ...] = (
    ("conditioner.embedders.", "SDXL (CLIP-L + OpenCLIP-bigG text encoders)"),
    ("cond_stage_model.model.", "SD 2.x (OpenCLIP text encoder)"),
    ("cond_stage_model.transformer.text_model.", "SD v1 (CLIP text encoder)"),
    ("cond_stage_model.transformer.token_emb", "LDM (BERT-style text encoder)"),
)


def checkpoint_family(keys: Any) -> str | None:
    """Which text-to-image family a set of state-dict keys belongs to, when the text encoder tells."""
    keys = list(keys)
    for prefix, family in CHECKPOINT_FAMILIES:
        if any(k.startswith(prefix) for k in keys):
            return family
    return None


def describe_mismatch(path: str, bad_keys: list[str], problem: str, have: str | None, want: str | None) -> str:
    """One line on why a checkpoint does not fit the config, naming both model families when they differ."""
    hint = f"it is an {have} checkpoint but the config builds an {want} model; " if have and want and have != want else ""
    return f"checkpoint '{path}' does not fit the config: {len(bad_keys)} model weights {problem} (e.g. {bad_keys[0]}); {hint}pass the checkpoint that matches the config"


class DiffusionWrapper(nn.Module):
    """Routes the conditioning to the UNet the way ``conditioning_key`` says (the ``model.`` level of checkpoints).

    ``crossattn-adm`` (SDXL; SD 2.x's unCLIP) passes ``c_crossattn`` as the context and ``c_adm`` as the vector ``y``.
    """

    def __init__(self, diff_model_config: Any, conditioning_key: str | None) -> None:
        super().__init__()
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key
        if conditioning_key not in (None, "concat", "crossattn", "hybrid", "adm", "crossattn-adm"):
            raise ValueError(f"unknown conditioning_key '{conditioning_key}'")

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, c_concat: list | None = None, c_crossattn: list | None = None, c_adm: torch.Tensor | None = None
    ) -> torch.Tensor:
        key = self.conditioning_key
        if key is None:
            return self.diffusion_model(x, t)
        if key == "concat":
            return self.diffusion_model(torch.cat([x] + c_concat, dim=1), t)
        if key == "crossattn":
            return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))
        if key == "hybrid":
            return self.diffusion_model(torch.cat([x] + c_concat, dim=1), t, context=torch.cat(c_crossattn, 1))
        if key == "crossattn-adm":
            return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1), y=c_adm)
        return self.diffusion_model(x, t, y=c_crossattn[0])


class DDPM(DDPMTrainingMixin, pl.LightningModule):
    """Gaussian diffusion with a UNet denoiser (the original's constructor arguments and defaults).

    Beyond them: ``fused_optimizer`` (see :meth:`configure_optimizers`) and ``offset_noise`` (0, off, by default): the
    training noise gets a per-image, per-channel constant of that standard deviation added (the "offset noise" of
    Guttenberg, 2023). A noise-predicting model with a schedule whose last step keeps some signal never sees a
    starting point whose channel means differ from the noise's, so the means of the starting noise, not the prompt,
    decide the flat colours of a picture (a background); the offset teaches it to move them. Sampling is unchanged.
    """

    def __init__(
        self,
        unet_config: Any,
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        loss_type: str = "l2",
        ckpt_path: str | None = None,
        ignore_keys: list[str] | tuple = (),
        load_only_unet: bool = False,
        monitor: str | None = "val/loss",
        use_ema: bool = True,
        first_stage_key: str = "image",
        image_size: int = 256,
        channels: int = 3,
        log_every_t: int = 100,
        clip_denoised: bool = True,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        given_betas: Any = None,
        original_elbo_weight: float = 0.0,
        embedding_reg_weight: float = 0.0,
        unfreeze_model: bool = False,
        model_lr: float = 0.0,
        v_posterior: float = 0.0,
        l_simple_weight: float = 1.0,
        conditioning_key: str | None = None,
        parameterization: str = "eps",
        scheduler_config: Any = None,
        use_positional_encodings: bool = False,
        learn_logvar: bool = False,
        logvar_init: float = 0.0,
        fused_optimizer: bool = False,
        offset_noise: float = 0.0,
    ) -> None:
        super().__init__()
        self.fused_optimizer = fused_optimizer
        self.offset_noise = offset_noise
        if parameterization not in ("eps", "x0", "v"):
            raise ValueError(f'parameterization must be "eps", "x0" or "v", not "{parameterization}"')
        self.parameterization = parameterization
        self.cond_stage_model = None
        self.clip_denoised = clip_denoised
        self.log_every_t = log_every_t
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.use_positional_encodings = use_positional_encodings
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        logger.info("%s: the diffusion model has %.2fM parameters", type(self).__name__, count_params(self.model) * 1e-6)
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.model)
        self.use_scheduler = scheduler_config is not None
        if self.use_scheduler:
            self.scheduler_config = scheduler_config
        self.v_posterior = v_posterior
        self.original_elbo_weight = original_elbo_weight
        self.l_simple_weight = l_simple_weight
        self.embedding_reg_weight = embedding_reg_weight
        self.unfreeze_model = unfreeze_model
        self.model_lr = model_lr
        if monitor is not None:
            self.monitor = monitor
        self.register_schedule(given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        self.loss_type = loss_type
        self.learn_logvar = learn_logvar
        logvar = torch.full(fill_value=logvar_init, size=(self.num_timesteps,))
        if learn_logvar:
            self.logvar = nn.Parameter(logvar, requires_grad=True)
        else:  # a buffer moves with the model: no host-to-device copy each step (not saved, as in the original)
            self.register_buffer("logvar", logvar, persistent=False)
        # whether this step's loss, and every loss so far, was finite: device tensors, read only every few steps
        # through the host copy in finite_flag (see DDPMTrainingMixin.track_finite)
        self.step_finite: torch.Tensor | None = None
        self.all_finite: torch.Tensor | None = None
        self.finite_flag = HostFlag()
        if ckpt_path:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, only_model=load_only_unet)

    def register_schedule(
        self,
        given_betas: Any = None,
        beta_schedule: str = "linear",
        timesteps: int = 1000,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
    ) -> None:
        arrays = schedule_arrays(given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s, self.v_posterior)
        self.num_timesteps = int(arrays["betas"].shape[0])
        self.linear_start, self.linear_end = linear_start, linear_end
        with torch.device("cpu"):  # small and exact, whatever device context the model is built in
            buffers = {name: torch.tensor(arrays[name], dtype=torch.float32) for name in SCHEDULE_BUFFERS}
            weights = lvlb_weights(buffers, arrays["alphas"], self.parameterization)
        for name, value in buffers.items():
            self.register_buffer(name, value)
        self.register_buffer("lvlb_weights", weights, persistent=False)
        if torch.isnan(weights).any():
            raise ValueError("the schedule gives NaN variational-bound weights")

    @contextmanager
    def ema_scope(self, context: str | None = None) -> Iterator[None]:
        """Evaluate with the EMA weights (a no-op when ``use_ema`` is off, as in every inversion config)."""
        if self.use_ema:
            self.model_ema.store(self.model.parameters())
            self.model_ema.copy_to(self.model)
            if context is not None:
                logger.info("%s: switched to EMA weights", context)
        try:
            yield None
        finally:
            if self.use_ema:
                self.model_ema.restore(self.model.parameters())
                if context is not None:
                    logger.info("%s: restored training weights", context)

    def init_from_ckpt(self, path: str, ignore_keys: list[str] | tuple = (), only_model: bool = False) -> tuple[list[str], list[str]]:
        """Load pretrained weights from a file (see :meth:`load_pretrained`)."""
        return self.load_pretrained(load_state_dict(path, what="--actual_resume / ckpt_path"), path, ignore_keys, only_model)

    def load_pretrained(
        self, sd: dict[str, torch.Tensor], path: str, ignore_keys: list[str] | tuple = (), only_model: bool = False
    ) -> tuple[list[str], list[str]]:
        """Load pretrained weights non-strictly (as the original); returns (missing, unexpected) keys.

        Keys a config does not use (``model_ema.*`` without EMA) are dropped quietly; with EMA, a checkpoint without
        ``model_ema.*`` (an exported model to train further) starts the average from its weights. A checkpoint that
        leaves model weights missing or of another shape is refused with a message naming the likely mismatch (e.g.
        an SD checkpoint for an LDM config).
        """
        sd = {k: v for k, v in sd.items() if not any(k.startswith(prefix) for prefix in ignore_keys)}
        if not self.use_ema:
            sd = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}
        target = self.model if only_model else self
        own = target.state_dict()
        have, want = checkpoint_family(sd), checkpoint_family(own)
        mismatched = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
        if mismatched:
            raise CheckpointError(describe_mismatch(path, mismatched, "have the wrong shape", have, want))
        missing, unexpected = target.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith("embedding_manager.")]
        if self.use_ema and not only_model and not any(k.startswith("model_ema.") for k in sd):
            # weights without an EMA copy (an exported model): the average starts from the loaded weights
            self.model_ema = LitEma(self.model).to(next(self.model.parameters()).device)
            missing = [k for k in missing if not k.startswith("model_ema.")]
            logger.info("%s has no EMA weights: the EMA starts from the loaded weights", path)
        if missing:
            raise CheckpointError(describe_mismatch(path, missing, "are missing", have, want))
        logger.info("Restored from %s with %d missing and %d unexpected keys", path, len(missing), len(unexpected))
        return list(missing), list(unexpected)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        noise = default(noise, lambda: torch.randn_like(x_start))
        return (
            extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_0 from x_t and the noise in it. Kept for API compatibility (upstream code uses it); nothing in this project calls it."""
        return (
            extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise
        )

    def get_v(self, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v target (Salimans & Ho 2022): v = sqrt(abar_t) noise - sqrt(1 - abar_t) x_0."""
        return (
            extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * noise
            - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * x_start
        )

    def eps_from_output(self, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The noise prediction implied by the model's output, whatever its parameterization (what samplers use).

        v and x0 models avoid the eps model's weakness at the last, almost pure-noise steps, where x_0 = (x_t -
        sqrt(1 - abar) eps) / sqrt(abar) multiplies every error of a small model's eps by up to 1 / sqrt(abar).
        """
        if self.parameterization == "eps":
            return output
        if self.parameterization == "v":
            return (
                extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * output
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t
            )
        return (
            extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - output
        ) / extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    def get_loss(self, pred: torch.Tensor, target: torch.Tensor, mean: bool = True) -> torch.Tensor:
        if self.loss_type == "l1":
            loss = (target - pred).abs()
        elif self.loss_type == "l2":
            loss = torch.nn.functional.mse_loss(target, pred, reduction="none")
        else:
            raise NotImplementedError(f"unknown loss type '{self.loss_type}'")
        return loss.mean() if mean else loss

    def loss_from_prediction(self, model_output: torch.Tensor, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The original's loss: per-sample MSE, weighted by the (fixed) logvar, plus the weighted VLB term."""
        prefix = "train" if self.training else "val"
        if self.parameterization == "eps":
            target = noise
        elif self.parameterization == "x0":
            target = x_start
        else:
            target = self.get_v(x_start, noise, t)
        per_sample = self.get_loss(model_output, target, mean=False).mean(dim=[1, 2, 3])
        loss_dict = {f"{prefix}/loss_simple": per_sample.mean()}
        logvar_t = self.logvar.to(per_sample.device)[t]
        loss = per_sample / torch.exp(logvar_t) + logvar_t
        if self.learn_logvar:
            loss_dict[f"{prefix}/loss_gamma"] = loss.mean()
            loss_dict["logvar"] = self.logvar.data.mean()
        loss = self.l_simple_weight * loss.mean()
        loss_vlb = (self.lvlb_weights[t] * per_sample).mean()
        loss_dict[f"{prefix}/loss_vlb"] = loss_vlb
        loss = loss + self.original_elbo_weight * loss_vlb
        loss_dict[f"{prefix}/loss"] = loss
        return loss, loss_dict

    def training_noise(self, x_start: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like ``x_start``, plus the offset of ``offset_noise`` (see the class)."""
        noise = torch.randn_like(x_start)
        if self.offset_noise > 0:
            noise = noise + self.offset_noise * torch.randn(*x_start.shape[:2], *([1] * (x_start.dim() - 2)),
                                                            device=x_start.device, dtype=x_start.dtype)
        return noise

    def p_losses(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        noise = default(noise, lambda: self.training_noise(x_start))
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        return self.loss_from_prediction(self.model(x_noisy, t), x_start, noise, t)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict]:
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=self.device).long()
        return self.p_losses(x, t, *args, **kwargs)

    def training_inputs(self, batch: dict) -> tuple[Any, ...]:
        """What ``forward`` takes for a batch (the images)."""
        return (self.get_input(batch, self.first_stage_key),)

    def get_input(self, batch: dict, k: str) -> torch.Tensor:
        """Images of a batch as BCHW float (datasets give HWC arrays in [-1, 1])."""
        x = batch[k]
        if len(x.shape) == 3:
            x = x[..., None]
        x = rearrange(x, "b h w c -> b c h w")
        return x.to(memory_format=torch.contiguous_format).float()


class LatentDiffusion(ImageLoggingMixin, InversionTrainingMixin, DDPM):
    """Diffusion in the latent space of a frozen autoencoder, conditioned on text; hosts the EmbeddingManager.

    Beyond the original's arguments: ``cache_latents`` (encode each training image and flip once; on by default),
    ``gradient_checkpointing`` (None: off while inverting, as the original effectively ran, else the UNet's
    ``use_checkpoint``; True/False forces it; it works with every weight frozen), ``context_reg_weight``
    (see :meth:`context_preservation_loss`; 0, off, by default), ``embedding_provenance`` (the run's seed,
    config, base model and images, recorded in every embedding file written; see :func:`ldm.provenance.embedding_record`)
    and ``compile``/``compile_mode``/``compile_backend`` (the training step's denoiser under ``torch.compile``, see
    :mod:`ldm.models.diffusion.fast_step`).
    """

    def __init__(
        self,
        first_stage_config: Any,
        cond_stage_config: Any,
        personalization_config: Any = None,
        num_timesteps_cond: int | None = None,
        cond_stage_key: str = "image",
        cond_stage_trainable: bool = False,
        concat_mode: bool = True,
        cond_stage_forward: str | None = None,
        conditioning_key: str | None = None,
        scale_factor: float = 1.0,
        scale_by_std: bool = False,
        cache_latents: bool = True,
        gradient_checkpointing: bool | None = None,
        context_reg_weight: float = 0.0,
        embedding_provenance: dict[str, Any] | None = None,
        compile: bool | str | None = "auto",
        compile_mode: str | None = None,
        compile_backend: str = "inductor",
        *args: Any,
        **kwargs: Any,
    ) -> None:
        self.num_timesteps_cond = default(num_timesteps_cond, 1)
        self.scale_by_std = scale_by_std
        if self.num_timesteps_cond > kwargs.get("timesteps", 1000):
            raise ValueError("num_timesteps_cond cannot exceed timesteps")
        if conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__":
            conditioning_key = None
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", [])
        super().__init__(*args, conditioning_key=conditioning_key, **kwargs)
        self.concat_mode = concat_mode
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_key = cond_stage_key
        try:
            self.num_downs = len(first_stage_config.params.ddconfig.ch_mult) - 1
        except (AttributeError, KeyError):
            self.num_downs = 0
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        else:
            self.scale_factor = scale_factor
        self.instantiate_first_stage(first_stage_config)
        self.instantiate_cond_stage(cond_stage_config)
        self.cond_stage_forward = cond_stage_forward
        self.clip_denoised = False
        self.cache_latents = cache_latents
        # (image index, flipped[, crop top, left]) -> posterior mean and std of its latent (see
        # InversionTrainingMixin.encode_latents and training.latent_cache_keys)
        self.latent_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.embedding_provenance = embedding_provenance
        self.context_reg_weight = context_reg_weight
        self.compile_options = CompileOptions.from_config(compile, compile_mode, compile_backend)
        self.restarted_from_ckpt = False
        if ckpt_path:
            self.init_from_ckpt(ckpt_path, ignore_keys)
            self.restarted_from_ckpt = True
        self.embedding_manager = None
        if personalization_config is not None:
            self.setup_personalization(personalization_config)
        if gradient_checkpointing is None and self.inverting:
            gradient_checkpointing = False  # what the original effectively ran with; fastest at inversion batch sizes
        if gradient_checkpointing is not None:
            set_gradient_checkpointing(self.model, gradient_checkpointing)

    def setup_personalization(self, personalization_config: Any) -> None:
        """Freeze the model (unless ``unfreeze_model``) and build the EmbeddingManager on the loaded text encoder."""
        if not self.unfreeze_model:
            freeze_module(self.cond_stage_model)
            freeze_module(self.model)
        self.embedding_manager = instantiate_from_config(personalization_config, embedder=self.cond_stage_model)
        params = personalization_config.get("params", None) or {}
        ckpt = params.get("embedding_manager_ckpt", None)
        if ckpt:
            self.embedding_manager.load(ckpt)
        for p in self.embedding_manager.embedding_parameters():
            p.requires_grad = True

    def instantiate_first_stage(self, config: Any) -> None:
        model = instantiate_from_config(config)
        self.first_stage_model = model
        freeze_module(model)

    def instantiate_cond_stage(self, config: Any) -> None:
        if config == "__is_first_stage__":
            self.cond_stage_model = self.first_stage_model
        elif config == "__is_unconditional__":
            self.cond_stage_model = None
        else:
            self.cond_stage_model = instantiate_from_config(config)
            if not self.cond_stage_trainable:
                freeze_module(self.cond_stage_model)

    def get_learned_conditioning(self, c: Any) -> torch.Tensor:
        """Text (or token ids) -> conditioning, with the placeholder vectors substituted when a manager exists."""
        if self.cond_stage_forward is not None:
            return getattr(self.cond_stage_model, self.cond_stage_forward)(c)
        encode = getattr(self.cond_stage_model, "encode", None)
        if not callable(encode):
            return self.cond_stage_model(c)
        c = encode(c, embedding_manager=self.embedding_manager) if self.embedding_manager is not None else encode(c)
        return c.mode() if isinstance(c, DiagonalGaussianDistribution) else c

    def encode_first_stage(self, x: torch.Tensor) -> Any:
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior: Any) -> torch.Tensor:
        """A sample of the posterior (or the latent itself), times ``scale_factor``."""
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample()
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise NotImplementedError(f"encoder_posterior of type '{type(encoder_posterior)}' not yet implemented")
        return self.scale_factor * z

    def decode_first_stage(self, z: torch.Tensor, predict_cids: bool = False, force_not_quantize: bool = False) -> torch.Tensor:
        z = 1.0 / self.scale_factor * z
        if isinstance(self.first_stage_model, VQModelInterface):
            return self.first_stage_model.decode(z, force_not_quantize=force_not_quantize)
        return self.first_stage_model.decode(z)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any, return_ids: bool = False) -> torch.Tensor:
        """The denoiser's prediction; ``cond`` is a tensor, a list of tensors, or the wrapper's keyword dict."""
        if not isinstance(cond, dict):
            if not isinstance(cond, list):
                cond = [cond]
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond}
        x_recon = training_denoiser(self)(x_noisy, t, **cond)
        if isinstance(x_recon, tuple) and not return_ids:
            return x_recon[0]
        return x_recon

    def training_inputs(self, batch: dict) -> tuple[Any, ...]:
        """What ``forward`` takes for a batch: the latents and the conditioning (captions when it encodes them)."""
        return tuple(self.get_input(batch, self.first_stage_key))

    def get_input(  # type: ignore[override]
        self,
        batch: dict,
        k: str,
        return_first_stage_outputs: bool = False,
        force_c_encode: bool = False,
        cond_key: str | None = None,
        return_original_cond: bool = False,
        bs: int | None = None,
    ) -> list:
        """``[z, c]`` for a batch: the scaled latent sample and the conditioning (raw captions when trainable)."""
        x = super().get_input(batch, k)
        if bs is not None:
            x = x[:bs]
        x = x.to(self.device)
        z = self.encode_latents(batch, x)
        c = xc = None
        if self.model.conditioning_key is not None:
            xc = batch[default(cond_key, self.cond_stage_key)]
            if isinstance(xc, torch.Tensor) and xc.dim() == 4 and xc.shape[-1] in (1, 3):
                xc = super().get_input(batch, default(cond_key, self.cond_stage_key)).to(self.device)
            c = self.get_learned_conditioning(xc) if (not self.cond_stage_trainable or force_c_encode) else xc
            if bs is not None:
                c = c[:bs]
        out = [z, c]
        if return_first_stage_outputs:
            out.extend([x, self.decode_first_stage(z)])
        if return_original_cond:
            out.append(xc)
        return out

    def forward(self, x: torch.Tensor, c: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict]:
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=self.device).long()
        if self.model.conditioning_key is None or not self.cond_stage_trainable:
            return self.p_losses(x, c, t, *args, **kwargs)
        # the model encodes the captions itself: the context regulariser can compare encodings of them
        return self.p_losses(x, self.get_learned_conditioning(c), t, *args, captions=c, **kwargs)

    def context_preservation_loss(self, captions: Any, cond: torch.Tensor) -> torch.Tensor:
        """Mean squared change, by the learned vectors, of the text encoder's outputs at every *other* position.

        A learned vector can reach the rest of the prompt through the encoder's self-attention: in the shapes world
        a learned ``*`` left its own outputs harmless but rewrote those of ``on a & background`` after it, so a
        second learned word lost its meaning next to it. This term compares each caption's encoding with the one it
        had with the init words in place and penalises the difference outside the placeholders' own rows.
        """
        manager = self.embedding_manager
        with torch.no_grad(), manager.initial_vectors_in_place():
            reference = self.get_learned_conditioning(captions)
        tokens = captions if isinstance(captions, torch.Tensor) else self.cond_stage_model.tokenize(captions)
        keep = ~manager.substitution_mask(tokens.to(cond.device))
        return (cond - reference).pow(2).mean(dim=-1)[keep].mean()

    def p_losses(  # type: ignore[override]
        self, x_start: torch.Tensor, cond: Any, t: torch.Tensor, noise: torch.Tensor | None = None, captions: Any = None
    ) -> tuple[torch.Tensor, dict]:
        """The diffusion loss of ``x_start`` noised to ``t`` under ``cond``, plus the regularisers (see
        :meth:`add_regularisers`; the context one needs the ``captions`` that ``cond`` encodes)."""
        noise = default(noise, lambda: self.training_noise(x_start))
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        loss, loss_dict = self.loss_from_prediction(self.apply_model(x_noisy, t, cond), x_start, noise, t)
        return self.add_regularisers(loss, loss_dict, cond, captions)

    def add_regularisers(self, loss: torch.Tensor, loss_dict: dict, cond: Any, captions: Any) -> tuple[torch.Tensor, dict]:
        """Both regularisers of the learned vectors, each only with an embedding manager and a weight above 0:
        the original's pull towards the init words (``embedding_reg_weight``), then the context penalty
        (``context_reg_weight``, only when ``captions`` are given, i.e. the model encoded them itself)."""
        if self.embedding_manager is None:
            return loss, loss_dict
        prefix = "train" if self.training else "val"
        if self.embedding_reg_weight > 0:
            reg = self.embedding_manager.embedding_to_coarse_loss().mean()
            loss_dict[f"{prefix}/loss_emb_reg"] = reg
            loss = loss + self.embedding_reg_weight * reg
            loss_dict[f"{prefix}/loss"] = loss
        if self.context_reg_weight > 0 and captions is not None:
            reg = self.context_preservation_loss(captions, cond)
            loss = loss + self.context_reg_weight * reg
            loss_dict.update({f"{prefix}/loss_context_reg": reg.detach(), f"{prefix}/loss": loss})
        return loss, loss_dict

