"""The project's one image reader and writer.

Every training image goes through :func:`load_rgb_image`, so all of the places that read pictures agree on what a
picture is. It fixes three things the original code got wrong or left to the user:

* **EXIF orientation** is applied (``ImageOps.exif_transpose``); phone photos no longer train sideways.
* **Odd colour modes** become 8-bit RGB: transparent images (``RGBA``, ``LA``, ``PA``, ``P``/``L``/``RGB`` with a
  ``transparency`` entry) are composited on **white** (what a transparent PNG looks like in a viewer; a black
  background would teach the embedding a black backdrop), ``CMYK``/``YCbCr``/``1``/``L`` go through Pillow's own
  conversion, and high-bit-depth greyscale (``I;16*``, ``I``, ``F``) is rescaled to 0..255 instead of clipped.
* **Unreadable files** raise :class:`ImageLoadError` with a one-line message naming the file and the fix, instead of
  a Pillow traceback deep inside a DataLoader worker.

:func:`list_image_files` lists a folder's images (sorted, images only, hidden files and sub-folders skipped) and
:func:`iter_readable_images` / :func:`validate_image_folder` decode them up front, warning once per process about each
file that has to be skipped (``main.py`` checks the folder before building the model, then the dataset reads it
again: one warning, not two). An image with a side under :data:`MIN_SIDE` pixels is refused, not skipped: no concept
shows in fewer pixels, so it is a stray file (an icon, a tracking pixel), but it decodes, so the user may have meant
it, and dropping it silently would change the training set they chose. An image enlarged more than
:data:`MAX_UPSCALE` times to the training size only gets a warning: blurry, but maybe intended. :func:`make_grid` and :func:`save_image_grid` replace ``torchvision.utils.make_grid``/``save_image``
(torchvision is not a dependency); the grid layout is torchvision's.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ldm.errors import UserError
from ldm.io import atomic_write

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})

MIN_SIDE = 8  # pixels: below this no concept is recognisable (see minimum_side)
MAX_UPSCALE = 8  # enlarged more than this to the training size, a picture is a blur: warn
_WHITE = (255, 255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


class ImageLoadError(UserError):
    """An image file that cannot be decoded (corrupt, truncated, not an image, unsupported mode)."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = " ".join(str(reason).split())
        super().__init__(
            f"cannot read image '{self.path}': {self.reason}; re-save it as PNG or JPEG, or remove it from the folder"
        )


class DataRootError(UserError):
    """The training-image folder is missing, not a folder, or holds no usable image."""

    def __init__(self, folder: str | os.PathLike, problem: str) -> None:
        self.folder = Path(folder)
        self.problem = problem
        super().__init__(
            f"data root '{self.folder}' {problem}; point --data_root (data_root in the config) at a folder "
            f"of training images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
        )


class ImageTooSmallError(UserError):
    """A training image too small for the training size: enlarged that much it holds no detail of the concept."""

    def __init__(self, path: str | os.PathLike, width: int, height: int, min_side: int) -> None:
        self.path = Path(path)
        super().__init__(
            f"image '{self.path}' is {width}x{height} pixels; training images need at least {min_side} pixels per side "
            "(no concept shows in fewer); remove it from the folder or use a larger copy"
        )


def minimum_side(size: int) -> int:
    """The smallest side a training image may have: :data:`MIN_SIDE` pixels, or the training ``size`` when that is
    smaller (a picture at the training size is never refused)."""
    return min(MIN_SIDE, int(size))


def load_rgb_image(path: str | os.PathLike) -> Image.Image:
    """Read ``path`` fully and return an upright 8-bit RGB image; raise :class:`ImageLoadError` if it cannot be read."""
    try:
        with Image.open(path) as opened:
            opened.load()
            image = _upright(opened, path)
            return _to_rgb(image, path)
    except ImageLoadError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise ImageLoadError(path, str(err) or type(err).__name__) from err


def _upright(image: Image.Image, path: str | os.PathLike) -> Image.Image:
    """Apply the EXIF orientation tag; a malformed EXIF block leaves the image as stored (with a warning)."""
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError) as err:
        logger.warning("ignoring unreadable EXIF orientation of '%s': %s", path, err)
        return image.copy()


def _to_rgb(image: Image.Image, path: str | os.PathLike) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (see the module docstring for the rules)."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_scale_to_uint8(np.asarray(image), image.mode)).convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ImageLoadError(path, f"unsupported colour mode {image.mode} ({err})") from err


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Map 16-bit / 32-bit integer / float greyscale values onto 0..255 without clipping the range away.

    ``I;16*`` is 0..65535 (divided by 257, so 65535 -> 255). ``I`` is treated the same when all values lie in
    0..65535 (older Pillow opens 16-bit PNGs as ``I``). ``F`` in 0..1 is multiplied by 255. Anything else is
    min-max normalised.
    """
    data = values.astype(np.float64)
    low, high = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and high <= 65535):
        scaled = data / 257.0
    elif mode == "F" and low >= 0 and high <= 1:
        scaled = data * 255.0
    elif high > low:
        scaled = (data - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(data)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name; raise :class:`DataRootError` if there are none."""
    root = Path(folder)
    if not root.exists():
        raise DataRootError(root, "does not exist")
    if not root.is_dir():
        raise DataRootError(root, "is not a folder")
    files = sorted(
        entry
        for entry in root.iterdir()
        if not entry.name.startswith(".") and entry.suffix.lower() in IMAGE_EXTENSIONS and entry.is_file()
    )
    if not files:
        raise DataRootError(root, "holds no image file")
    return files


