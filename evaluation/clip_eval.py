"""The paper's CLIP evaluation of a learned concept: reconstruction (image-image) and editability (text-image).

Protocol (as the original ``evaluation/clip_eval.py``): CLIP ViT-B/32, here through transformers' ``CLIPModel``
from a hub id or a local folder (default ``openai/clip-vit-base-patch32``); 64 samples of the prompt in batches of 8,
DDIM 50 steps, eta 0, guidance scale 5 with ``""`` as the unconditional prompt, at the model's native size (256 px
for LDM-1.4B). Image-image similarity = mean cosine similarity over all pairs (training image, sample); text-image
similarity = mean cosine similarity of the samples to the prompt with the placeholder removed ("a photo of *" ->
"a photo of "). Images in [-1, 1] are mapped to [0, 1], resized (shorter side) to CLIP's input size with bicubic
interpolation, centre-cropped and normalised with CLIP's mean and std. Raw cosines, no 2.5x CLIPScore scaling.

The tokenizer comes from the CLIP folder/cache when it has one, else from the shipped CLIP vocabulary (all OpenAI
CLIP models share it), so nothing is downloaded when the model is local.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ldm.inference import sample_images
from ldm.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
# the openai ``clip`` package's model names (as the original passed them) and their hub ids
OPENAI_CLIP_NAMES = {
    "ViT-B/32": "openai/clip-vit-base-patch32",
    "ViT-B/16": "openai/clip-vit-base-patch16",
    "ViT-L/14": "openai/clip-vit-large-patch14",
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BATCH_SIZE = 8
GUIDANCE_SCALE = 5.0
ETA = 0.0


def _features(output: Any) -> torch.Tensor:
    """Projected features from ``get_*_features`` (a tensor in transformers 4, a ModelOutput in 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_clip_model(clip_model: str | os.PathLike) -> Any:
    from transformers import CLIPModel

    clip_model = OPENAI_CLIP_NAMES.get(str(clip_model), clip_model)
    try:
        return CLIPModel.from_pretrained(str(clip_model))
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"CLIP model '{clip_model}' is neither a local CLIPModel folder nor in the Hugging Face cache "
            f"({type(err).__name__}); pass a local folder or a hub id that can be downloaded"
        ) from err


class CLIPEvaluator:
    """CLIP features and the two similarities, for images in [-1, 1] ``[N, 3, H, W]``."""

    def __init__(self, device: str | torch.device = "cpu", clip_model: str | os.PathLike = DEFAULT_CLIP_MODEL) -> None:
        from ldm.modules.encoders.tokenizers import load_clip_tokenizer

        self.device = torch.device(device)
        self.model = load_clip_model(clip_model).float().to(self.device).eval()
        self.tokenizer = load_clip_tokenizer(str(OPENAI_CLIP_NAMES.get(str(clip_model), clip_model)))
        self.image_size = int(self.model.config.vision_config.image_size)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self.mean = torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=self.device).view(1, 3, 1, 1)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> [0, 1] -> bicubic resize of the shorter side -> centre crop -> CLIP normalisation."""
        x = (images.to(self.device, torch.float32) + 1.0) / 2.0
        h, w = x.shape[-2:]
        size = self.image_size
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(size * long / short)
        new_h, new_w = (size, new_long) if h <= w else (new_long, size)
        if (new_h, new_w) != (h, w):
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        x = x[..., top : top + size, left : left + size]
        return (x - self.mean) / self.std

    def tokenize(self, strings: Sequence[str] | str) -> torch.Tensor:
        texts = [strings] if isinstance(strings, str) else list(strings)
        return self.tokenizer.ids(texts, self.max_length).to(self.device)

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_text_features(input_ids=tokens))

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Features of images already :meth:`preprocess`-ed."""
        return _features(self.model.get_image_features(pixel_values=images))

    def get_text_features(self, text: Sequence[str] | str, norm: bool = True) -> torch.Tensor:
        features = self.encode_text(self.tokenize(text))
        return features / features.norm(dim=-1, keepdim=True) if norm else features

    def get_image_features(self, img: torch.Tensor, norm: bool = True) -> torch.Tensor:
        features = self.encode_images(self.preprocess(img))
        return features / features.norm(dim=-1, keepdim=True) if norm else features

    def img_to_img_similarity(self, src_images: torch.Tensor, generated_images: torch.Tensor) -> float:
        """Mean cosine similarity over all (source, generated) pairs."""
        src = self.get_image_features(src_images)
        gen = self.get_image_features(generated_images)
        return float((src @ gen.T).mean())

    def txt_to_img_similarity(self, text: str, generated_images: torch.Tensor) -> float:
        """Mean cosine similarity of the generated images to ``text``."""
        text_features = self.get_text_features(text)
        gen = self.get_image_features(generated_images)
        return float((text_features @ gen.T).mean())


def strip_placeholders(text: str, placeholders: Sequence[str] = ("*",)) -> str:
    """The prompt without its placeholders, as the original (``"a photo of *"`` -> ``"a photo of "``)."""
    for placeholder in placeholders:
        text = text.replace(placeholder, "")
    return text


class LDMCLIPEvaluator(CLIPEvaluator):
    """Samples a prompt with a (textual-inversion) LatentDiffusion model and scores the samples."""

    @torch.no_grad()
    def generate_samples(
        self, ldm_model: Any, caption: str, n_samples: int, n_steps: int, *, size: int | None = None, seed: int | None = None
    ) -> torch.Tensor:
        """``n_samples`` pictures of ``caption`` in [-1, 1], 8 at a time (DDIM, eta 0, scale 5, ``""`` as uc)."""
        size = size or int(ldm_model.image_size) * 2 ** int(getattr(ldm_model, "num_downs", 3))
        device = ldm_model.betas.device
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        batches = []
        with ldm_model.ema_scope():
            for start in range(0, n_samples, BATCH_SIZE):
                n = min(BATCH_SIZE, n_samples - start)
                images = sample_images(
                    ldm_model, n * [caption], steps=n_steps, eta=ETA, scale=GUIDANCE_SCALE, H=size, W=size,
                    sampler="ddim", generator=generator, verbose=False,
                )
                batches.append(images * 2.0 - 1.0)
        return torch.cat(batches)

    def evaluate(
        self,
        ldm_model: Any,
        src_images: torch.Tensor,
        target_text: str,
        n_samples: int = 64,
        n_steps: int = 50,
        *,
        size: int | None = None,
        seed: int | None = None,
    ) -> tuple[float, float]:
        """(image-image similarity to ``src_images``, text-image similarity to ``target_text`` without placeholders)."""
        samples = self.generate_samples(ldm_model, target_text, n_samples, n_steps, size=size, seed=seed)
        manager = getattr(ldm_model, "embedding_manager", None)
        placeholders = list(manager.string_to_token_dict) if manager is not None else ["*"]
        image_sim = self.img_to_img_similarity(src_images, samples)
        text_sim = self.txt_to_img_similarity(strip_placeholders(target_text, placeholders), samples)
        return image_sim, text_sim


class ImageDirEvaluator(CLIPEvaluator):
    """The same two scores for pictures generated elsewhere. Kept for API compatibility (the original's
    evaluation code has it); nothing in this project calls it."""

    def evaluate(self, gen_samples: torch.Tensor, src_images: torch.Tensor, target_text: str) -> tuple[float, float]:
        image_sim = self.img_to_img_similarity(src_images, gen_samples)
        text_sim = self.txt_to_img_similarity(strip_placeholders(target_text), gen_samples)
        return image_sim, text_sim
