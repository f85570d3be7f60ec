"""Style dataset for Textual Inversion: a handful of artworks in one style, captioned "a painting in the style of *".

Same behaviour as the object dataset (:mod:`ldm.data.personalized`, whose implementation this module reuses; its
docstring lists the fixes relative to the original code) with the style template lists below. As in the original,
the constructor has no ``mixing_prob`` / ``coarse_class_text``: the dual-template probability is fixed at 0.25 and
the placeholder is used on its own.
"""
from __future__ import annotations

import os

from ldm.data.personalized import TemplateCaptionDataset, per_img_token_list

__all__ = ["PersonalizedBase", "imagenet_dual_templates_small", "imagenet_templates_small", "per_img_token_list"]

imagenet_templates_small = [
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
]

imagenet_dual_templates_small = [
    "a painting in the style of {} with {}",
    "a rendering in the style of {} with {}",
    "a cropped painting in the style of {} with {}",
    "the painting in the style of {} with {}",
    "a clean painting in the style of {} with {}",
    "a dirty painting in the style of {} with {}",
    "a dark painting in the style of {} with {}",
    "a cool painting in the style of {} with {}",
    "a close-up painting in the style of {} with {}",
    "a bright painting in the style of {} with {}",
    "a cropped painting in the style of {} with {}",
    "a good painting in the style of {} with {}",
    "a painting of one {} in the style of {}",
    "a nice painting in the style of {} with {}",
    "a small painting in the style of {} with {}",
    "a weird painting in the style of {} with {}",
    "a large painting in the style of {} with {}",
]


class PersonalizedBase(TemplateCaptionDataset):
    """The style dataset of the original code (style templates, mixing probability fixed at 0.25)."""

    templates = imagenet_templates_small
    dual_templates = imagenet_dual_templates_small

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
        size_conditioning: bool = False,
        random_crop: bool = False,
    ) -> None:
        super().__init__(
            data_root,
            size=size,
            repeats=repeats,
            interpolation=interpolation,
            flip_p=flip_p,
            set=set,
            placeholder_token=placeholder_token,
            per_image_tokens=per_image_tokens,
            center_crop=center_crop,
            mixing_prob=0.25,
            size_conditioning=size_conditioning,
            random_crop=random_crop,
        )
