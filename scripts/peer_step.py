"""The peer for the benchmark: the diffusers textual-inversion training step, written from the order of operations
of diffusers' ``examples/textual_inversion`` (not its code), at the same architecture as one of our SD configs.

Per step, as the peer does: tokenize the captions; VAE-encode the images and sample the posterior; add noise at
random timesteps; run the whole CLIP text encoder, whose full token-embedding table is the trainable parameter;
UNet forward in the weight dtype; float32 MSE; backward; AdamW step over the table; then copy the original rows back
for every token but the placeholder. Mixed precision as the example: VAE and UNet cast to the weight dtype, the text
encoder kept in float32, the forward under autocast.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F


def _levels(unet_params: Any) -> list[bool]:
    """Which UNet levels have cross-attention (level i works at downsampling 2**i)."""
    return [2**i in list(unet_params.attention_resolutions) for i in range(len(unet_params.channel_mult))]


def build_peer(config: Any, device: torch.device, dtype: torch.dtype | None) -> dict[str, Any]:
    """diffusers UNet and VAE, and a transformers CLIP text encoder, shaped like ``config``'s model."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from ldm.modules.encoders.modules import clip_text_config
    from ldm.modules.encoders.tokenizers import load_clip_tokenizer

    p = config.model.params
    u = p.unet_config.params
    attn = _levels(u)
    ch = [u.model_channels * m for m in u.channel_mult]
    unet = UNet2DConditionModel(
        sample_size=p.image_size, in_channels=u.in_channels, out_channels=u.out_channels, layers_per_block=u.num_res_blocks,
        block_out_channels=ch, cross_attention_dim=u.context_dim, attention_head_dim=u.num_heads,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
    )
    dd = p.first_stage_config.params.ddconfig
    vae = AutoencoderKL(
        in_channels=dd.in_channels, out_channels=dd.out_ch, latent_channels=dd.z_channels, layers_per_block=dd.num_res_blocks,
        block_out_channels=[dd.ch * m for m in dd.ch_mult], down_block_types=["DownEncoderBlock2D"] * len(dd.ch_mult),
        up_block_types=["UpDecoderBlock2D"] * len(dd.ch_mult),
    )
    text_encoder = CLIPTextModel(clip_text_config((p.cond_stage_config.get("params") or {}).get("version", "openai/clip-vit-large-patch14")))
    weight_dtype = dtype or torch.float32
    unet.to(device, weight_dtype).requires_grad_(False)
    vae.to(device, weight_dtype).requires_grad_(False)
    text_encoder.to(device).requires_grad_(False)
    table = text_encoder.get_input_embeddings()
    table.weight.requires_grad_(True)
    return {
        "unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": load_clip_tokenizer().tokenizer,
        "scheduler": DDPMScheduler(beta_start=p.linear_start, beta_end=p.linear_end, beta_schedule="scaled_linear", num_train_timesteps=p.timesteps),
        "dtype": dtype, "weight_dtype": weight_dtype, "scaling": p.scale_factor,
    }


def make_peer_step(peer: dict[str, Any], batch: dict, device: torch.device, placeholder_id: int = 265) -> Callable[[], torch.Tensor]:
    text_encoder, unet, vae, sched = peer["text_encoder"], peer["unet"], peer["vae"], peer["scheduler"]
    table = text_encoder.get_input_embeddings()
    optimizer = torch.optim.AdamW(table.parameters(), lr=5e-3)
    original_rows = table.weight.detach().clone()
    keep = torch.ones(table.weight.shape[0], dtype=torch.bool, device=device)
    keep[placeholder_id] = False
    images = batch["image"].permute(0, 3, 1, 2).contiguous()
    dtype = peer["dtype"]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    text_encoder.train()
    unet.train()

    def step() -> torch.Tensor:
        ids = peer["tokenizer"](batch["caption"], padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            latents = vae.encode(images.to(peer["weight_dtype"])).latent_dist.sample().detach() * peer["scaling"]
            noise = torch.randn_like(latents)
            t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=device).long()
            noisy = sched.add_noise(latents, noise, t)
            hidden = text_encoder(ids)[0].to(peer["weight_dtype"])
            pred = unet(noisy, t, hidden).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        with torch.no_grad():
            table.weight[keep] = original_rows[keep]
        return loss.detach()

    return step
