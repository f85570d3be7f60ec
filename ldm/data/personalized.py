"""Object dataset for Textual Inversion: a handful of photos of one concept, captioned from prompt templates.

Each item is one training image (RGB, resized to ``size`` x ``size``, randomly flipped, float32 HWC in [-1, 1])
with a caption such as ``"a photo of a *"``, where ``*`` is the placeholder token whose embedding is learned.
:class:`PersonalizedBase` keeps the original constructor and configuration keys; the shared machinery lives in
:class:`TemplateCaptionDataset`, which the style dataset (:mod:`ldm.data.personalized_style`) reuses with its own
template lists.

Differences from the original code (deliberate fixes):

* files come from :func:`ldm.data.images.list_image_files` (sorted by name, image extensions only, hidden files and
  sub-folders skipped) instead of an unsorted ``os.listdir`` that also picked up stray non-image files;
* unreadable images are skipped with one warning each as long as one image remains; otherwise
  :class:`ldm.data.images.DataRootError` explains what is wrong with the folder; an image under 8 pixels a side is
  refused (:class:`ldm.data.images.ImageTooSmallError`), one enlarged more than 8x to ``size`` warned about;
* images are read by :func:`ldm.data.images.load_rgb_image`: EXIF orientation applied, transparent images composited
  on white, CMYK / 16-bit / float images converted properly to 8-bit RGB;
* each image is decoded, cropped and resized once, at construction, not on every item;
* ``per_image_tokens`` with 22 or more images raises a ``ValueError`` instead of a bare ``assert``; an unknown
  ``interpolation`` name raises a ``ValueError`` listing the choices;
* items carry two extra keys, ``"index"`` (the image number) and ``"flip"`` (whether it was mirrored), and
  :meth:`TemplateCaptionDataset.get_image` / :meth:`TemplateCaptionDataset.sample_caption` give the same data
  without the dataset's own randomness, so a latent cache can encode each (image, flip) pair once;
* ``dataset[i]`` raises ``IndexError`` for ``i`` outside ``range(len(dataset))`` (the original wrapped any index),
  so plain iteration over the dataset terminates.

One addition from AUTOMATIC1111's trainer: a template may hold ``[filewords]``, which is replaced by the caption in
the image's same-name ``.txt`` file (``00.png`` -> ``00.txt``). The file describes what in the picture is *not* the
concept ("red star" for a picture of a red star on the background being learned), so the placeholder learns only
what the real words leave unexplained. A template list that uses ``[filewords]`` needs the file for every image.

Randomness has the original sources: the template is drawn with ``random.choice``, the dual-template coin with
``np.random.uniform()`` (only when ``per_image_tokens`` is on) and the flip with ``torch.rand(1) < flip_p`` (as
torchvision's ``RandomHorizontalFlip`` does), so seeding all three reproduces a run.
"""
from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ldm.data.images import iter_readable_images
from ldm.errors import UserError
from ldm.modules.placeholders import per_img_token_list

imagenet_templates_smallest = [
    "a photo of a {}",
]

imagenet_templates_small = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
    "an illustration of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "an illustration of a clean {}",
    "an illustration of a dirty {}",
    "a dark photo of the {}",
    "an illustration of my {}",
    "an illustration of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "an illustration of the {}",
    "a good photo of the {}",
    "an illustration of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "an illustration of the clean {}",
    "a rendition of a {}",
    "an illustration of a nice {}",
    "a good photo of a {}",
    "an illustration of the nice {}",
    "an illustration of the small {}",
    "an illustration of the weird {}",
    "an illustration of the large {}",
    "an illustration of a cool {}",
    "an illustration of a small {}",
    "a depiction of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a depiction of a clean {}",
    "a depiction of a dirty {}",
    "a dark photo of the {}",
    "a depiction of my {}",
    "a depiction of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a depiction of the {}",
    "a good photo of the {}",
    "a depiction of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a depiction of the clean {}",
    "a rendition of a {}",
    "a depiction of a nice {}",
    "a good photo of a {}",
    "a depiction of the nice {}",
    "a depiction of the small {}",
    "a depiction of the weird {}",
    "a depiction of the large {}",
    "a depiction of a cool {}",
    "a depiction of a small {}",
]

