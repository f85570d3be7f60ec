"""ldm/io.py: every file is written atomically, with one permission rule, and no temporary file is left behind."""
from __future__ import annotations

import os
import stat

import pytest
import torch
from PIL import Image

from ldm.checkpoint import atomic_torch_save
from ldm.data.images import save_image_grid
from ldm.io import atomic_write, atomic_write_text, current_umask, file_mode
from ldm.modules.embedding_formats import save_diffusers, save_original
from ldm.provenance import save_png


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_every_writer_gives_the_same_mode(tmp_path, umask_027):
    assert current_umask() == 0o027 and file_mode() == 0o640
    vectors = {"*": torch.randn(2, 8)}
    written = [
        save_original(tmp_path / "e.pt", vectors, {"*": 265}),
        save_diffusers(tmp_path / "learned_embeds.safetensors", "*", vectors["*"]),
        save_png(Image.new("RGB", (4, 4)), tmp_path / "p.png"),
        save_image_grid(torch.zeros(2, 3, 4, 4), tmp_path / "g.jpg"),
        atomic_write_text(tmp_path / "vocab.json", "{}"),
    ]
    atomic_torch_save({"a": 1}, tmp_path / "c.ckpt")
    written.append(tmp_path / "c.ckpt")
    assert {p.name: mode(p) for p in written} == {p.name: 0o640 for p in written}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)  # no temporary files


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = atomic_write_text(tmp_path / "sub" / "f.txt", "old")
    assert mode(target) == file_mode()

    def half_then_fail(temp):
        temp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old" and os.listdir(target.parent) == ["f.txt"]


def test_the_writer_sees_a_temporary_name_in_the_target_folder(tmp_path):
    seen = []
    atomic_write(tmp_path / "x.bin", lambda temp: seen.append(temp) or temp.write_bytes(b"1"))
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".x.bin.") and seen[0].name.endswith(".tmp")
    assert not seen[0].exists() and (tmp_path / "x.bin").read_bytes() == b"1"
