"""The peer, whole: diffusers' textual-inversion recipe (``examples/textual_inversion`` as its README runs it),
written here from diffusers' library classes (its UNet, VAE, DDPM scheduler, transformers' CLIP text model and
tokenizer) on a diffusers pipeline folder. ``scripts/convert_to_diffusers.py`` makes that folder from our checkpoint,
so both trainers learn on the same weights from the same pictures, and the side-by-side compares the recipes, not
the models.

    python scripts/peer_invert.py --pretrained_model_name_or_path models/sd1-diffusers --train_data_dir DIR \
        --placeholder_token "<cat-toy>" --initializer_token toy --output_dir outputs/peer_cat

The defaults are the README's command: one vector started at the init token's row, AdamW (betas 0.9/0.999, weight
decay 1e-2, eps 1e-8) over the whole token table with every row but the placeholder's put back after each update,
lr 5e-4 scaled by batch x accumulation (1 x 4), constant, 3,000 updates (12,000 pictures), 100 repeats of the
pictures shuffled, the peer's 27 object (or 19 style) templates, bicubic resize, random horizontal flips (p 0.5),
epsilon or v target per the scheduler, float32 MSE. Written: ``learned_embeds.safetensors`` (``{token: [K, D]}``,
as the peer writes it; every ``--save_steps`` also ``learned_embeds-steps-N.safetensors``) and ``peer_run.json``
(updates, wall time to the final word, seconds per update, final loss).

Differences, all outside the arithmetic: no accelerate (one process; gradients accumulate by dividing the loss, as
accelerate does), no mixed precision, no validation images, files written atomically.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.data.images import iter_readable_images  # noqa: E402
from ldm.data.personalized import imagenet_templates_small  # noqa: E402
from ldm.data.personalized_style import imagenet_templates_small as style_templates  # noqa: E402
from ldm.errors import ConfigError, run_cli  # noqa: E402
from ldm.inference import default_device  # noqa: E402
from ldm.io import atomic_write, atomic_write_text  # noqa: E402

logger = logging.getLogger("peer_invert")

PEER_OBJECT_TEMPLATES = imagenet_templates_small[:27]  # the peer's object list is the first 27 of the original's
PEER_STYLE_TEMPLATES = list(style_templates)  # the peer's 19 style templates are the original's


class PeerDataset(Dataset):
    """The peer's dataset: each picture ``repeats`` times, a random template, resized, flipped at random."""

    def __init__(self, folder: str, tokenizer: Any, caption_word: str, size: int, templates: list[str], repeats: int,
                 flip_p: float, center_crop: bool) -> None:
        self.images = [image for _, image in iter_readable_images(folder)]
        self.tokenizer, self.caption_word, self.size, self.templates = tokenizer, caption_word, size, templates
        self.repeats, self.flip_p, self.center_crop = repeats, flip_p, center_crop

    def __len__(self) -> int:
        return len(self.images) * self.repeats

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        text = random.choice(self.templates).format(self.caption_word)
        ids = self.tokenizer(text, padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length,
                             return_tensors="pt").input_ids[0]
        pixels = np.array(self.images[i % len(self.images)]).astype(np.uint8)
        if self.center_crop:
            side = min(pixels.shape[:2])
            top, left = (pixels.shape[0] - side) // 2, (pixels.shape[1] - side) // 2
            pixels = pixels[top : top + side, left : left + side]
        image = Image.fromarray(pixels).resize((self.size, self.size), resample=Image.Resampling.BICUBIC)
        if torch.rand(1).item() < self.flip_p:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        scaled = (np.array(image).astype(np.uint8) / 127.5 - 1.0).astype(np.float32)
        return {"input_ids": ids, "pixel_values": torch.from_numpy(scaled).permute(2, 0, 1)}


@dataclass
class PeerRun:
    """What one peer run did (``peer_run.json``)."""

    updates: int
    images: int
    learning_rate: float
    wall_s: float
    train_s: float
    s_per_update: float
    final_loss: float
    placeholder_token: str
    token_ids: list[int]
    seed: int | None
    device: str


def peer_tokens(tokenizer: Any, token: str, initializer: str, num_vectors: int) -> tuple[list[str], int]:
    """The peer's new tokens (``token``, ``token_1``, ...) and the initializer's id; one line if either is unusable
    (checked before the models load)."""
    tokens = [token] + [f"{token}_{i}" for i in range(1, num_vectors)]
    known = tokenizer.get_vocab()
    if any(t in known for t in tokens):
        raise ConfigError(f"--placeholder_token '{token}' is already a token of the tokenizer; pass a new one such as '<my-word>'")
    init_ids = tokenizer.encode(initializer, add_special_tokens=False)
    if len(init_ids) != 1:
        raise ConfigError(f"--initializer_token '{initializer}' is {len(init_ids)} tokens; the peer's recipe takes one token")
    return tokens, init_ids[0]


def load_peer(opt: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The pipeline folder's parts, as the peer loads them (tokenizer, DDPM scheduler, text encoder, VAE, UNet), with
    the placeholder's rows added to the tokenizer and the text encoder, started at the initializer's row."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = opt.pretrained_model_name_or_path
    if not (Path(folder) / "model_index.json").is_file():
        raise ConfigError(f"--pretrained_model_name_or_path '{folder}' is not a diffusers pipeline folder; make one with scripts/convert_to_diffusers.py")
    local = {"local_files_only": True}
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **local)
    tokens, init_id = peer_tokens(tokenizer, opt.placeholder_token, opt.initializer_token, opt.num_vectors)
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **local).to(device)
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    text_encoder.resize_token_embeddings(len(tokenizer))
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[ids] = table[init_id].clone()
    text_encoder.requires_grad_(False)
    table.requires_grad_(True)
    return {
        "tokenizer": tokenizer, "text_encoder": text_encoder, "ids": ids,
        "scheduler": DDPMScheduler.from_pretrained(folder, subfolder="scheduler", **local),
        "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae", **local).to(device).requires_grad_(False),
        "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **local).to(device).requires_grad_(False),
    }


