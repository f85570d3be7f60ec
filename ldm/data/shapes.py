"""The shapes world: a tiny, exactly known image distribution for training and judging a text-to-image model.

Every image is ``size`` x ``size`` RGB with one shape (circle, square, triangle, star or cross) of one colour on a
plain background. Shapes are drawn with PIL at 4x the final size and box-downsampled, so edges are anti-aliased.
Size (55-70% of the image side) and position (up to 7% off centre) vary a little; shapes stay upright and keep a
margin of background at the border (the judge reads the background there). The variation is kept small on purpose:
a model trained on one CPU core for an hour must spend its capacity on the words, not on where the shape is.

Captions name the three attributes, e.g. ``"a photo of a red star on a blue background"``; with
``background_omit_p`` a named background, and with ``colour_omit_p`` the shape's colour, sometimes goes unmentioned,
as real captions leave things out. Leaving the colour out also teaches the text encoder that "on a blue background"
is about the background wherever it stands: trained on full captions only, it read the first colour word as the
shape's, and a learned word followed by "on a blue background" drew a blue shape. Two things have no words:

* the pink background: its phrase is always omitted, so no prompt can ask for it (an unmentioned background is pink
  only part of the time): a second concept to invert (``"a photo of a * on a & background"``);
* the combination **orange cross**, which the training set never renders (:data:`HELD_OUT`). Both words are known,
  so "orange cross" as words is the baseline to beat: how far the model composes a pair it never saw.

Captions use ``"a photo of a {}"`` half of the time and the object templates of :mod:`ldm.data.personalized` the
other half, so the inversion captions (``"a cropped photo of the *"``...) contain only words the model was trained on.
The shape word is replaced by the generic ``"shape"`` a fifth of the time, keeping "shape" a sensible init word.

Everything is deterministic: item ``i`` of a dataset with seed ``s`` depends only on ``(s, i)``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ldm.data.personalized import imagenet_templates_small
from ldm.data.images import save_image
from ldm.io import atomic_write_text

logger = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 190),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
BACKGROUNDS = {
    "black": (15, 15, 15),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "blue": (50, 80, 230),
    "green": (40, 170, 60),
    "pink": (250, 170, 205),
}
UNNAMED_BACKGROUND = "pink"
HELD_OUT = frozenset({("orange", "cross")})
GENERIC_SHAPE_WORD = "shape"
MAIN_TEMPLATE = "a photo of a {}"
SUPERSAMPLE = 4
MIN_SIDE, MAX_SIDE = 0.55, 0.7  # the shape's box side as a share of the image side
MAX_SHIFT = 0.07  # the largest offset of the shape's centre from the image centre, as a share of the image side


@dataclass(frozen=True)
class Scene:
    """What one image shows: the shape in a square box of side ``side`` centred at ``(cx, cy)`` (image units)."""

    shape: str
    colour: str
    background: str
    cx: float = 0.5
    cy: float = 0.5
    side: float = 0.6


def describe(shape: str, colour: str | None, background: str) -> str:
    """``"red star on a blue background"``; the pink background has no phrase, and no colour leaves just the shape."""
    phrase = shape if colour is None else f"{colour} {shape}"
    return phrase if background == UNNAMED_BACKGROUND else f"{phrase} on a {background} background"


def allowed(shape: str, colour: str, background: str, holdout: frozenset = HELD_OUT) -> bool:
    """Whether training may show this combination (a visible shape, not held out)."""
    return colour != background and (colour, shape) not in holdout


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    return list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles)))


def _cross(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    a = 0.36 * r
    pts = [(a, r), (a, a), (r, a), (r, -a), (a, -a), (a, -r), (-a, -r), (-a, -a), (-r, -a), (-r, a), (-a, a), (-a, r)]
    return [(cx + x, cy + y) for x, y in pts]


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """The scene as uint8 ``[size, size, 3]``: drawn at 4x, box-downsampled (anti-aliased)."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    fill = COLOURS[scene.colour]
    cx, cy, r = scene.cx * big, scene.cy * big, scene.side * big / 2
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((cx - 0.9 * r, cy - 0.9 * r, cx + 0.9 * r, cy + 0.9 * r), fill=fill)
    elif scene.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    elif scene.shape == "star":
        draw.polygon(_star(cx, cy + 0.1 * r, 1.1 * r), fill=fill)
    elif scene.shape == "cross":
        draw.polygon(_cross(cx, cy, r), fill=fill)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; choose one of {', '.join(SHAPES)}")
    return np.asarray(image.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


def random_scene(rng: np.random.Generator, shape: str | None = None, colour: str | None = None,
                 background: str | None = None, holdout: frozenset = HELD_OUT) -> Scene:
    """A random allowed scene; fixed attributes are kept, the others drawn uniformly (rejecting disallowed ones)."""
    for _ in range(1000):
        s = shape or SHAPES[rng.integers(len(SHAPES))]
        c = colour or list(COLOURS)[rng.integers(len(COLOURS))]
        b = background or list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        if allowed(s, c, b, holdout) or (shape and colour and background):
            break
    else:
        raise ValueError(f"no allowed scene with shape={shape}, colour={colour}, background={background}")
    side, cx, cy = rng.uniform(MIN_SIDE, MAX_SIDE), rng.uniform(-MAX_SHIFT, MAX_SHIFT), rng.uniform(-MAX_SHIFT, MAX_SHIFT)
    return Scene(s, c, b, float(0.5 + cx), float(0.5 + cy), float(side))


def caption_for(scene: Scene, rng: np.random.Generator, generic_p: float = 0.2, main_template_p: float = 0.5,
                background_omit_p: float = 0.0, colour_omit_p: float = 0.0) -> str:
    """A caption from the templates; the shape word becomes "shape" with probability ``generic_p``, a named
    background goes unmentioned with probability ``background_omit_p`` (pink never has a phrase), and the shape's
    colour with probability ``colour_omit_p``."""
    shape = GENERIC_SHAPE_WORD if rng.random() < generic_p else scene.shape
    template = MAIN_TEMPLATE if rng.random() < main_template_p else imagenet_templates_small[rng.integers(len(imagenet_templates_small))]
    background = UNNAMED_BACKGROUND if rng.random() < background_omit_p else scene.background
    colour = None if rng.random() < colour_omit_p else scene.colour
    return template.format(describe(shape, colour, background))


def to_model_range(pixels: np.ndarray) -> np.ndarray:
    """uint8 HWC -> float32 HWC in [-1, 1]."""
    return (pixels / 127.5 - 1.0).astype(np.float32)


class ShapesDataset(Dataset):
    """Training data of the shapes model: ``{"image": float32 HWC in [-1, 1], "caption": str}``.

    ``length`` items, item ``i`` drawn from ``(seed, i)`` alone; a share ``caption_dropout`` of the captions is empty
    (the unconditional prompt of classifier-free guidance). The held-out combinations are never rendered.

    With ``pictures`` > 0 there are only that many pictures: item ``i`` shows picture ``i % pictures`` with a caption
    of its own (drawn from ``(seed, i, 1)``), and says so in ``index`` (with ``flip`` False), the keys of
    ``LatentDiffusion``'s latent cache: a model with an autoencoder first stage then encodes each picture once instead
    of at every step (the encoder would cost as much as the UNet's training step on a CPU).
    """

    def __init__(self, size: int = 32, length: int = 1_000_000, seed: int = 0, caption_dropout: float = 0.1,
                 generic_p: float = 0.2, main_template_p: float = 0.5, background_omit_p: float = 0.0,
                 colour_omit_p: float = 0.0, holdout: list | None = None, pictures: int = 0) -> None:
        if pictures < 0:
            raise ValueError(f"pictures must be >= 0 (0: every item its own picture), got {pictures}")
        self.size = size
        self.pictures = pictures
        self.length = length
        self.seed = seed
        self.caption_dropout = caption_dropout
        self.generic_p = generic_p
        self.main_template_p = main_template_p
        self.background_omit_p = background_omit_p
        self.colour_omit_p = colour_omit_p
        self.holdout = HELD_OUT if holdout is None else frozenset(tuple(pair) for pair in holdout)

    def __len__(self) -> int:
        return self.length

    def scene(self, i: int) -> tuple[Scene, np.random.Generator]:
        """Item ``i``'s scene and the generator that then draws its caption."""
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for a dataset of {self.length} items")
        rng = np.random.default_rng((self.seed, i))
        return random_scene(rng, holdout=self.holdout), rng

    def __getitem__(self, i: int) -> dict:
        if not self.pictures:
            scene, rng = self.scene(i)
        else:
            scene, _ = self.scene(i % self.pictures)
            rng = np.random.default_rng((self.seed, i, 1))
        caption = "" if rng.random() < self.caption_dropout else caption_for(
            scene, rng, self.generic_p, self.main_template_p, self.background_omit_p, self.colour_omit_p)
        item = {"image": to_model_range(render(scene, self.size)), "caption": caption}
        if self.pictures:
            item.update(index=i % self.pictures, flip=False)
        return item


def write_concept(folder: str | os.PathLike, scenes: list[Scene], size: int = 32,
                  filewords: list[str] | None = None) -> list[Path]:
    """Render ``scenes`` as ``00.png``, ``01.png``... into ``folder`` (created); returns the image paths.

    With ``filewords``, each image also gets a same-name ``.txt`` caption file (the ``[filewords]`` of
    :mod:`ldm.data.personalized`).
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, scene in enumerate(scenes):
        path = out / f"{k:02d}.png"
        save_image(Image.fromarray(render(scene, size)), path)
        if filewords is not None:
            atomic_write_text(path.with_suffix(".txt"), filewords[k] + "\n")
        paths.append(path)
    logger.info("wrote %d images to %s", len(paths), out)
    return paths


def concept_scenes(name: str, n: int = 5, seed: int = 0) -> list[Scene]:
    """The scenes of a shipped concept: ``"orange_cross"`` (on black/gray/white) or ``"pink_background"``."""
    rng = np.random.default_rng((seed, len(name)))
    if name == "orange_cross":
        backs = ["black", "gray", "white"]
        return [random_scene(rng, "cross", "orange", backs[k % len(backs)], holdout=frozenset()) for k in range(n)]
    if name == "pink_background":
        return [random_scene(rng, SHAPES[k % 4], list(COLOURS)[k % 5], UNNAMED_BACKGROUND) for k in range(n)]
    raise ValueError(f"unknown concept {name!r}; choose orange_cross or pink_background")


NAMED_BACKGROUNDS = tuple(b for b in BACKGROUNDS if b != UNNAMED_BACKGROUND)
NEUTRAL_BACKGROUNDS = ("black", "gray", "white")


def concept_set(colour: str, shape: str, set_id: int, n: int = 5) -> list[Scene]:
    """``n`` scenes of any concept ``colour shape`` of the world, drawn for picture set ``set_id`` (deterministic).

    Sets differ as users' picture sets do, within what the generator draws (upright shapes of fixed proportions):
    each set has its own size (a centre within the generator's range, +-0.03 per picture), its own offset direction
    (up to 60% of the largest offset, +-40% per picture), and its own backgrounds: one to three of the named ones
    (neutral black/gray/white three times as likely as blue/green; never the shape's colour), so that at least two named
    backgrounds stay unseen for judging editability (:func:`edit_backgrounds`).
    """
    if shape not in SHAPES or colour not in COLOURS:
        raise ValueError(f"unknown concept {colour}:{shape}; colours: {', '.join(COLOURS)}; shapes: {', '.join(SHAPES)}")
    rng = np.random.default_rng((set_id, list(COLOURS).index(colour), SHAPES.index(shape), 22))
    available = [b for b in NAMED_BACKGROUNDS if b != colour]
    weights = np.array([3.0 if b in NEUTRAL_BACKGROUNDS else 1.0 for b in available])
    count = int(rng.integers(1, len(available) - 1))  # 1..3 of 5, or 1..2 of 4: two stay unseen
    backs = [str(b) for b in rng.choice(available, size=count, replace=False, p=weights / weights.sum())]
    side0 = rng.uniform(MIN_SIDE, MAX_SIDE)
    bias = rng.uniform(-0.6, 0.6, size=2) * MAX_SHIFT
    scenes = []
    for k in range(n):
        side = float(np.clip(side0 + rng.uniform(-0.03, 0.03), MIN_SIDE, MAX_SIDE))
        cx, cy = np.clip(bias + rng.uniform(-0.4, 0.4, size=2) * MAX_SHIFT, -MAX_SHIFT, MAX_SHIFT)
        scenes.append(Scene(shape, colour, backs[k % count], float(0.5 + cx), float(0.5 + cy), side))
    return scenes


def edit_backgrounds(colour: str, seen: list[str] | set[str], n: int = 2) -> list[str]:
    """The ``n`` named backgrounds an editability test asks for: blue and green first (as for the orange cross), then
    the neutral ones, never the shape's colour nor a background of the training pictures (``seen``)."""
    order = ["blue", "green", *NEUTRAL_BACKGROUNDS]
    return [b for b in order if b != colour and b not in seen][:n]


def concept_filewords(name: str, scene: Scene) -> str:
    """What a concept image shows besides the concept, in the model's words: the background of an orange-cross
    image ("gray"), the shape of a pink-background image ("red circle")."""
    return scene.background if name == "orange_cross" else f"{scene.colour} {scene.shape}"


def write_concept_folders(root: str | os.PathLike, n: int = 5, size: int = 32, seed: int = 0) -> dict[str, list[Path]]:
    """Write both shipped concepts under ``root`` (``root/orange_cross``, ``root/pink_background``), each image with
    its caption file (:func:`concept_filewords`)."""
    folders = {}
    for name in ("orange_cross", "pink_background"):
        scenes = concept_scenes(name, n, seed)
        words = [concept_filewords(name, scene) for scene in scenes]
        folders[name] = write_concept(Path(root) / name, scenes, size, filewords=words)
    return folders
