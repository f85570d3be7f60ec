"""Datasets and the image reader/writer: real image files written into tmp_path with PIL, all on CPU."""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data import personalized, personalized_style
from ldm.data.images import (
    DataRootError,
    ImageLoadError,
    list_image_files,
    load_rgb_image,
    make_grid,
    save_image_grid,
    validate_image_folder,
)
from ldm.data.personalized import PersonalizedBase

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def solid(path: Path, color=RED, size=(16, 16), mode="RGB") -> Path:
    Image.new(mode, size, color).save(path)
    return path


def halves(width: int, height: int, left=RED, right=BLUE) -> Image.Image:
    """An RGB image whose left half is ``left`` and right half ``right``."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = left
    pixels[:, width // 2 :] = right
    return Image.fromarray(pixels)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "concept"
    root.mkdir()
    for name, color in [("b.png", GREEN), ("a.jpg", RED), ("c.png", BLUE)]:
        solid(root / name, color)
    return root


# --- listing and validating folders -------------------------------------------------------------------------


def test_list_image_files_sorted_images_only(folder: Path) -> None:
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes((folder / "b.png").read_bytes())
    (folder / "sub").mkdir()
    solid(folder / "sub" / "inner.png")
    solid(folder / "D.JPG")
    assert [p.name for p in list_image_files(folder)] == ["D.JPG", "a.jpg", "b.png", "c.png"]


@pytest.mark.parametrize("case", ["missing", "file", "empty", "no_images"])
def test_bad_data_root_raises_one_line_error(tmp_path: Path, case: str) -> None:
    root = tmp_path / "my_images"
    if case == "file":
        root.write_text("x")
    elif case in ("empty", "no_images"):
        root.mkdir()
        if case == "no_images":
            (root / "readme.txt").write_text("x")
    with pytest.raises(DataRootError) as info:
        PersonalizedBase(root)
    message = str(info.value)
    assert "\n" not in message and str(root) in message and "data_root" in message


def test_unreadable_files_are_skipped_with_a_warning(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "full.jpg", quality=95)
    data = (folder / "full.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "full.jpg").unlink()
    with caplog.at_level(logging.WARNING, logger="ldm.data.images"):
        dataset = PersonalizedBase(folder, size=8)
    assert [p.name for p in dataset.image_paths] == ["a.jpg", "b.png", "c.png"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert all("\n" not in w for w in warnings)
    assert any("corrupt.png" in w for w in warnings) and any("truncated.jpg" in w for w in warnings)


def test_folder_with_only_unreadable_images_raises(tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataRootError, match="no readable image"):
        validate_image_folder(tmp_path)


def test_validate_image_folder_returns_readable_files(folder: Path) -> None:
    (folder / "bad.png").write_bytes(b"nope")
    assert [p.name for p in validate_image_folder(folder)] == ["a.jpg", "b.png", "c.png"]


def test_image_load_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError) as info:
        load_rgb_image(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value) and info.value.path == path


# --- reading images --------------------------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    halves(40, 20).save(path, exif=exif.tobytes(), quality=95)
    image = load_rgb_image(path)
    assert image.size == (20, 40)
    pixels = np.asarray(image).astype(int)
    assert np.abs(pixels[5, 10] - RED).max() < 40  # the left half is now on top
    assert np.abs(pixels[35, 10] - BLUE).max() < 40


def test_transparent_images_are_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)
    rgba[0, 1] = (255, 0, 0, 0)
    rgba[0, 2] = (0, 0, 0, 128)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    pixels = np.asarray(load_rgb_image(tmp_path / "rgba.png"))
    assert tuple(pixels[0, 0]) == RED and tuple(pixels[0, 1]) == WHITE
    assert np.allclose(pixels[0, 2], 127, atol=1)


def test_la_and_palette_transparency(tmp_path: Path) -> None:
    la = Image.new("LA", (4, 4), (0, 0))
    la.putpixel((1, 1), (50, 255))
    la.save(tmp_path / "la.png")
    pixels = np.asarray(load_rgb_image(tmp_path / "la.png"))
    assert tuple(pixels[0, 0]) == WHITE and tuple(pixels[1, 1]) == (50, 50, 50)

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((2, 2), 1)
    palette.save(tmp_path / "p.png", transparency=0)
    pixels = np.asarray(load_rgb_image(tmp_path / "p.png"))
    assert tuple(pixels[0, 0]) == WHITE and tuple(pixels[2, 2]) == GREEN


def test_palette_without_transparency_and_cmyk(tmp_path: Path) -> None:
    solid(tmp_path / "p.gif", 3, mode="P")
    assert load_rgb_image(tmp_path / "p.gif").mode == "RGB"
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    image = load_rgb_image(tmp_path / "cmyk.jpg")
    assert image.mode == "RGB"
    assert np.abs(np.asarray(image)[1, 1].astype(int) - RED).max() < 10


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 128, 65535, 1000]], np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    pixels = np.asarray(load_rgb_image(tmp_path / "deep.png"))
    assert pixels.shape == (1, 4, 3) and pixels.dtype == np.uint8
    assert list(pixels[0, :, 0]) == [0, 128, 255, 4]
    assert (pixels[..., 0] == pixels[..., 2]).all()


def test_float_greyscale_is_scaled(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(tmp_path / "float.tif")
    assert list(np.asarray(load_rgb_image(tmp_path / "float.tif"))[0, :, 1]) == [0, 128, 255]


def test_greyscale_and_bilevel_become_rgb(tmp_path: Path) -> None:
    solid(tmp_path / "l.png", 77, mode="L")
    solid(tmp_path / "one.bmp", 1, mode="1")
    assert tuple(np.asarray(load_rgb_image(tmp_path / "l.png"))[0, 0]) == (77, 77, 77)
    assert tuple(np.asarray(load_rgb_image(tmp_path / "one.bmp"))[0, 0]) == WHITE


# --- the object dataset -----------------------------------------------------------------------------------------


def test_length_train_vs_validation(folder: Path) -> None:
    assert len(PersonalizedBase(folder, repeats=7)) == 21
    assert len(PersonalizedBase(folder, repeats=7, set="val")) == 3
    assert len(PersonalizedBase(folder)) == 300


def test_item_layout_dtype_and_range(folder: Path) -> None:
    item = PersonalizedBase(folder, size=12)[4]
    assert set(item) == {"caption", "image", "index", "flip"}
    assert item["image"].dtype == np.float32 and item["image"].shape == (12, 12, 3)
    assert item["image"].min() >= -1.0 and item["image"].max() <= 1.0
    assert item["index"] == 1 and isinstance(item["flip"], bool)
    assert np.allclose(item["image"][6, 6], [-1.0, 1.0, -1.0])  # b.png (green) is the second sorted file


def test_no_size_keeps_the_original_resolution(tmp_path: Path) -> None:
    solid(tmp_path / "x.png", size=(10, 6))
    assert PersonalizedBase(tmp_path)[0]["image"].shape == (6, 10, 3)


def test_index_out_of_range(folder: Path) -> None:
    dataset = PersonalizedBase(folder, repeats=2)
    with pytest.raises(IndexError):
        dataset[6]
    assert len(list(dataset)) == 6


def test_caption_uses_placeholder_and_a_template(folder: Path) -> None:
    random.seed(0)
    dataset = PersonalizedBase(folder, size=8, placeholder_token="<cat-toy>")
    expected = {t.format("<cat-toy>") for t in personalized.imagenet_templates_small}
    captions = {dataset[i]["caption"] for i in range(200)}
    assert captions <= expected and len(captions) > 20


def test_coarse_class_text_prefixes_the_placeholder(folder: Path) -> None:
    dataset = PersonalizedBase(folder, size=8, coarse_class_text="cat")
    expected = {t.format("cat *") for t in personalized.imagenet_templates_small}
    assert all(dataset.sample_caption(i) in expected for i in range(50))


def test_templates_from_the_config_replace_the_object_templates(folder: Path) -> None:
    own = ["a photo of a shape on a {} background", "a rendering of a shape on a {} background"]
    dataset = PersonalizedBase(folder, size=8, placeholder_token="&", templates=own)
    assert {dataset.sample_caption(i) for i in range(50)} == {t.format("&") for t in own}
    for bad in ([], ["no placeholder"], ["{} and {}"]):
        with pytest.raises(personalized.TemplateError, match="templates"):
            PersonalizedBase(folder, size=8, templates=bad)


def test_filewords_come_from_each_images_caption_file(folder: Path) -> None:
    for name, words in [("a.txt", "red  star\n"), ("b.txt", "green circle"), ("c.txt", "blue square")]:
        (folder / name).write_text(words)
    own = ["a photo of a [filewords] on a {} background", "a [filewords] on {}"]
    dataset = PersonalizedBase(folder, size=8, placeholder_token="&", templates=own)
    for index, words in enumerate(["red star", "green circle", "blue square"]):  # files sorted: a.jpg, b.png, c.png
        captions = {dataset.sample_caption(index) for _ in range(40)}
        assert captions == {t.replace("[filewords]", words).format("&") for t in own}


def test_filewords_without_a_caption_file_is_a_one_line_error(folder: Path) -> None:
    (folder / "a.txt").write_text("red star")
    (folder / "c.txt").write_text("   \n")
    with pytest.raises(personalized.TemplateError, match=r"caption file '.*b\.txt' is missing; .*\[filewords\]"):
        PersonalizedBase(folder, size=8, templates=["a [filewords] {}"])
    (folder / "b.txt").write_text("green circle")
    with pytest.raises(personalized.TemplateError, match=r"caption file '.*c\.txt' is empty"):
        PersonalizedBase(folder, size=8, templates=["a [filewords] {}"])
    assert PersonalizedBase(folder, size=8).filewords is None  # templates without [filewords] never read the files


def test_per_image_tokens_use_dual_templates(folder: Path) -> None:
    dataset = PersonalizedBase(folder, size=8, per_image_tokens=True, mixing_prob=1.0)
    for i in range(9):
        letter = personalized.per_img_token_list[i % 3]
        expected = {t.format("*", letter) for t in personalized.imagenet_dual_templates_small}
        assert dataset[i]["caption"] in expected
    never = PersonalizedBase(folder, size=8, per_image_tokens=True, mixing_prob=0.0)
    assert all("with" not in never.sample_caption(i) for i in range(20))


def test_per_image_tokens_reject_22_images(tmp_path: Path) -> None:
    for k in range(22):
        solid(tmp_path / f"{k:02d}.png", size=(4, 4))
    with pytest.raises(ValueError, match="at most 21 images"):
        PersonalizedBase(tmp_path, per_image_tokens=True)
    assert PersonalizedBase(tmp_path).num_images == 22


def test_center_crop_versus_squash(tmp_path: Path) -> None:
    pixels = np.zeros((20, 60, 3), np.uint8)
    pixels[:, :20], pixels[:, 20:40], pixels[:, 40:] = RED, GREEN, BLUE
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    cropped = PersonalizedBase(tmp_path, size=10, center_crop=True, flip_p=0.0).get_image(0, flip=False)
    assert np.allclose(cropped, [-1.0, 1.0, -1.0], atol=0.02)
    squashed = PersonalizedBase(tmp_path, size=10, flip_p=0.0).get_image(0, flip=False)
    assert np.allclose(squashed[5, 0], [1.0, -1.0, -1.0], atol=0.05)
    assert np.allclose(squashed[5, 5], [-1.0, 1.0, -1.0], atol=0.05)
    assert np.allclose(squashed[5, 9], [-1.0, -1.0, 1.0], atol=0.05)


def test_center_crop_offsets_on_tall_images(tmp_path: Path) -> None:
    pixels = np.arange(7 * 3, dtype=np.uint8).reshape(7, 3, 1).repeat(3, axis=2)
    Image.fromarray(pixels).save(tmp_path / "tall.png")
    image = PersonalizedBase(tmp_path, center_crop=True).get_image(0, flip=False)
    assert np.array_equal(image, personalized.to_model_range(pixels[2:5]))


def test_flip_probability_zero_and_one_mirror(tmp_path: Path) -> None:
    halves(16, 8).save(tmp_path / "lr.png")
    plain = PersonalizedBase(tmp_path, size=8, flip_p=0.0)[0]
    mirrored = PersonalizedBase(tmp_path, size=8, flip_p=1.0)[0]
    assert not plain["flip"] and mirrored["flip"]
    assert np.array_equal(mirrored["image"], plain["image"][:, ::-1])
    assert plain["image"][4, 0, 0] > 0.9 and mirrored["image"][4, 0, 2] > 0.9


def test_get_image_is_deterministic_and_matches_items(tmp_path: Path) -> None:
    halves(16, 8).save(tmp_path / "lr.png")
    dataset = PersonalizedBase(tmp_path, size=8)
    first, again = dataset.get_image(0, flip=False), dataset.get_image(0, flip=False)
    assert np.array_equal(first, again)
    assert np.array_equal(dataset.get_image(0, flip=True), first[:, ::-1])
    torch.manual_seed(0)
    for i in range(10):
        item = dataset[i]
        assert np.array_equal(item["image"], dataset.get_image(item["index"], item["flip"]))


def test_images_are_decoded_once(folder: Path) -> None:
    dataset = PersonalizedBase(folder, size=8)
    for path in list(folder.iterdir()):
        path.unlink()
    assert dataset[5]["image"].shape == (8, 8, 3)


def test_interpolation_names(folder: Path) -> None:
    filters = set(personalized.INTERPOLATIONS.values())
    for name in ("linear", "bilinear", "bicubic", "lanczos"):
        assert PersonalizedBase(folder, size=8, interpolation=name).interpolation in filters
    with pytest.raises(ValueError, match="bicubic"):
        PersonalizedBase(folder, interpolation="nearest-ish")


# --- template lists and the style dataset --------------------------------------------------------------------------


def test_template_counts() -> None:
    assert personalized.imagenet_templates_smallest == ["a photo of a {}"]
    assert len(personalized.imagenet_templates_small) == 81
    assert len(set(personalized.imagenet_templates_small)) == 57
    assert personalized.imagenet_templates_small[27] == "an illustration of a {}"
    assert personalized.imagenet_templates_small[-1] == "a depiction of a small {}"
    assert len(personalized.imagenet_dual_templates_small) == len(set(personalized.imagenet_dual_templates_small)) == 27
    assert len(personalized_style.imagenet_templates_small) == 19
    assert len(set(personalized_style.imagenet_templates_small)) == 17
    assert len(personalized_style.imagenet_dual_templates_small) == 17
    assert len(set(personalized_style.imagenet_dual_templates_small)) == 16
    letters = personalized.per_img_token_list
    assert len(letters) == len(set(letters)) == 22 and letters[0] == "\u05d0" and letters[-1] == "\u05ea"
    assert personalized_style.per_img_token_list is letters


def test_style_dataset_captions(folder: Path) -> None:
    dataset = personalized_style.PersonalizedBase(folder, size=8, placeholder_token="<s>")
    expected = {t.format("<s>") for t in personalized_style.imagenet_templates_small}
    assert all(dataset[i]["caption"] in expected for i in range(50))
    assert dataset.mixing_prob == 0.25 and len(dataset) == 300
    with pytest.raises(TypeError):
        personalized_style.PersonalizedBase(folder, coarse_class_text="cat")


def test_style_dataset_per_image_tokens(folder: Path) -> None:
    np.random.seed(0)
    dataset = personalized_style.PersonalizedBase(folder, size=8, per_image_tokens=True)
    dual = {t.format("*", personalized.per_img_token_list[0]) for t in personalized_style.imagenet_dual_templates_small}
    single = {t.format("*") for t in personalized_style.imagenet_templates_small}
    captions = [dataset.sample_caption(0) for _ in range(400)]
    assert all(c in dual | single for c in captions)
    assert 0.15 < sum(c in dual for c in captions) / len(captions) < 0.35


# --- grids -------------------------------------------------------------------------------------------------------


def test_make_grid_layout_by_hand() -> None:
    images = torch.stack([torch.full((3, 2, 2), float(k + 1)) for k in range(3)])
    grid = make_grid(images, nrow=2, padding=2, pad_value=-1.0)
    expected = torch.full((3, 10, 10), -1.0)
    expected[:, 2:4, 2:4] = 1.0  # row 0, column 0
    expected[:, 2:4, 6:8] = 2.0  # row 0, column 1
    expected[:, 6:8, 2:4] = 3.0  # row 1, column 0; row 1 column 1 stays padding
    assert torch.equal(grid, expected)


def test_make_grid_single_row_single_image_and_grey() -> None:
    row = make_grid(torch.zeros(4, 3, 5, 6), nrow=8)
    assert row.shape == (3, 5 + 4, 4 * 8 + 2)
    single = torch.rand(1, 3, 5, 6)
    assert torch.equal(make_grid(single), single[0])
    assert make_grid(torch.ones(2, 1, 3, 3), nrow=2).shape == (3, 7, 12)


def test_save_image_grid_png_and_signed_range(tmp_path: Path) -> None:
    images = torch.stack([torch.full((3, 4, 4), -1.0), torch.full((3, 4, 4), 1.0)])
    path = save_image_grid(images, tmp_path / "out" / "grid.png", nrow=2, signed=True)
    assert sorted(p.name for p in path.parent.iterdir()) == ["grid.png"]
    pixels = np.asarray(Image.open(path))
    assert pixels.shape == (8, 14, 3)
    assert (pixels[2, 2] == 0).all() and (pixels[2, 8] == 255).all() and (pixels[0, 0] == 0).all()
    jpeg = save_image_grid(torch.rand(3, 3, 8, 8), tmp_path / "grid.jpg", nrow=3)
    assert Image.open(jpeg).format == "JPEG"


def test_size_conditioning_gives_original_size_crop_corner_and_target(tmp_path: Path) -> None:
    """SDXL's size conditioning: the file's (H, W), the centre crop's corner at the training resolution (mirrored
    with the flip), the training size; nothing extra without the option."""
    solid(tmp_path / "wide.png", size=(40, 20))  # width 40, height 20: the crop is 20 x 20 at left 10
    wide = PersonalizedBase(tmp_path, size=10, center_crop=True, size_conditioning=True)
    plain = wide.size_conditioning_of(0, flip=False)
    assert plain["original_size_as_tuple"].tolist() == [20, 40] and plain["target_size_as_tuple"].tolist() == [10, 10]
    assert plain["crop_coords_top_left"].tolist() == [0, 5]  # 10 px of 20 scaled to the 10-px training size
    assert wide.size_conditioning_of(0, flip=True)["crop_coords_top_left"].tolist() == [0, 20 - 5 - 10]
    squashed = PersonalizedBase(tmp_path, size=10, size_conditioning=True)
    assert squashed.size_conditioning_of(0, flip=False)["crop_coords_top_left"].tolist() == [0, 0]
    assert set(squashed[0]) == {"caption", "image", "index", "flip", "original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"}
    assert "original_size_as_tuple" not in PersonalizedBase(tmp_path, size=10)[0]


def test_random_crops_are_squares_of_the_resized_picture_with_their_corner_recorded(tmp_path: Path) -> None:
    """random_crop: the short side resized to the training size, a random square of it per item; the corner in the
    size conditioning (mirrored with the flip), the crop in the item (for the latent cache); seeded draws repeat."""
    ramp = np.tile(np.arange(40, dtype=np.uint8)[None, :, None] * 6, (20, 1, 3))  # 40 wide, 20 high: column x is 6x
    Image.fromarray(ramp).save(tmp_path / "wide.png")
    data = PersonalizedBase(tmp_path, size=10, random_crop=True, size_conditioning=True, interpolation="bilinear")
    resized = np.asarray(Image.fromarray(ramp).resize((20, 10), Image.Resampling.BILINEAR))
    torch.manual_seed(0)
    items = [data[0] for _ in range(40)]
    lefts = set()
    for item in items:
        top, left = item["crop"].tolist()
        assert top == 0 and 0 <= left <= 10 and item["image"].shape == (10, 10, 3)
        square = resized[:, left : left + 10]
        expected = square[:, ::-1] if item["flip"] else square
        assert np.array_equal(item["image"], personalized.to_model_range(expected))
        corner = item["crop_coords_top_left"].tolist()
        assert corner == [0, 20 - left - 10 if item["flip"] else left]
        assert item["original_size_as_tuple"].tolist() == [20, 40] and item["target_size_as_tuple"].tolist() == [10, 10]
        lefts.add(left)
    assert len(lefts) > 5  # the 11 positions are all drawn from
    torch.manual_seed(0)
    again = [data[0] for _ in range(40)]
    assert [(i["crop"].tolist(), i["flip"]) for i in items] == [(i["crop"].tolist(), i["flip"]) for i in again]
    assert np.array_equal(data.get_image(0, False), personalized.to_model_range(resized[:, 5:15]))  # the centre
    with pytest.raises(ValueError, match="random_crop needs a size and excludes center_crop"):
        PersonalizedBase(tmp_path, size=10, random_crop=True, center_crop=True)


def test_a_training_image_under_8_pixels_a_side_is_refused(tmp_path: Path) -> None:
    from ldm.data.images import ImageTooSmallError

    solid(tmp_path / "a.png", size=(16, 16))
    solid(tmp_path / "b.png", size=(1, 1))
    with pytest.raises(ImageTooSmallError, match=r"b.png' is 1x1 pixels; training images need at least 8 pixels per side"):
        PersonalizedBase(tmp_path, size=16)
    with pytest.raises(ImageTooSmallError, match="at least 8 pixels"):
        validate_image_folder(tmp_path, 512)
    solid(tmp_path / "b.png", size=(4, 4))
    assert len(PersonalizedBase(tmp_path, size=4)) > 0  # never more than the training size itself
    assert len(validate_image_folder(tmp_path)) == 2  # without a training size (no resizing), no size rule


def test_an_image_enlarged_more_than_8x_is_warned_about_once(tmp_path: Path, caplog) -> None:
    solid(tmp_path / "small.png", size=(12, 12))
    with caplog.at_level(logging.WARNING):
        validate_image_folder(tmp_path, 128)
        PersonalizedBase(tmp_path, size=128)
        PersonalizedBase(tmp_path, size=64)  # 12 * 8 >= 64: no warning
    assert caplog.text.count("small.png' is 12x12 pixels and is enlarged more than 8x to the training size 128") == 1


def test_an_unreadable_file_is_warned_about_once_per_process(tmp_path: Path, caplog) -> None:
    """main.py checks the folder, then the dataset reads it again: one warning, until the file changes."""
    solid(tmp_path / "a.png")
    bad = tmp_path / "z.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with caplog.at_level(logging.WARNING):
        validate_image_folder(tmp_path)
        PersonalizedBase(tmp_path, size=16)
    assert caplog.text.count("skipping cannot read image") == 1
    bad.write_bytes(b"\x89PNG\r\n\x1a\n other garbage")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        validate_image_folder(tmp_path)
    assert caplog.text.count("skipping cannot read image") == 1
