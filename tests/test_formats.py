"""Embedding files: every layout read safely, the writable ones written, round trips bit-identical, the diffusers
client loading our export, malicious pickles refused without running, and the EmbeddingManager's token rules."""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from ldm.modules.embedding_formats import (
    A1111,
    DIFFUSERS,
    KOHYA,
    ORIGINAL,
    LoadedEmbeddings,
    check_width,
    family_for_width,
    read_embeddings,
    save_original,
    write_embeddings,
)
from ldm.modules.embedding_manager import EmbeddingFileError, EmbeddingManager, PlaceholderError
from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.provenance import GenerationRecord, embedding_record, file_sha256, metadata_to_record, read_png_text, record_to_metadata, save_png
from paths import REPO, load_script

TINY_CLIP = REPO / "tests" / "fixtures" / "tiny-clip"
STAR_CLIP = 265  # '*' in the CLIP vocabulary


@pytest.fixture(scope="module")
def embedder():
    torch.manual_seed(0)
    return FrozenCLIPEmbedder(version=str(TINY_CLIP))


@pytest.fixture
def vectors():
    torch.manual_seed(1)
    return torch.randn(2, 32)


class Evil:
    """Unpickling calls ``open(marker, "w")``: the marker file proves the code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_original_round_trip_with_extra_keys(tmp_path, vectors):
    path = save_original(tmp_path / "e.pt", {"*": vectors}, {"*": STAR_CLIP}, {"step": 499, "seed": 23})
    loaded = read_embeddings(path)
    assert loaded.format == ORIGINAL and loaded.token_ids == {"*": STAR_CLIP}
    assert torch.equal(loaded.vectors["*"], vectors) and loaded.metadata == {"step": 499, "seed": 23}
    raw = torch.load(path, weights_only=True)  # a plain safe load works too: no classes needed
    assert set(raw) == {"string_to_token", "string_to_param", "step", "seed"}


@pytest.mark.parametrize("old_torch", [False, True])
def test_parameterdict_pickles_read(tmp_path, vectors, old_torch):
    params = nn.ParameterDict({"*": nn.Parameter(vectors.clone())})
    if old_torch:  # torch 1.x ParameterDicts kept their entries in _parameters only
        params.__dict__.pop("_keys", None)
    torch.save({"string_to_token": {"*": torch.tensor(STAR_CLIP)}, "string_to_param": params}, tmp_path / "p.pt")
    loaded = read_embeddings(tmp_path / "p.pt")
    assert torch.equal(loaded.vectors["*"], vectors) and loaded.token_ids == {"*": STAR_CLIP}


def test_file_saved_on_cuda_reads_on_cpu(tmp_path, vectors):
    src, dst = tmp_path / "cpu.pt", tmp_path / "cuda.pt"
    torch.save({"string_to_token": {"*": torch.tensor(STAR_CLIP)}, "string_to_param": {"*": vectors}}, src)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("data.pkl"):
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
                assert b"cuda:0" in data
            zout.writestr(item, data)
    assert torch.equal(read_embeddings(dst).vectors["*"], vectors)


def test_a1111_file(tmp_path, vectors):
    data = {"string_to_token": {"*": STAR_CLIP}, "string_to_param": {"*": vectors}, "name": "mycat", "step": 1500,
            "sd_checkpoint": "7460a6fa", "sd_checkpoint_name": "sd-v1-4"}
    torch.save(data, tmp_path / "mycat.pt")
    loaded = read_embeddings(tmp_path / "mycat.pt")
    assert loaded.format == A1111 and loaded.token_ids == {"*": STAR_CLIP} and torch.equal(loaded.vectors["*"], vectors)
    assert loaded.metadata == {"name": "mycat", "step": 1500, "sd_checkpoint": "7460a6fa", "sd_checkpoint_name": "sd-v1-4"}


def test_diffusers_files_as_diffusers_writes_them(tmp_path, vectors):
    # examples/textual_inversion: save_file({token: [K, D]}, ..., metadata={"format": "pt"}); .bin = torch.save
    save_file({"<cat-toy>": vectors}, str(tmp_path / "learned_embeds.safetensors"), metadata={"format": "pt"})
    torch.save({"<cat-toy>": vectors[0]}, tmp_path / "learned_embeds.bin")  # legacy 1-D
    new = read_embeddings(tmp_path / "learned_embeds.safetensors")
    legacy = read_embeddings(tmp_path / "learned_embeds.bin")
    assert new.format == legacy.format == DIFFUSERS and not new.token_ids and not new.metadata
    assert torch.equal(new.vectors["<cat-toy>"], vectors) and torch.equal(legacy.vectors["<cat-toy>"], vectors[:1])


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_kohya_emb_params(tmp_path, vectors, suffix):
    half = vectors.half()
    path = tmp_path / f"concept{suffix}"
    save_file({"emb_params": half}, str(path)) if suffix == ".safetensors" else torch.save({"emb_params": half}, path)
    loaded = read_embeddings(path)
    assert loaded.format == KOHYA and loaded.vectors["*"].dtype == torch.float16 and torch.equal(loaded.vectors["*"], half)


def test_flattened_two_key_safetensors(tmp_path, vectors):
    save_file({"string_to_param.*": vectors, "string_to_token.*": torch.tensor(STAR_CLIP)}, str(tmp_path / "o.safetensors"))
    loaded = read_embeddings(tmp_path / "o.safetensors")
    assert loaded.format == ORIGINAL and loaded.token_ids == {"*": STAR_CLIP} and torch.equal(loaded.vectors["*"], vectors)


def test_round_trip_original_a1111_diffusers_original_is_bit_identical(tmp_path, vectors):
    tool = load_script("embedding_tool")
    src = save_original(tmp_path / "embeddings.pt", {"*": vectors}, {"*": STAR_CLIP}, {"step": 6099, "seed": 23})
    tool.main(["convert", str(src), str(tmp_path / "a.pt"), "--to", "a1111", "--name", "mycat"])
    tool.main(["convert", str(tmp_path / "a.pt"), str(tmp_path / "learned_embeds.safetensors")])
    tool.main(["convert", str(tmp_path / "learned_embeds.safetensors"), str(tmp_path / "back.pt")])
    assert read_embeddings(tmp_path / "a.pt").format == A1111
    assert read_embeddings(tmp_path / "learned_embeds.safetensors").format == DIFFUSERS
    first, last = torch.load(src, weights_only=True), torch.load(tmp_path / "back.pt", weights_only=True)
    assert last["string_to_token"] == first["string_to_token"] and last["step"] == 6099 and last["seed"] == 23
    for p, v in first["string_to_param"].items():
        assert last["string_to_param"][p].dtype == v.dtype and torch.equal(last["string_to_param"][p], v)


def test_convert_to_diffusers_names_the_token_after_the_placeholder(tmp_path, vectors, caplog):
    tool = load_script("embedding_tool")
    src = save_original(tmp_path / "embeddings.pt", {"<cat-toy>": vectors}, {"<cat-toy>": STAR_CLIP})
    old_umask = os.umask(0o022)
    try:
        tool.main(["convert", str(src), str(tmp_path / "learned_embeds.safetensors")])
        tool.main(["convert", str(src), str(tmp_path / "named.safetensors"), "--token", "<my-cat>"])
        tool.main(["convert", str(src), str(tmp_path / "a.pt"), "--to", "a1111"])
    finally:
        os.umask(old_umask)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "learned_embeds.safetensors"), "pt") as handle:
        assert list(handle.keys()) == ["<cat-toy>"]  # what its users typed, not "<learned_embeds>"
    with safe_open(str(tmp_path / "named.safetensors"), "pt") as handle:
        assert list(handle.keys()) == ["<my-cat>"]
    modes = {p.name: os.stat(p).st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"embeddings.pt": 0o644, "learned_embeds.safetensors": 0o644, "named.safetensors": 0o644, "a.pt": 0o644}
    star = save_original(tmp_path / "star.pt", {"*": torch.randn(1, 768)}, {"*": STAR_CLIP})
    with caplog.at_level(logging.WARNING):
        tool.main(["convert", str(star), str(tmp_path / "star.safetensors")])
    assert "--token" in caplog.text  # diffusers refuses '*', already a CLIP token: say how to name it


def test_convert_refuses_an_unknown_new_placeholder(tmp_path, capsys):
    tool = load_script("embedding_tool")
    src = save_original(tmp_path / "e.pt", {"*": torch.randn(2, 64)}, {"*": 47})  # width 64: the shapes model's
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["convert", str(src), str(tmp_path / "out.pt"), "--rename", "*=zebra"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "'zebra' is not in the vocabulary" in err and "--rename *=zebra" in err
    assert not (tmp_path / "out.pt").exists()
    tool.main(["convert", str(src), str(tmp_path / "out.pt"), "--rename", "*=@"])
    assert set(read_embeddings(tmp_path / "out.pt").token_ids) == {"@"}
    assert "shapes model" in family_for_width(64)


def test_diffusers_client_loads_our_exports(tmp_path, vectors):
    """diffusers' own load_textual_inversion puts exactly our vectors into a transformers CLIP text encoder."""
    pytest.importorskip("diffusers")
    from diffusers.loaders import TextualInversionLoaderMixin
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ldm.modules.encoders.tokenizers import SHIPPED_CLIP_BPE, converted_clip_vocab

    class Holder(TextualInversionLoaderMixin):
        hf_device_map = None
        components: dict = {}

        def __init__(self):
            self.tokenizer = CLIPTokenizer.from_pretrained(str(converted_clip_vocab(SHIPPED_CLIP_BPE)))
            self.text_encoder = CLIPTextModel(CLIPTextConfig.from_json_file(str(TINY_CLIP / "config.json")))

    loaded = LoadedEmbeddings(tmp_path / "e.pt", ORIGINAL, {"*": vectors}, {"*": STAR_CLIP}, {})
    write_embeddings(loaded, tmp_path / "learned_embeds.safetensors", name="<cat-toy>")
    write_embeddings(loaded, tmp_path / "a1111.pt", A1111, name="<a1111-cat>")
    holder = Holder()
    holder.load_textual_inversion(str(tmp_path / "learned_embeds.safetensors"))
    holder.load_textual_inversion(str(tmp_path / "a1111.pt"))
    table = holder.text_encoder.get_input_embeddings().weight
    for token in ("<cat-toy>", "<a1111-cat>"):
        ids = holder.tokenizer.convert_tokens_to_ids([token, f"{token}_1"])
        assert torch.equal(table[ids].detach(), vectors)


