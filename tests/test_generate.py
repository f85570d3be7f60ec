"""scripts/txt2img.py and scripts/stable_txt2img.py on tiny random models: files, names, metadata, embeddings at
work, warnings, and bad input ending with one line and exit status 2."""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.generate import LDM_DEFAULTS, SD_DEFAULTS, build_parser, generate, main
from ldm.inference import load_model_from_config, prompt_warnings, sample_images
from ldm.modules.embedding_formats import save_original
from ldm.provenance import read_png_text

from paths import REPO
from tiny_models import TINY_CONFIGS, make_tiny_checkpoint

TINY = ["--H", "16", "--W", "16", "--ddim_steps", "2", "--precision", "full", "--device", "cpu"]
TABLE_KEY = {"sd": "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", "ldm": "cond_stage_model.transformer.token_emb.weight"}
SCULPTURE = {"sd": 8757, "ldm": 6743}  # the init word's token in the CLIP / BERT vocabularies
STAR = {"sd": 265, "ldm": 1008}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {family: make_tiny_checkpoint(family, root / f"{family}.ckpt") for family in ("sd", "ldm")}


def token_row(ckpt: Path, family: str, token: int) -> torch.Tensor:
    return torch.load(ckpt, weights_only=True)["state_dict"][TABLE_KEY[family]][token : token + 1].clone()


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], capture_output=True, text=True, timeout=600, cwd=REPO, env=env)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.slow
def test_sd_script_files_names_metadata_and_counters(ckpts, tmp_path):
    emb = save_original(tmp_path / "embeddings.pt", {"*": token_row(ckpts["sd"], "sd", SCULPTURE["sd"])}, {"*": STAR["sd"]})
    out = tmp_path / "out"
    common = ["--config", str(TINY_CONFIGS["sd"]), "--ckpt_path", str(ckpts["sd"]), "--outdir", str(out), *TINY]
    first = run("stable_txt2img.py", *common, "--embedding_path", str(emb), "--prompt", "a photo of *", "--n_samples", "2", "--n_iter", "2", "--seed", "7")
    assert first.returncode == 0, first.stderr
    # stderr is no terminal: a line per round, no progress bars redrawn at every step
    assert "INFO: prompt 1/1, round 2/2: 2 images in" in first.stderr and "Sampling" not in first.stderr
    assert "DDIM Sampler" not in first.stderr and "\r" not in first.stderr
    assert sorted(p.name for p in (out / "samples").iterdir()) == [f"{i:05}.png" for i in range(4)]
    assert sorted(p.name for p in out.glob("*.png")) == ["a-photo-of-_-0000.png"]  # no '*' to quote in a shell
    grid = Image.open(out / "a-photo-of-_-0000.png")
    assert grid.size == (2 * 18 + 2, 2 * 18 + 2)  # 2 rounds x 2 samples, 2 px padding
    meta = read_png_text(out / "samples" / "00003.png")
    assert meta["prompt"] == "a photo of *" and meta["seed"] == "8" and meta["batch_index"] == "1"
    assert meta["sampler"] == "ddim" and meta["steps"] == "2" and meta["scale"] == "7.5" and meta["size"] == "16x16"
    assert meta["model_hash"] == hashlib.sha256(ckpts["sd"].read_bytes()).hexdigest()[:10]
    assert meta["embedding_hash"] == hashlib.sha256(emb.read_bytes()).hexdigest()[:10]
    assert meta["parameters"].startswith("a photo of *\nSteps: 2, Sampler: ddim, CFG scale: 7.5, Seed: 8")
    assert "Model hash" in read_png_text(out / "a-photo-of-_-0000.png")["parameters"]

    # --from-file (crashed in the original): a grid per prompt, counters continue; the embedding reproduces its init word
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sculpture\n\na photo of *\n", encoding="utf-8")
    generate(build_parser(SD_DEFAULTS, "").parse_args([*common, "--from-file", str(prompts), "--n_samples", "1", "--n_iter", "1", "--seed", "7", "--embedding_path", str(emb)]))
    assert len(list((out / "samples").iterdir())) == 6
    assert {p.name for p in out.glob("*.png")} == {"a-photo-of-_-0000.png", "a-photo-of-sculpture-0001.png", "a-photo-of-_-0002.png"}
    assert np.array_equal(pixels(out / "samples" / "00004.png"), pixels(out / "samples" / "00005.png"))
    assert np.array_equal(pixels(out / "samples" / "00004.png"), pixels(out / "samples" / "00000.png"))


