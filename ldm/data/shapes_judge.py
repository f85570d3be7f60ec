"""The judge of the shapes world: what an image shows, read back exactly enough to score a model.

Everything is read from the 2x2 box average of the image, so pixel-level noise does not decide a colour (a model
with a space-to-depth first stage makes such noise periodic: a faint checkerboard).

* background: the palette colour (:data:`ldm.data.shapes.BACKGROUNDS`) nearest to the median of the border ring;
* foreground mask: pixels whose distance to that border colour exceeds half the image's largest such distance;
* colour: the palette colour (:data:`ldm.data.shapes.COLOURS`) nearest to the median of the mask's core (pixels
  beyond three quarters of the largest distance, so anti-aliased edges do not blend in);
* shape: a ridge-regression classifier on the mask cropped to its bounding box and resized to 16x16 (position and
  scale normalised), plus the fill ratio and aspect ratio of the box. It is fitted on first use, deterministically,
  on generator images (with a little pixel noise and blur, so that model samples are read like the clean ones), in
  about a second; no weights are stored.

An image without a clear object (nothing far enough from the background, or only a few pixels) is judged
``shape="none", colour="none"``.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from ldm.data.shapes import BACKGROUNDS, COLOURS, SHAPES, random_scene, render

logger = logging.getLogger(__name__)

NONE = "none"
MASK_SIZE = 16
MIN_CONTRAST = 45.0  # RGB distance (0..255 units) below which nothing stands out from the background
MIN_PIXELS = 6
RIDGE = 1.0
TRAIN_IMAGES = 1000
_COLOUR_NAMES = list(COLOURS)
_BACKGROUND_NAMES = list(BACKGROUNDS)
_COLOUR_TABLE = np.array([COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float32)
_BACKGROUND_TABLE = np.array([BACKGROUNDS[b] for b in _BACKGROUND_NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Judgement:
    """The judge's reading of one image."""

    shape: str
    colour: str
    background: str

    def matches(self, shape: str | None = None, colour: str | None = None, background: str | None = None) -> bool:
        """Whether every given attribute agrees (``None`` means "any")."""
        return all(want is None or want == got for want, got in
                   ((shape, self.shape), (colour, self.colour), (background, self.background)))


def _nearest(rgb: np.ndarray, table: np.ndarray, names: list[str]) -> str:
    return names[int(np.argmin(((table - rgb) ** 2).sum(axis=1)))]


def _border(pixels: np.ndarray, width: int = 2) -> np.ndarray:
    h, w = pixels.shape[:2]
    ring = np.ones((h, w), dtype=bool)
    ring[width : h - width, width : w - width] = False
    return pixels[ring]


def mask_features(mask: np.ndarray) -> np.ndarray:
    """Position- and scale-free features of a soft mask in [0, 1]: the 16x16 box crop, fill ratio, aspect ratio."""
    ys, xs = np.nonzero(mask > 0.5)
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = mask[top:bottom, left:right].astype(np.float32)
    small = np.asarray(Image.fromarray(crop).resize((MASK_SIZE, MASK_SIZE), Image.Resampling.BILINEAR))
    height, width = bottom - top, right - left
    fill = float(crop.sum()) / (height * width)
    return np.concatenate([small.ravel(), [fill, height / width, 1.0]]).astype(np.float32)


def box2(pixels: np.ndarray) -> np.ndarray:
    """The mean of every 2x2 block of pixels (stride 1: ``[H-1, W-1, C]``), float32."""
    rgb = pixels.astype(np.float32)
    return (rgb[:-1, :-1] + rgb[1:, :-1] + rgb[:-1, 1:] + rgb[1:, 1:]) / 4.0


def _analyse(pixels: np.ndarray) -> tuple[str, str | None, np.ndarray | None]:
    """Background name, colour name (None if empty) and the soft foreground mask (None if empty)."""
    rgb = box2(pixels)
    back = np.median(_border(rgb), axis=0)
    background = _nearest(back, _BACKGROUND_TABLE, _BACKGROUND_NAMES)
    dist = np.sqrt(((rgb - back) ** 2).sum(axis=-1))
    peak = float(dist.max())
    if peak < MIN_CONTRAST:
        return background, None, None
    mask = np.clip((dist - 0.25 * peak) / (0.5 * peak), 0.0, 1.0)
    if int((mask > 0.5).sum()) < MIN_PIXELS:
        return background, None, None
    core = rgb[dist > 0.75 * peak]
    colour = _nearest(np.median(core, axis=0), _COLOUR_TABLE, _COLOUR_NAMES)
    return background, colour, mask


def _degrade(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A generator image made a little like a model sample: slight blur and pixel noise."""
    image = Image.fromarray(pixels)
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.8))))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0.0, rng.uniform(0.0, 12.0), size=pixels.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def shape_classifier(n_images: int = TRAIN_IMAGES, seed: int = 12345) -> np.ndarray:
    """Ridge-regression weights ``[features, n_shapes]`` fitted on generator images (deterministic)."""
    rng = np.random.default_rng(seed)
    feats, labels = [], []
    for k in range(n_images):
        scene = random_scene(rng, shape=SHAPES[k % len(SHAPES)], holdout=frozenset())
        pixels = render(scene)
        if k % 2:
            pixels = _degrade(pixels, rng)
        _, _, mask = _analyse(pixels)
        if mask is None:
            continue
        feats.append(mask_features(mask))
        labels.append(k % len(SHAPES))
    x = np.stack(feats)
    y = np.eye(len(SHAPES), dtype=np.float32)[labels]
    weights = np.linalg.solve(x.T @ x + RIDGE * np.eye(x.shape[1], dtype=np.float32), x.T @ y)
    logger.info("shape classifier fitted on %d generator images", len(labels))
    return weights


def judge(pixels: np.ndarray) -> Judgement:
    """Read one uint8 ``[H, W, 3]`` image."""
    background, colour, mask = _analyse(np.asarray(pixels))
    if mask is None or colour is None:
        return Judgement(NONE, NONE, background)
    scores = mask_features(mask) @ shape_classifier()
    return Judgement(SHAPES[int(np.argmax(scores))], colour, background)


def judge_batch(images: np.ndarray) -> list[Judgement]:
    """Read ``[N, H, W, 3]`` uint8 images."""
    return [judge(image) for image in images]


def to_uint8(samples) -> np.ndarray:
    """Model output ``[N, 3, H, W]`` in [-1, 1] (tensor or array) -> uint8 ``[N, H, W, 3]``."""
    array = samples.detach().float().cpu().numpy() if hasattr(samples, "detach") else np.asarray(samples, dtype=np.float32)
    return np.clip((array.transpose(0, 2, 3, 1) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def generator_accuracy(n: int = 1000, seed: int = 7, degrade: bool = False) -> dict[str, float]:
    """Per-attribute accuracy of the judge on ``n`` fresh generator images (optionally blurred and noised)."""
    rng = np.random.default_rng((seed, 99))
    hits = {"shape": 0, "colour": 0, "background": 0}
    for _ in range(n):
        scene = random_scene(rng, holdout=frozenset())
        pixels = render(scene)
        got = judge(_degrade(pixels, rng) if degrade else pixels)
        hits["shape"] += got.shape == scene.shape
        hits["colour"] += got.colour == scene.colour
        hits["background"] += got.background == scene.background
    return {k: v / n for k, v in hits.items()}