def test_malicious_pickle_is_refused_without_running(tmp_path):
    live, marker = tmp_path / "live-marker", tmp_path / "marker"
    torch.save({"string_to_param": Evil(live)}, tmp_path / "live.pt")
    torch.save({"string_to_param": Evil(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "live.pt", weights_only=False)  # the payload is real: an unsafe load runs it
    assert live.exists()
    with pytest.raises(EmbeddingFileError, match="refused by the safe reader") as err:
        read_embeddings(tmp_path / "evil.pt")
    assert "\n" not in str(err.value) and "evil.pt" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, match",
    [
        ({"foo": "bar"}, "none of the known embedding layouts"),
        ({"state_dict": {"w": torch.zeros(1)}}, "model checkpoint"),
        ({"clip_l": torch.zeros(1, 768)}, "only the clip_l half of an SDXL embedding"),
        (b"not a pickle at all", r"is a text file \(first line: 'not a pickle at all'\), not an embedding file"),
        (b"\x80\x02garbage that is no pickle", "damaged or truncated PyTorch file"),
    ],
)
def test_unknown_files_one_line_error_naming_the_file(tmp_path, content, match):
    path = tmp_path / "bad.pt"
    path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
    with pytest.raises(EmbeddingFileError, match=match) as err:
        read_embeddings(path)
    assert "bad.pt" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(EmbeddingFileError, match="does not exist"):
        read_embeddings(tmp_path / "missing.pt")


def test_width_check_names_both_families(tmp_path):
    loaded = LoadedEmbeddings(tmp_path / "sd.pt", ORIGINAL, {"*": torch.zeros(1, 768)}, {"*": STAR_CLIP})
    with pytest.raises(EmbeddingFileError, match=r"SD v1 .*768.*LDM-1.4B .*1280"):
        check_width(loaded, 1280)
    assert "unknown" in family_for_width(32)


def manager_with(embedder, tmp_path, placeholder, vectors, token_id):
    path = tmp_path / "e.safetensors"
    meta = {"format": "pt"} if token_id is None else {"ti.placeholder": placeholder, "ti.token_id": str(token_id)}
    save_file({"<x>" if token_id is not None else placeholder: vectors}, str(path), metadata=meta)
    manager = EmbeddingManager(embedder, ["*"], ["sculpture"])
    manager.load(path)
    return manager


def test_manager_uses_the_models_token_for_a_single_token_placeholder(embedder, tmp_path, vectors, caplog):
    with caplog.at_level(logging.WARNING):
        manager = manager_with(embedder, tmp_path, "*", vectors, 999)
    assert int(manager.string_to_token_dict["*"]) == STAR_CLIP and "999" in caplog.text


def test_manager_keeps_an_in_vocabulary_file_id_of_a_multi_token_placeholder(embedder, tmp_path, vectors, caplog):
    with caplog.at_level(logging.WARNING):
        manager = manager_with(embedder, tmp_path, "<cat-toy>", vectors, STAR_CLIP)
    assert int(manager.string_to_token_dict["<cat-toy>"]) == STAR_CLIP and "with '*'" in caplog.text
    with pytest.raises(PlaceholderError, match="convert --rename"):
        manager_with(embedder, tmp_path, "<cat-toy>", vectors, None)


def test_manager_wrong_width_and_more_vectors_than_configured(embedder, tmp_path):
    with pytest.raises(EmbeddingFileError, match="width 768.*width 32"):
        manager_with(embedder, tmp_path, "*", torch.zeros(1, 768), STAR_CLIP)
    manager = manager_with(embedder, tmp_path, "*", torch.randn(3, 32), STAR_CLIP)  # config: 1 vector per token
    tokens = embedder.tokenize(["a photo of *"])
    out = embedder(tokens, embedding_manager=manager)
    assert out.shape == (1, 77, 32) and torch.isfinite(out).all()


@pytest.mark.slow
def test_inspect_command_nearest_words(tmp_path):
    from tiny_models import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint("ldm", tmp_path / "ldm.ckpt")
    table = torch.load(ckpt, weights_only=True)["state_dict"]["cond_stage_model.transformer.token_emb.weight"]
    dog = 3899  # 'dog' in bert-base-uncased
    save_original(tmp_path / "e.pt", {"*": table[dog : dog + 1].clone()}, {"*": 1008})
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "embedding_tool.py"), "inspect", str(tmp_path / "e.pt"),
         "--config", str(REPO / "tests" / "configs" / "ldm-tiny-finetune.yaml"), "--ckpt", str(ckpt)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "'*': 1 vector(s) of 32" in result.stdout and "token id 1008 ('*')" in result.stdout
    assert "nearest: dog (1.000)" in result.stdout


