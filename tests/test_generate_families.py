"""scripts/stable_txt2img.py's command on tiny random SD 2.x and SDXL models (their inference configs, no
personalization_config): learned words at work, SDXL's files of every layout, wrong-family embeddings as one line."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm.generate import SD_DEFAULTS, build_parser, generate
from ldm.modules.embedding_formats import EmbeddingFileError, save_diffusers, save_original, save_sdxl, save_sdxl_original

from paths import REPO
from tiny_models import make_tiny_checkpoint

CONFIGS = {"sd2": REPO / "tests" / "configs" / "sd2-tiny.yaml", "sdxl": REPO / "tests" / "configs" / "sdxl-tiny.yaml",
           "sd": REPO / "tests" / "configs" / "sd-tiny-finetune.yaml"}
TABLES = {
    "sd2": ["cond_stage_model.model.token_embedding.weight"],
    "sdxl": ["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
             "conditioner.embedders.1.model.token_embedding.weight"],
}
SCULPTURE, STAR, AT = 8757, 265, 287  # CLIP BPE ids: "sculpture", "*", "@"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("family_ckpts")
    return {family: make_tiny_checkpoint(family, root / f"{family}.ckpt") for family in ("sd", "sd2", "sdxl")}


def rows(ckpt: Path, family: str, token: int) -> list[torch.Tensor]:
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    return [state[key][token : token + 1].clone() for key in TABLES[family]]


def run(family: str, ckpt: Path, out: Path, *args: str) -> list[Path]:
    opt = build_parser(SD_DEFAULTS, "").parse_args([
        "--config", str(CONFIGS[family]), "--ckpt", str(ckpt), "--outdir", str(out), "--ddim_steps", "2", "--precision", "full",
        "--device", "cpu", "--n_samples", "1", "--n_iter", "1", "--skip_grid", *args])
    return generate(opt)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def three_pictures(family, ckpt, emb, tmp_path, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of *\na photo of @\na photo of sculpture\n", encoding="utf-8")
    written = run(family, ckpt, tmp_path / "out", "--embedding_path", str(emb), "--from-file", str(prompts), *extra)
    return [pixels(p) for p in written]


@pytest.mark.parametrize("sampler", [[], ["--plms"]])
def test_sd2_learned_word_changes_the_picture_and_init_vector_does_not(ckpts, tmp_path, sampler):
    (init,) = rows(ckpts["sd2"], "sd2", SCULPTURE)
    torch.manual_seed(0)
    emb = save_original(tmp_path / "e.pt", {"*": init, "@": init + 0.5 * torch.randn_like(init)}, {"*": STAR, "@": AT})
    star, learned, word = three_pictures("sd2", ckpts["sd2"], emb, tmp_path, "--H", "16", "--W", "16", *sampler)
    assert star.shape == (16, 16, 3)
    assert np.array_equal(star, word) and not np.array_equal(learned, star)


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_sdxl_learned_word_changes_the_picture_and_init_vectors_do_not(ckpts, tmp_path, layout):
    init_l, init_g = rows(ckpts["sdxl"], "sdxl", SCULPTURE)
    torch.manual_seed(0)
    moved_l, moved_g = init_l + 0.5 * torch.randn_like(init_l), init_g + 0.5 * torch.randn_like(init_g)
    if layout == "original":  # this project's .pt, both halves keyed; a one-encoder file is refused
        emb = save_original(tmp_path / "both.pt", {"*": init_l, "@": moved_l}, {"*": STAR, "@": AT})
        with pytest.raises(EmbeddingFileError, match=r"needs both halves \(clip_l and clip_g\)"):
            run("sdxl", ckpts["sdxl"], tmp_path / "refused", "--embedding_path", str(emb))
        emb = save_sdxl_original(tmp_path / "e.pt", {"clip_l": {"*": init_l, "@": moved_l}, "clip_g": {"*": init_g, "@": moved_g}},
                                 {"*": STAR, "@": AT})
    else:
        folder = tmp_path / "diffusers"
        folder.mkdir()
        for name, (a, b) in (("learned_embeds.safetensors", (init_l, moved_l)), ("learned_embeds_2.safetensors", (init_g, moved_g))):
            save_file({"*": a.contiguous(), "@": b.contiguous()}, str(folder / name))
        emb = folder / "learned_embeds.safetensors"
    star, learned, word = three_pictures("sdxl", ckpts["sdxl"], emb, tmp_path)  # default size: the model's (16 here)
    assert star.shape == (16, 16, 3)
    assert np.array_equal(star, word) and not np.array_equal(learned, star)


def test_sdxl_shared_file_round_trips_into_the_model(ckpts, tmp_path):
    from ldm.inference import load_model_from_config

    init_l, init_g = rows(ckpts["sdxl"], "sdxl", SCULPTURE)
    path = save_sdxl(tmp_path / "w.safetensors", "*", init_l * 2, init_g * 3, token_id=STAR)
    model = load_model_from_config(CONFIGS["sdxl"], ckpts["sdxl"], "cpu", path)
    halves = model.embedding_manager.vectors()
    assert torch.equal(halves["clip_l"]["*"], init_l * 2) and torch.equal(halves["clip_g"]["*"], init_g * 3)


@pytest.mark.parametrize("family,make,needle", [
    ("sd2", lambda p: save_sdxl(p / "x.safetensors", "*", torch.zeros(1, 32), torch.zeros(1, 32)), "holds SDXL"),
    ("sd", lambda p: save_sdxl(p / "x.safetensors", "*", torch.zeros(1, 32), torch.zeros(1, 32)), "holds SDXL"),
    ("sdxl", lambda p: save_original(p / "x.pt", {"*": torch.zeros(1, 32)}, {"*": STAR}), "needs both halves"),
    ("sdxl", lambda p: save_diffusers(p / "learned_embeds.safetensors", "<w>", torch.zeros(1, 32)), "needs both halves"),
    ("sdxl", lambda p: save_sdxl(p / "x.safetensors", "*", torch.zeros(1, 32), torch.zeros(1, 16)), "clip_g width 16"),
])
def test_embedding_of_another_family_is_one_line(ckpts, tmp_path, family, make, needle):
    from ldm.inference import load_model_from_config

    emb = make(tmp_path)
    with pytest.raises(EmbeddingFileError, match=needle) as err:
        load_model_from_config(CONFIGS[family], ckpts[family], "cpu", emb)
    assert "\n" not in str(err.value) and str(emb) in str(err.value)


def test_sdxl_prompt_warnings_read_the_clip_l_tokenizer(ckpts, tmp_path):
    from ldm.inference import load_model_from_config, prompt_warnings

    path = save_sdxl(tmp_path / "w.safetensors", "*", torch.zeros(3, 32), torch.zeros(3, 32), token_id=STAR)
    model = load_model_from_config(CONFIGS["sdxl"], ckpts["sdxl"], "cpu", path)
    (undefined,) = prompt_warnings(model, "a photo of * and @")
    assert "uses '@', which the embedding does not define (it defines '*')" in undefined
    (too_long,) = prompt_warnings(model, "a photo of " + "* " * 30)
    assert "after expanding multi-vector placeholders" in too_long and "reads 77" in too_long


def test_tool_shows_nearest_words_in_each_sdxl_encoder(ckpts, tmp_path, capsys):
    """``inspect --config --ckpt`` on SDXL: each half against its own encoder's table (the init rows are nearest to
    'sculpture' in both); a one-encoder file is one line naming both families."""
    from test_formats import load_script

    tool = load_script("embedding_tool")
    init_l, init_g = rows(ckpts["sdxl"], "sdxl", SCULPTURE)
    path = save_sdxl(tmp_path / "w.safetensors", "*", init_l, init_g, token_id=STAR)
    tool.main(["inspect", str(path), "--config", str(CONFIGS["sdxl"]), "--ckpt", str(ckpts["sdxl"]), "--top", "1"])
    lines = capsys.readouterr().out.splitlines()
    nearest = [line for line in lines if "nearest:" in line]
    assert len(nearest) == 2 and all("nearest: sculpture (1.000)" in line for line in nearest)
    other = save_original(tmp_path / "sd.pt", {"*": init_l}, {"*": STAR})
    with pytest.raises(SystemExit):
        tool.main(["inspect", str(other), "--config", str(CONFIGS["sdxl"]), "--ckpt", str(ckpts["sdxl"])])
    err = capsys.readouterr().err
    assert "needs both halves" in err and len(err.strip().splitlines()) == 1