@pytest.mark.slow
def test_ldm_learned_embedding_changes_the_output(ckpts, tmp_path):
    """One run, three prompts: '*' holds the init word's vector, '@' a learned (moved) one, then the init word itself."""
    init = token_row(ckpts["ldm"], "ldm", SCULPTURE["ldm"])
    torch.manual_seed(0)
    emb = save_original(tmp_path / "e.pt", {"*": init, "@": init + 0.5 * torch.randn_like(init)}, {"*": STAR["ldm"], "@": 1030})
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of *\na photo of @\na photo of sculpture\n", encoding="utf-8")
    out = tmp_path / "out"
    result = run("txt2img.py", "--config", str(TINY_CONFIGS["ldm"]), "--ckpt_path", str(ckpts["ldm"]), *TINY, "--n_samples", "1",
                 "--n_iter", "1", "--outdir", str(out), "--embedding_path", str(emb), "--from-file", str(prompts), "--skip_grid")
    assert result.returncode == 0, result.stderr
    assert not list(out.glob("*.png"))  # --skip_grid
    star, learned, word = (pixels(out / "samples" / f"{i:05}.png") for i in range(3))
    assert np.array_equal(star, word)
    assert not np.array_equal(learned, star)


def test_multi_vector_embedding_just_works_and_prompt_warnings(ckpts, tmp_path, caplog):
    emb = save_original(tmp_path / "e.pt", {"*": torch.randn(40, 32)}, {"*": STAR["sd"]})  # config: 1 vector per token
    model = load_model_from_config(TINY_CONFIGS["sd"], ckpts["sd"], "cpu", emb)
    images = sample_images(model, ["a photo of * and *", "@"], steps=2, scale=3.0, H=16, W=16, verbose=False)
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    assert prompt_warnings(model, "a photo of *") == []
    undefined = prompt_warnings(model, "a photo of * next to @")
    assert len(undefined) == 1 and "'@'" in undefined[0] and "defines '*'" in undefined[0]
    long = prompt_warnings(model, "a photo of * and *")
    assert len(long) == 1 and "86 tokens long" in long[0] and "reads 77" in long[0]


@pytest.mark.parametrize("precision, plms", [("autocast", False), ("full", True)])
def test_autocast_on_cpu_and_plms(ckpts, tmp_path, precision, plms):
    args = ["--config", str(TINY_CONFIGS["sd"]), "--ckpt", str(ckpts["sd"]), "--outdir", str(tmp_path), *TINY, "--precision", precision,
            "--n_samples", "1", "--n_iter", "1", "--n_rows", "1", "--fixed_code", "--skip_save"] + (["--plms"] if plms else [])
    generate(build_parser(SD_DEFAULTS, "").parse_args(args))
    grids = list(tmp_path.glob("*.png"))
    assert len(grids) == 1 and not list((tmp_path / "samples").iterdir())
    assert read_png_text(grids[0])["sampler"] == ("plms" if plms else "ddim")


def test_defaults_follow_the_original_scripts():
    sd = build_parser(SD_DEFAULTS, "").parse_args([])
    ldm = build_parser(LDM_DEFAULTS, "").parse_args(["--ckpt", "x.ckpt"])
    assert (sd.ddim_steps, sd.n_iter, sd.H, sd.n_samples, sd.scale, sd.precision) == (50, 2, None, 3, 7.5, None)
    assert sd.config == "configs/stable-diffusion/v1-inference.yaml" and sd.outdir == "outputs/txt2img-samples"
    assert (ldm.ddim_steps, ldm.n_iter, ldm.H, ldm.n_samples, ldm.scale, ldm.ckpt) == (200, 1, None, 4, 5.0, "x.ckpt")
    assert ldm.config == "configs/latent-diffusion/txt2img-1p4B-eval_with_tokens.yaml"


class EvilPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.slow
def test_bad_input_in_the_real_scripts_one_line_exit_2(ckpts, tmp_path):
    torch.save({"string_to_param": EvilPayload(tmp_path / "marker")}, tmp_path / "evil.pt")
    cases = [
        ("stable_txt2img.py", ["--config", str(TINY_CONFIGS["sd"]), "--ckpt", str(ckpts["sd"]), "--embedding_path", str(tmp_path / "evil.pt")], "refused by the safe reader"),
        ("txt2img.py", ["--config", str(TINY_CONFIGS["ldm"]), "--ckpt_path", str(ckpts["sd"])], "does not fit the config"),
    ]
    for script, args, expected in cases:
        result = run(script, *args, "--outdir", str(tmp_path / "o"), *TINY)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert expected in lines[0], lines[0]
    assert not (tmp_path / "marker").exists()


def test_precision_default_is_autocast_only_on_cuda():
    """bf16 autocast on the CPU made SDXL generation several times slower (issue 20); fp16 autocast pays on CUDA."""
    from ldm.generate import resolve_precision

    assert resolve_precision(None, "cpu") == "full" and resolve_precision(None, "cuda:1") == "autocast"
    assert resolve_precision("autocast", "cpu") == "autocast" and resolve_precision("full", "cuda") == "full"
    assert "autocast on CUDA, full on the CPU" in build_parser(SD_DEFAULTS, "").format_help().replace("\n", " ").replace("  ", " ")