imagenet_dual_templates_small = [
    "a photo of a {} with {}",
    "a rendering of a {} with {}",
    "a cropped photo of the {} with {}",
    "the photo of a {} with {}",
    "a photo of a clean {} with {}",
    "a photo of a dirty {} with {}",
    "a dark photo of the {} with {}",
    "a photo of my {} with {}",
    "a photo of the cool {} with {}",
    "a close-up photo of a {} with {}",
    "a bright photo of the {} with {}",
    "a cropped photo of a {} with {}",
    "a photo of the {} with {}",
    "a good photo of the {} with {}",
    "a photo of one {} with {}",
    "a close-up photo of the {} with {}",
    "a rendition of the {} with {}",
    "a photo of the clean {} with {}",
    "a rendition of a {} with {}",
    "a photo of a nice {} with {}",
    "a good photo of a {} with {}",
    "a photo of the nice {} with {}",
    "a photo of the small {} with {}",
    "a photo of the weird {} with {}",
    "a photo of the large {} with {}",
    "a photo of a cool {} with {}",
    "a photo of a small {} with {}",
]

INTERPOLATIONS = {
    "linear": Image.Resampling.BILINEAR,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def resample_filter(interpolation: str) -> Image.Resampling:
    """The PIL resampling filter for a config name (linear/bilinear, bicubic, lanczos)."""
    try:
        return INTERPOLATIONS[interpolation.lower()]
    except KeyError:
        raise ValueError(
            f"unknown interpolation {interpolation!r}; choose one of {', '.join(sorted(INTERPOLATIONS))}"
        ) from None


def center_square(pixels: np.ndarray) -> np.ndarray:
    """The central ``min(h, w)`` square of an ``[H, W, C]`` array (offsets ``(h - s) // 2``, ``(w - s) // 2``)."""
    height, width = pixels.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return pixels[top : top + side, left : left + side]


def to_model_range(pixels: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> float32 in [-1, 1] (``x / 127.5 - 1``)."""
    return (pixels / 127.5 - 1.0).astype(np.float32)


class TemplateError(UserError, ValueError):
    """A caption template list a dataset cannot use (one line, for the command's error report)."""


FILEWORDS = "[filewords]"


def read_filewords(image_path: Path) -> str:
    """The one-line caption in ``image_path``'s same-name ``.txt`` file (whitespace collapsed)."""
    caption_path = image_path.with_suffix(".txt")
    try:
        text = caption_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = "is missing" if isinstance(err, FileNotFoundError) else f"cannot be read ({err})"
        raise TemplateError(
            f"caption file '{caption_path}' {reason}; the templates use {FILEWORDS}, so every image needs a same-name "
            f".txt file with its caption (or drop {FILEWORDS} from the templates)"
        ) from None
    words = " ".join(text.split())
    if not words:
        raise TemplateError(f"caption file '{caption_path}' is empty; write the image's caption in it")
    return words


class TemplateCaptionDataset(Dataset):
    """Images of one folder, each decoded and resized once, served with template captions and random flips.

    Subclasses choose the caption lists through the class attributes ``templates`` and ``dual_templates``; a config
    may replace the first with its own list (``templates``, each with one ``{}`` for the placeholder), e.g. to learn
    a word for a background ("a photo of a shape on a {} background") rather than an object, and may use
    ``[filewords]`` for each image's own caption file ("a photo of a [filewords] on a {} background").

    ``size_conditioning`` (SDXL) adds each item's ``original_size_as_tuple`` (the file's height and width),
    ``crop_coords_top_left`` (the crop's top-left corner in pixels of the training resolution, mirrored with the
    flip as kohya's sd-scripts do: left becomes width - left - crop width; (0, 0) without a crop) and
    ``target_size_as_tuple`` (the training size), as int64 ``[2]`` tensors.

    ``random_crop`` (what SDXL's trainers do, instead of ``center_crop``): each picture is resized once so that its
    short side is ``size``, and each item is a random ``size`` x ``size`` square of it, its corner drawn with
    ``torch.randint`` after the flip, from the same global generator: a seeded run draws the same crops, and one
    resumed with ``-r`` goes on with the crops the uninterrupted run drew (see ldm/train/resume.py). Items then carry
    ``crop`` (top, left of the square before the flip), which the latent cache adds to its key.
    """

    templates: Sequence[str]
    dual_templates: Sequence[str]

    def __init__(
        self,
        data_root: str | os.PathLike,
        size: int | None = None,
        repeats: int = 100,
        interpolation: str = "bicubic",
        flip_p: float = 0.5,
        set: str = "train",  # noqa: A002 - the original configuration key
        placeholder_token: str = "*",
        per_image_tokens: bool = False,
        center_crop: bool = False,
        mixing_prob: float = 0.25,
        coarse_class_text: str | None = None,
        templates: Sequence[str] | None = None,
        size_conditioning: bool = False,
        random_crop: bool = False,
    ) -> None:
        if random_crop and (center_crop or size is None):
            raise TemplateError("random_crop needs a size and excludes center_crop; set one of the two crops and the size")
        if templates is not None:
            bad = [t for t in templates if t.count("{}") != 1]
            if bad or not templates:
                raise TemplateError(f"templates: each needs exactly one '{{}}' for the placeholder, got {bad or 'none'}")
            self.templates = list(templates)
        self.data_root = Path(data_root)
        self.size = size
        self.interpolation = resample_filter(interpolation)
        self.flip_p = flip_p
        self.placeholder_token = placeholder_token
        self.per_image_tokens = per_image_tokens
        self.center_crop = center_crop
        self.random_crop = random_crop
        self.mixing_prob = mixing_prob
        self.coarse_class_text = coarse_class_text
        self.size_conditioning = size_conditioning
        self.image_paths: list[Path] = []
        self._pixels: list[np.ndarray] = []
        self._geometry: list[tuple[int, int]] = []  # each file's (height, width)
        for path, image in iter_readable_images(self.data_root, size):
            self.image_paths.append(path)
            self._geometry.append((image.height, image.width))
            self._pixels.append(self._prepare(image))
        self.num_images = len(self.image_paths)
        uses_filewords = any(FILEWORDS in t for t in self.templates)
        self.filewords = [read_filewords(p) for p in self.image_paths] if uses_filewords else None
        self._check_per_image_tokens()
        self._length = self.num_images * repeats if set == "train" else self.num_images

    def _check_per_image_tokens(self) -> None:
        limit = len(per_img_token_list)
        if self.per_image_tokens and self.num_images >= limit:
            raise ValueError(
                f"per_image_tokens supports at most {limit - 1} images, but '{self.data_root}' holds "
                f"{self.num_images}; use fewer images or turn per_image_tokens off"
            )

    def _prepare(self, image: Image.Image) -> np.ndarray:
        """RGB image -> optional centre crop -> optional resize to ``size`` x ``size`` -> uint8 ``[H, W, 3]``."""
        pixels = np.asarray(image, dtype=np.uint8)
        if self.center_crop:
            pixels = center_square(pixels)
        if self.size is None:
            return np.ascontiguousarray(pixels)
        shape = (self.size, self.size)
        if self.random_crop:  # the short side to size, the aspect kept: the crop is drawn per item
            height, width = pixels.shape[:2]
            scale = self.size / min(height, width)
            shape = (max(self.size, round(width * scale)), max(self.size, round(height * scale)))
        resized = Image.fromarray(pixels).resize(shape, resample=self.interpolation)
        return np.asarray(resized, dtype=np.uint8)

    def __len__(self) -> int:
        return self._length

    @property
    def placeholder_string(self) -> str:
        """What stands for the concept in captions: the placeholder, prefixed by ``coarse_class_text`` if set."""
        if self.coarse_class_text:
            return f"{self.coarse_class_text} {self.placeholder_token}"
        return self.placeholder_token

    def get_image(self, i: int, flip: bool, crop: tuple[int, int] | None = None) -> np.ndarray:
        """Image ``i % num_images`` as float32 ``[H, W, 3]`` in [-1, 1], mirrored left-right when ``flip``; with
        ``random_crop`` the square at ``crop`` (top, left; default the central one), cut before the flip."""
        pixels = self._pixels[i % self.num_images]
        if self.random_crop:
            top, left = crop if crop is not None else self.central_crop(i)
            pixels = pixels[top : top + self.size, left : left + self.size]
        return to_model_range(pixels[:, ::-1] if flip else pixels)

    def central_crop(self, i: int) -> tuple[int, int]:
        """(top, left) of the central square of the resized image ``i % num_images`` (``random_crop``)."""
        height, width = self._pixels[i % self.num_images].shape[:2]
        return (height - self.size) // 2, (width - self.size) // 2

    def draw_crop(self, i: int) -> tuple[int, int]:
        """A random (top, left) for a square of the resized image ``i % num_images``, each offset uniform over the
        positions that fit, from torch's global generator (``random_crop``)."""
        height, width = self._pixels[i % self.num_images].shape[:2]
        top = int(torch.randint(height - self.size + 1, (1,)).item())
        left = int(torch.randint(width - self.size + 1, (1,)).item())
        return top, left

    def sample_caption(self, i: int) -> str:
        """A random caption for image ``i % num_images`` (dual template with its letter with ``mixing_prob``;
        ``[filewords]`` replaced by the image's caption file)."""
        if self.per_image_tokens and np.random.uniform() < self.mixing_prob:
            letter = per_img_token_list[i % self.num_images]
            return random.choice(self.dual_templates).format(self.placeholder_string, letter)
        caption = random.choice(self.templates).format(self.placeholder_string)
        if self.filewords is not None:
            caption = caption.replace(FILEWORDS, self.filewords[i % self.num_images])
        return caption

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self._length:
            raise IndexError(f"index {i} out of range for a dataset of {self._length} items")
        index = i % self.num_images
        caption = self.sample_caption(index)
        flip = bool(torch.rand(1).item() < self.flip_p)
        crop = self.draw_crop(index) if self.random_crop else None
        item = {"caption": caption, "image": self.get_image(index, flip, crop), "index": index, "flip": flip}
        if crop is not None:
            item["crop"] = torch.tensor(crop)
        if self.size_conditioning:
            item.update(self.size_conditioning_of(index, flip, crop))
        return item

    def size_conditioning_of(self, index: int, flip: bool, crop: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """SDXL's size conditioning of image ``index`` (see the class docstring); ``crop`` as for :meth:`get_image`."""
        height, width = self._geometry[index]
        out_h, out_w = self._pixels[index].shape[:2]
        top = left = 0
        if self.random_crop:
            top, left = crop if crop is not None else self.central_crop(index)
            if flip:
                left = out_w - left - self.size
            out_h = out_w = self.size
        elif self.center_crop:
            side = min(height, width)
            scale = out_h / side
            top, left = round((height - side) // 2 * scale), round((width - side) // 2 * scale)
            if flip:
                left = round(width * scale) - left - out_w
        return {
            "original_size_as_tuple": torch.tensor([height, width]),
            "crop_coords_top_left": torch.tensor([top, left]),
            "target_size_as_tuple": torch.tensor([out_h, out_w]),
        }


class PersonalizedBase(TemplateCaptionDataset):
    """The object dataset of the original code (object templates; see the module docstring)."""

    templates = imagenet_templates_small
    dual_templates = imagenet_dual_templates_small