_warned: set[tuple[str, int, int, str]] = set()  # (file, mtime, size, reason) of every skipped file warned about


def _warn_once(path: Path, message: str) -> None:
    """One warning per file, message and process (a changed file, with another mtime, is warned about again)."""
    try:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, message)
    except OSError:
        key = (str(path), 0, 0, message)
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def iter_readable_images(folder: str | os.PathLike, size: int | None = None) -> Iterator[tuple[Path, Image.Image]]:
    """Yield ``(path, RGB image)`` for every readable image of ``folder``; warn once about each skipped file.

    ``size`` is the training size, when the images are for training: an image with a side under
    :func:`minimum_side` raises :class:`ImageTooSmallError`, one enlarged more than :data:`MAX_UPSCALE` times gets a
    warning. Raises :class:`DataRootError` (after the last file) when no image could be read.
    """
    found = False
    for path in list_image_files(folder):
        try:
            image = load_rgb_image(path)
        except ImageLoadError as err:
            _warn_once(path, f"skipping {err}")
            continue
        if size is not None:
            check_image_size(path, image, size)
        found = True
        yield path, image
    if not found:
        raise DataRootError(folder, "holds no readable image (every file failed to decode)")


def check_image_size(path: Path, image: Image.Image, size: int) -> None:
    """Refuse a training image too small to show anything; warn (once) about one enlarged into a blur."""
    side = min(image.size)
    if side < minimum_side(size):
        raise ImageTooSmallError(path, image.width, image.height, minimum_side(size))
    if side * MAX_UPSCALE < int(size):
        _warn_once(path, f"image '{path}' is {image.width}x{image.height} pixels and is enlarged more than {MAX_UPSCALE}x to the "
                         f"training size {size}: it will train on a blurry picture; use a larger copy if you have one")


def validate_image_folder(folder: str | os.PathLike, size: int | None = None) -> list[Path]:
    """Decode every image of ``folder`` up front and return the readable ones (see :func:`iter_readable_images`;
    ``size``: the training size, whose images are checked)."""
    return [path for path, _ in iter_readable_images(folder, size)]


def make_grid(
    tensor: torch.Tensor | Sequence[torch.Tensor], nrow: int = 8, padding: int = 2, pad_value: float = 0.0
) -> torch.Tensor:
    """Tile images ``[N, C, H, W]`` into one ``[3, H', W']`` image, row-major, ``nrow`` per row (torchvision layout).

    Every image gets ``padding`` pixels of ``pad_value`` on each side (shared between neighbours). As in
    torchvision, single-channel input is repeated to three channels and a batch of one image is returned unpadded.
    """
    batch = torch.stack(list(tensor)) if not isinstance(tensor, torch.Tensor) else tensor
    if batch.dim() == 3:
        batch = batch.unsqueeze(0)
    if batch.dim() != 4:
        raise ValueError(f"make_grid expects [N, C, H, W] images, got shape {tuple(batch.shape)}")
    if batch.size(1) == 1:
        batch = batch.repeat(1, 3, 1, 1)
    if batch.size(0) == 1:
        return batch.squeeze(0)
    count, channels, height, width = batch.shape
    columns = min(nrow, count)
    rows = math.ceil(count / columns)
    cell_h, cell_w = height + padding, width + padding
    grid = batch.new_full((channels, cell_h * rows + padding, cell_w * columns + padding), pad_value)
    for k in range(count):
        top = (k // columns) * cell_h + padding
        left = (k % columns) * cell_w + padding
        grid[:, top : top + height, left : left + width] = batch[k]
    return grid


def save_image_grid(
    images: torch.Tensor, path: str | os.PathLike, nrow: int = 8, signed: bool = False, padding: int = 2
) -> Path:
    """Write ``images`` ``[N, 3, H, W]`` as one grid picture (format from the suffix: PNG, JPEG, ...), atomically.

    ``signed=True`` means the values are in [-1, 1] (model space) and are mapped to [0, 1] first; values outside
    the range are clamped. The file is written to a temporary name in the same folder and moved into place, so a
    reader never sees half a file.
    """
    pixels = images.detach().float().cpu()
    if signed:
        pixels = (pixels + 1.0) / 2.0
    grid = make_grid(pixels.clamp(0.0, 1.0), nrow=nrow, padding=padding)
    array = grid.mul(255.0).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return save_image(Image.fromarray(array), path)


def save_image(image: Image.Image, target: str | os.PathLike) -> Path:
    """Save ``image`` through :func:`ldm.io.atomic_write` in the format its suffix names (``.png``, ``.jpg``, ...)."""
    target = Path(target)
    image_format = Image.registered_extensions().get(target.suffix.lower())
    if image_format is None:
        raise ValueError(f"cannot tell the image format of '{target}'; use a .png or .jpg file name")
    options = {"quality": 95} if image_format == "JPEG" else {}
    return atomic_write(target, lambda temp: image.save(temp, format=image_format, **options))