def test_cpu_run_records_full_precision_and_slugs_need_no_quoting(ckpts, tmp_path):
    from ldm.generate import prompt_slug

    args = ["--config", str(TINY_CONFIGS["sd"]), "--ckpt", str(ckpts["sd"]), "--outdir", str(tmp_path), "--H", "16", "--W", "16",
            "--ddim_steps", "1", "--device", "cpu", "--n_samples", "1", "--n_iter", "1", "--skip_save", "--prompt", "a * on a & background"]
    (grid,) = generate(build_parser(SD_DEFAULTS, "").parse_args(args))
    assert grid.name == "a-_-on-a-_-background-0000.png" and read_png_text(grid)["precision"] == "full"
    assert prompt_slug("a photo of @ 'in' \"x\" $HOME/`y`;z") == "a-photo-of-_-_in_-_x_-_HOME__y__z"
    assert prompt_slug(" -rf *") == "rf-_" and prompt_slug("caf\u00e9, 2+2.") == "caf\u00e9,-2+2."


def test_more_bad_input_one_line_exit_2(ckpts, tmp_path, capsys):
    save_original(tmp_path / "wide.pt", {"*": torch.zeros(1, 768)}, {"*": STAR["sd"]})
    (tmp_path / "file").write_text("x")
    (tmp_path / "prompt.txt").write_text("a photo of *\n")
    sd = ["--config", str(TINY_CONFIGS["sd"]), "--ckpt", str(ckpts["sd"]), *TINY]
    cases = [
        (["--config", str(TINY_CONFIGS["sd"]), "--ckpt", str(tmp_path / "missing.ckpt")], "--ckpt: file"),
        ([*sd, "--embedding_path", str(tmp_path / "wide.pt")], "SD v1 (CLIP ViT-L/14, width 768) vectors, but this model's"),
        ([*sd, "--embedding_path", str(tmp_path / "missing.pt")], "does not exist"),
        ([*sd, "--embedding_path", str(tmp_path / "prompt.txt")], "prompt.txt' is a text file (first line: 'a photo of *'), not an embedding"),
        (["--config", str(TINY_CONFIGS["sd"]), "--ckpt", str(tmp_path / "prompt.txt"), *TINY], "prompt.txt' is a text file"),
        ([*sd, "--outdir", str(tmp_path / "file" / "out")], "--outdir: cannot write"),
        ([*sd, "--from-file", str(tmp_path / "nothing.txt")], "--from-file: cannot read"),
        ([*sd, "--plms", "--ddim_eta", "0.5"], "--ddim_eta must be 0"),
        ([*sd, "--H", "15"], "multiples of the downsampling factor 2"),
    ]
    for args, expected in cases:
        argv = args if "--outdir" in args else [*args, "--outdir", str(tmp_path / "o")]
        with pytest.raises(SystemExit) as exit_info:
            main(SD_DEFAULTS, "", argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(lines) == 1 and expected in lines[0], (argv, lines)
        assert not (tmp_path / "o").exists(), argv  # a failed run leaves no empty output folders behind
    (tmp_path / "kept" / "samples").mkdir(parents=True)
    with pytest.raises(SystemExit):
        main(SD_DEFAULTS, "", [*sd, "--embedding_path", str(tmp_path / "missing.pt"), "--outdir", str(tmp_path / "kept")])
    assert (tmp_path / "kept" / "samples").is_dir()  # folders that were there before stay


def test_wrong_family_message_names_both(ckpts, caplog):
    from ldm.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"it is an SD v1 .* checkpoint but the config builds an LDM .* model"):
        load_model_from_config(TINY_CONFIGS["ldm"], ckpts["sd"], "cpu")
    with caplog.at_level(logging.WARNING):
        model = load_model_from_config(TINY_CONFIGS["ldm"], ckpts["ldm"], "cpu")
    assert model.embedding_manager is None and not caplog.records  # no embedding: '*' is an ordinary word


def test_a_checkpoint_of_another_architecture_names_the_config_and_suggests_config():
    from ldm.checkpoint import CheckpointError

    shapes = Path(__file__).resolve().parents[1] / "models" / "shapes" / "model.ckpt"
    with pytest.raises(CheckpointError) as err:
        load_model_from_config(TINY_CONFIGS["ldm"], shapes, "cpu")
    message = str(err.value)
    assert "have the wrong shape" in message and f"'{TINY_CONFIGS['ldm']}'" in message and "--config" in message
    assert "configs/shapes/shapes-ldm-inference.yaml" in message and "\n" not in message