def save_learned(path: Path, text_encoder: Any, ids: list[int], token: str) -> Path:
    """``{token: rows[min(ids) : max(ids) + 1]}`` as the peer saves it (safetensors, metadata ``format: pt``)."""
    from safetensors.torch import save_file

    rows = text_encoder.get_input_embeddings().weight[min(ids) : max(ids) + 1].detach().cpu().clone()
    return atomic_write(path, lambda temp: save_file({token: rows}, str(temp), metadata={"format": "pt"}))


def train(opt: argparse.Namespace) -> PeerRun:
    start = time.perf_counter()
    if opt.seed is not None:
        random.seed(opt.seed)
        np.random.seed(opt.seed)
        torch.manual_seed(opt.seed)
    device = torch.device(opt.device or default_device())
    peer = load_peer(opt, device)
    tokenizer, text_encoder, vae, unet, scheduler, ids = (peer[k] for k in ("tokenizer", "text_encoder", "vae", "unet", "scheduler", "ids"))
    lr = opt.learning_rate * (opt.gradient_accumulation_steps * opt.train_batch_size if opt.scale_lr else 1)
    table = text_encoder.get_input_embeddings()
    optimizer = torch.optim.AdamW(table.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    templates = PEER_STYLE_TEMPLATES if opt.learnable_property == "style" else PEER_OBJECT_TEMPLATES
    resolution = opt.resolution or unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    dataset = PeerDataset(opt.train_data_dir, tokenizer, " ".join(tokenizer.convert_ids_to_tokens(ids)), resolution,
                          templates, opt.repeats, 0.5, opt.center_crop)
    loader = DataLoader(dataset, batch_size=opt.train_batch_size, shuffle=True, num_workers=0)
    original = table.weight.detach().clone()
    keep = torch.ones(original.shape[0], dtype=torch.bool, device=original.device)
    keep[ids] = False
    out = Path(opt.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    text_encoder.train()
    updates, micro, losses = 0, 0, []
    train_start = time.perf_counter()
    while updates < opt.max_train_steps:
        for batch in loader:
            pixels, input_ids = batch["pixel_values"].to(device), batch["input_ids"].to(device)
            latents = vae.encode(pixels).latent_dist.sample().detach() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device).long()
            noisy = scheduler.add_noise(latents, noise, t)
            pred = unet(noisy, t, text_encoder(input_ids)[0]).sample
            target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
            loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
            (loss / opt.gradient_accumulation_steps).backward()
            losses.append(loss.item())
            micro += 1
            if micro % opt.gradient_accumulation_steps:
                continue
            optimizer.step()
            optimizer.zero_grad()
            with torch.no_grad():
                table.weight[keep] = original[keep]
            updates += 1
            if opt.save_steps and updates % opt.save_steps == 0:
                save_learned(out / f"learned_embeds-steps-{updates}.safetensors", text_encoder, ids, opt.placeholder_token)
            if updates >= opt.max_train_steps:
                break
    save_learned(out / "learned_embeds.safetensors", text_encoder, ids, opt.placeholder_token)
    end = time.perf_counter()
    run = PeerRun(updates, micro * opt.train_batch_size, lr, round(end - start, 3), round(end - train_start, 3),
                  round((end - train_start) / max(updates, 1), 5), float(np.mean(losses[-opt.gradient_accumulation_steps:])),
                  opt.placeholder_token, [int(i) for i in ids], opt.seed, str(device))
    atomic_write_text(out / "peer_run.json", json.dumps(asdict(run), indent=2) + "\n")
    logger.info("peer: %d updates in %.1f s (%.3f s each), final loss %.4f; wrote %s", updates, run.train_s,
                run.s_per_update, run.final_loss, out / "learned_embeds.safetensors")
    return run


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="diffusers' textual-inversion recipe on a diffusers pipeline folder.")
    p.add_argument("--pretrained_model_name_or_path", required=True, help="a diffusers pipeline folder")
    p.add_argument("--train_data_dir", required=True, help="the pictures of the concept")
    p.add_argument("--placeholder_token", required=True, help="a new token, e.g. '<cat-toy>'")
    p.add_argument("--initializer_token", required=True, help="one existing token to start from")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--learnable_property", choices=["object", "style"], default="object")
    p.add_argument("--num_vectors", type=int, default=1)
    p.add_argument("--resolution", type=int, default=None, help="picture size (default: the pipeline's)")
    p.add_argument("--center_crop", action="store_true")
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--train_batch_size", type=int, default=1)
    p.add_argument("--gradient_accumulation_steps", type=int, default=4)
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--scale_lr", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max_train_steps", type=int, default=3000, help="optimizer updates")
    p.add_argument("--save_steps", type=int, default=500)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    opt = p.parse_args(argv)
    for name in ("num_vectors", "train_batch_size", "gradient_accumulation_steps", "max_train_steps", "repeats"):
        if getattr(opt, name) < 1:
            p.error(f"--{name} must be at least 1")
    return opt


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    opt = parse_args(argv)
    run_cli(lambda: train(opt))


if __name__ == "__main__":
    main()