def test_embedding_record_travels_in_pt_and_safetensors(tmp_path, vectors):
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  base_learning_rate: 0.005\n", encoding="utf-8")
    base = tmp_path / "model.ckpt"
    base.write_bytes(b"weights")
    images = [tmp_path / "b.png", tmp_path / "a.png"]
    for i, image in enumerate(images):
        image.write_bytes(bytes([i]) * 10)
    record = embedding_record(seed=23, step=499, config=config, base_model=base, data_files=images)
    assert record["seed"] == 23 and record["step"] == 499 and record["config"].startswith("model:")
    assert record["base_model_sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert list(record["data_sha256"]) == ["a.png", "b.png"] and record["data_sha256"]["a.png"] == hashlib.sha256(bytes([1]) * 10).hexdigest()
    pt = save_original(tmp_path / "e.pt", {"*": vectors}, {"*": STAR_CLIP}, record)
    assert read_embeddings(pt).metadata == record  # plain values: the safe reader reads them back
    write_embeddings(read_embeddings(pt), tmp_path / "e.safetensors")
    back = read_embeddings(tmp_path / "e.safetensors").metadata
    assert {k: back[k] for k in record if record[k] is not None} == {k: v for k, v in record.items() if v is not None}
    assert metadata_to_record(record_to_metadata(record)) == {k: v for k, v in record.items() if v is not None}
    from_mapping = embedding_record(seed=None, step=0, config={"model": {"base_learning_rate": 0.005}})
    assert from_mapping["config"] == "model:\n  base_learning_rate: 0.005\n" and from_mapping["base_model_sha256"] is None


def test_file_hash_cache_follows_changes(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"one")
    assert file_sha256(path) == hashlib.sha256(b"one").hexdigest()
    path.write_bytes(b"two!")
    assert file_sha256(path) == hashlib.sha256(b"two!").hexdigest()


def test_generation_record_png_chunks(tmp_path):
    record = GenerationRecord(prompt="a photo of * א", seed=42, sampler="ddim", steps=50, scale=7.5, eta=0.0, width=512, height=512,
                              model="m.ckpt", model_hash="0123456789")
    save_png(Image.new("RGB", (4, 4)), tmp_path / "x.png", record)
    text = read_png_text(tmp_path / "x.png")
    assert text["prompt"] == "a photo of * א" and text["seed"] == "42" and text["size"] == "512x512"
    assert text["parameters"] == "a photo of * א\nSteps: 50, Sampler: ddim, CFG scale: 7.5, Seed: 42, Batch index: 0, Size: 512x512, Eta: 0.0, Model hash: 0123456789, Model: m.ckpt, Precision: full"
    assert "embedding_hash" not in text


@pytest.mark.parametrize("widths,model,needles", [
    ((768,), 1024, ["SD v1 (CLIP ViT-L/14, width 768)", "SD v2 (OpenCLIP ViT-H/14, width 1024)"]),
    ((1024,), 768, ["SD v2 (OpenCLIP ViT-H/14, width 1024)", "SD v1 (CLIP ViT-L/14, width 768)"]),
    ((768, 1280), 768, ["SDXL (clip_l width 768 + clip_g width 1280)", "SD v1 (CLIP ViT-L/14, width 768)"]),
    ((768, 1280), 1024, ["SDXL (clip_l width 768 + clip_g width 1280)", "width 1024"]),
])
def test_an_embedding_of_another_family_names_both_widths(tmp_path, widths, model, needles):
    from ldm.modules.embedding_formats import check_width, save_sdxl

    if len(widths) == 2:
        path = save_sdxl(tmp_path / "e.safetensors", "*", torch.zeros(2, widths[0]), torch.zeros(2, widths[1]))
    else:
        path = save_original(tmp_path / "e.pt", {"*": torch.zeros(2, widths[0])}, {"*": 265})
    with pytest.raises(EmbeddingFileError) as err:
        check_width(read_embeddings(path), model)
    assert all(n in str(err.value) for n in needles) and "\n" not in str(err.value)


@pytest.mark.parametrize("widths,needles", [
    ((1024,), ["SD v2 (OpenCLIP ViT-H/14, width 1024)", "SDXL (clip_l width 768 + clip_g width 1280)", "both halves"]),
    ((768,), ["SD v1 (CLIP ViT-L/14, width 768)", "SDXL (clip_l width 768 + clip_g width 1280)"]),
    ((768, 1024), ["SDXL (clip_l width 768 + clip_g width 1024)", "SDXL (clip_l width 768 + clip_g width 1280)"]),
])
def test_an_sdxl_model_names_both_widths(tmp_path, widths, needles):
    from ldm.modules.embedding_formats import check_sdxl_widths, save_sdxl

    if len(widths) == 2:
        path = save_sdxl(tmp_path / "e.safetensors", "*", torch.zeros(1, widths[0]), torch.zeros(1, widths[1]))
    else:
        path = save_original(tmp_path / "e.pt", {"*": torch.zeros(1, widths[0])}, {"*": 265})
    with pytest.raises(EmbeddingFileError) as err:
        check_sdxl_widths(read_embeddings(path), (768, 1280))
    assert all(n in str(err.value) for n in needles) and "\n" not in str(err.value)


def test_sdxl_layouts_read_alike(tmp_path):
    """The shared safetensors, kohya's .pt, our original-style .pt and diffusers' two files give the same word."""
    from safetensors.torch import save_file

    from ldm.modules.embedding_formats import save_sdxl, save_sdxl_original, write_embeddings

    l, g = torch.randn(2, 768), torch.randn(2, 1280)
    save_file({"clip_l": l, "clip_g": g}, str(tmp_path / "a1111.safetensors"))  # A1111 / ComfyUI / kohya .safetensors
    torch.save({"clip_l": l, "clip_g": g}, tmp_path / "kohya.pt")
    ours = save_sdxl(tmp_path / "ours.safetensors", "<cat>", l, g, token_id=49408 - 1)
    original = save_sdxl_original(tmp_path / "orig.pt", {"clip_l": {"*": l}, "clip_g": {"*": g}}, {"*": 265})
    (tmp_path / "diffusers").mkdir()
    save_file({"<cat>": l}, str(tmp_path / "diffusers" / "learned_embeds.safetensors"))
    save_file({"<cat>": g}, str(tmp_path / "diffusers" / "learned_embeds_2.safetensors"))
    read = {name: read_embeddings(path) for name, path in [
        ("a1111", tmp_path / "a1111.safetensors"), ("kohya", tmp_path / "kohya.pt"), ("ours", ours), ("original", original),
        ("folder", tmp_path / "diffusers"), ("first", tmp_path / "diffusers" / "learned_embeds.safetensors"),
        ("second", tmp_path / "diffusers" / "learned_embeds_2.safetensors")]}
    for name, loaded in read.items():
        assert loaded.is_sdxl and loaded.widths == (768, 1280), name
        (placeholder,) = loaded.vectors
        assert torch.equal(loaded.vectors[placeholder], l) and torch.equal(loaded.clip_g[placeholder], g), name
    assert list(read["ours"].vectors) == ["<cat>"] and read["ours"].token_ids == {"<cat>": 49407}
    assert read["original"].token_ids == {"*": 265} and list(read["a1111"].vectors) == ["*"]
    # convert round trips: original -> shared -> diffusers pair -> original, bit-identical
    shared = write_embeddings(read["original"], tmp_path / "r1.safetensors")
    (tmp_path / "r2").mkdir()
    pair = write_embeddings(read_embeddings(shared), tmp_path / "r2" / "learned_embeds.safetensors", "diffusers")
    assert (tmp_path / "r2" / "learned_embeds_2.safetensors").is_file()
    back = read_embeddings(write_embeddings(read_embeddings(pair), tmp_path / "r3.pt"))
    assert back.is_sdxl and back.token_ids == {"*": 265}
    assert torch.equal(back.vectors["*"], l) and torch.equal(back.clip_g["*"], g)


def test_tool_inspects_and_converts_sdxl_words(tmp_path, capsys):
    from ldm.modules.embedding_formats import save_sdxl_original

    tool = load_script("embedding_tool")
    l, g = torch.randn(2, 768), torch.randn(2, 1280)
    src = save_sdxl_original(tmp_path / "embeddings.pt", {"clip_l": {"*": l}, "clip_g": {"*": g}}, {"*": STAR_CLIP}, {"step": 9})
    tool.main(["inspect", str(src)])
    out = capsys.readouterr().out
    assert "width: 768 + 1280 (SDXL (clip_l width 768 + clip_g width 1280))" in out
    assert "'*' clip_l: 2 vector(s) of 768" in out and "'*' clip_g: 2 vector(s) of 1280" in out and "token id 265 ('*')" in out
    tool.main(["convert", str(src), str(tmp_path / "shared.safetensors")])
    (tmp_path / "d").mkdir()
    tool.main(["convert", str(tmp_path / "shared.safetensors"), str(tmp_path / "d" / "learned_embeds.safetensors"), "--to", "diffusers",
               "--token", "<cat>"])
    tool.main(["convert", str(tmp_path / "d"), str(tmp_path / "kohya.pt"), "--to", "sdxl"])
    tool.main(["convert", str(tmp_path / "kohya.pt"), str(tmp_path / "back.pt"), "--rename", "*=@"])
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "shared.safetensors"))) == {"clip_l", "clip_g"}
    assert set(torch.load(tmp_path / "kohya.pt", weights_only=True)) == {"clip_l", "clip_g"}
    assert set(load_file(str(tmp_path / "d" / "learned_embeds_2.safetensors"))) == {"<cat>"}
    back = read_embeddings(tmp_path / "back.pt")
    assert back.is_sdxl and back.token_ids == {"@": 287}
    assert torch.equal(back.vectors["@"], l) and torch.equal(back.clip_g["@"], g)


