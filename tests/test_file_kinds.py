"""ldm.file_kinds: a wrong file given as weights or an embedding is named by what it is."""
import io
import zipfile

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm.file_kinds import foreign_kind


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    return buffer.getvalue()


def zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", "hello")
    return buffer.getvalue()


def torch_bytes(**kwargs) -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buffer, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"hello world\nsecond line\n", "a text file (first line: 'hello world')"),
        (b"\n\n   \n", "a text file (only blank lines)"),
        ("caf\u00e9 " * 2000, "a text file (first line: 'caf\u00e9 caf\u00e9"),  # a multi-byte character cut at 4 KiB
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 12\n", "a Git LFS pointer"),
        (b"<!DOCTYPE html><html><body>Not found</body></html>", "an HTML page"),
        (b"", "an empty file"),
        (png_bytes(), "a PNG image"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "a JPEG image"),
        (b"\x1f\x8b\x08\x00\x00", "a gzip archive"),
        (zip_bytes(), "a zip archive that is not a PyTorch file"),
        (torch_bytes()[:200], "a truncated PyTorch file"),
        (b"\x01\x02\x03\x00\xfe", "neither a PyTorch nor a safetensors file"),
    ],
)
def test_foreign_files_are_named(tmp_path, content, expected):
    path = tmp_path / "model.ckpt"
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    kind = foreign_kind(path)
    assert kind is not None and kind.startswith(expected), kind
    assert "\n" not in kind


def test_pytorch_and_safetensors_files_pass(tmp_path):
    (tmp_path / "zip.pt").write_bytes(torch_bytes())
    (tmp_path / "legacy.pt").write_bytes(torch_bytes(_use_new_zipfile_serialization=False))
    save_file({"w": torch.zeros(3)}, str(tmp_path / "w.safetensors"))
    for name in ("zip.pt", "legacy.pt", "w.safetensors"):
        assert foreign_kind(tmp_path / name) is None, name