@pytest.mark.parametrize("name", ["notes.txt", "notes.pt", "notes.ckpt", "notes.safetensors", "notes.bin"])
def test_a_text_file_is_named_a_text_file_whatever_its_suffix(tmp_path, name):
    """The safe unpickler meets text with ``IndexError: pop from empty list`` (or ``KeyError``): the one reader names
    the file's kind instead, for every command that reads embeddings."""
    path = tmp_path / name
    path.write_text("a photo of a *\non a blue background\n")
    with pytest.raises(EmbeddingFileError) as err:
        read_embeddings(path)
    assert str(err.value) == (f"'{path}' is a text file (first line: 'a photo of a *'), not an embedding file; pass an embedding "
                              "(.pt, .bin or .safetensors)")


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_embedding_tool_names_a_text_file_in_one_line(tmp_path, capsys, command):
    tool = load_script("embedding_tool")
    (tmp_path / "prompt.txt").write_text("a photo of *\n")
    argv = [command, str(tmp_path / "prompt.txt")] + ([str(tmp_path / "out.pt")] if command == "convert" else [])
    with pytest.raises(SystemExit) as exit_info:
        tool.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and "prompt.txt' is a text file" in lines[0], lines
    assert not (tmp_path / "out.pt").exists()


def test_convert_to_diffusers_without_a_suffix_writes_the_diffusers_folder(tmp_path, vectors, capsys):
    from ldm.modules.embedding_formats import save_sdxl_original

    tool = load_script("embedding_tool")
    src = save_original(tmp_path / "embeddings.pt", {"*": vectors}, {"*": STAR_CLIP})
    tool.main(["convert", str(src), str(tmp_path / "mycat"), "--to", "diffusers", "--token", "<cat>"])
    assert sorted(p.name for p in (tmp_path / "mycat").iterdir()) == ["learned_embeds.safetensors"]
    assert torch.equal(read_embeddings(tmp_path / "mycat" / "learned_embeds.safetensors").vectors["*"], vectors)
    assert str(tmp_path / "mycat" / "learned_embeds.safetensors") in capsys.readouterr().out
    xl = save_sdxl_original(tmp_path / "xl.pt", {"clip_l": {"*": torch.randn(1, 768)}, "clip_g": {"*": torch.randn(1, 1280)}}, {"*": STAR_CLIP})
    (tmp_path / "existing").mkdir()
    for target in ("xlcat", "existing"):
        tool.main(["convert", str(xl), str(tmp_path / target), "--to", "diffusers", "--token", "<cat>"])
        assert sorted(p.name for p in (tmp_path / target).iterdir()) == ["learned_embeds.safetensors", "learned_embeds_2.safetensors"]
        assert read_embeddings(tmp_path / target).is_sdxl  # the folder reads back as the SDXL pair
    assert not (tmp_path / "xlcat_2").exists()


def test_the_files_own_config_names_its_family_where_the_width_cannot(tmp_path):
    """Width 64 is every shapes model's: a file whose provenance record holds its training config is named by it;
    a file without one (or with text that is no model config) falls back to the width's guess."""
    from ldm.modules.embedding_formats import config_family

    sd2 = "model:\n  params:\n    cond_stage_config:\n      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder\n"
    path = save_original(tmp_path / "e.pt", {"*": torch.zeros(2, 64)}, {"*": 265}, {"config": sd2, "step": 3})
    assert read_embeddings(path).family == "SD 2.x (width 64)"
    assert config_family("model:\n  params:\n    conditioner_config: {}\n") == "SDXL"
    assert config_family(sd2.replace("FrozenOpenCLIPEmbedder", "FrozenCLIPEmbedder")) == "SD v1"
    assert config_family(sd2.replace("FrozenOpenCLIPEmbedder", "BERTEmbedder")) == "LDM"
    for text in (None, "", "not: [a config", "model: 3", "just text"):
        assert config_family(text) is None
    plain = save_original(tmp_path / "plain.pt", {"*": torch.zeros(2, 64)}, {"*": 265})
    assert read_embeddings(plain).family == family_for_width(64)


def test_inspect_reads_a_shapes_sd_word_with_the_clip_vocabulary(tmp_path, capsys):
    """A width-64 word whose file names an SD family in its config: its token id is a CLIP one, not BERT's."""
    tool = load_script("embedding_tool")
    sd1 = "model:\n  params:\n    cond_stage_config:\n      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder\n"
    path = save_original(tmp_path / "e.pt", {"*": torch.zeros(4, 64)}, {"*": STAR_CLIP}, {"config": sd1})
    tool.main(["inspect", str(path)])
    out = capsys.readouterr().out
    assert "width: 64 (SD v1 (width 64))" in out and f"token id {STAR_CLIP} ('*')" in out
