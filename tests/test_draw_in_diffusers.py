"""scripts/draw_in_diffusers.py: a word main.py learned on a tiny SD v1 model enters diffusers' pipeline through
load_textual_inversion with exactly our vectors, and both stacks draw the judge's prompts from the same noise."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from paths import load_script
from tiny_models import TINY_CONFIGS, make_concept_folder, make_tiny_checkpoint

pytest.importorskip("diffusers")

from ldm.inference import load_config, load_model_from_config  # noqa: E402
from ldm.modules.embedding_formats import read_embeddings  # noqa: E402

draw = load_script("draw_in_diffusers")


@pytest.fixture
def learned(tmp_path, main_in_process):
    """A tiny SD v1 checkpoint and the learned_embeds.safetensors of a 2-step, 2-vector main.py run on it."""
    ckpt = make_tiny_checkpoint("sd", tmp_path / "sd.ckpt")
    logs = tmp_path / "logs"
    proc = main_in_process(["--base", str(TINY_CONFIGS["sd"]), "-t", "--actual_resume", str(ckpt), "-n", "w", "--data_root",
                            str(make_concept_folder(tmp_path / "data")), "-l", str(logs), "--max_steps", "2", "--init_word",
                            "dog", "model.params.personalization_config.params.num_vectors_per_token=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = list(logs.iterdir())
    return ckpt, run / "checkpoints" / "learned_embeds.safetensors"


def args(ckpt, embedding, outdir, *extra):
    return ["--config", str(TINY_CONFIGS["sd"]), "--ckpt", str(ckpt), "--embedding", str(embedding), "--outdir", str(outdir),
            "--samples", "3", "--grid", "2", *extra]


@torch.no_grad()
def test_the_pipeline_encodes_prompts_with_exactly_our_vectors(learned, tmp_path):
    ckpt, embedding = learned
    opt = draw.parse_args(args(ckpt, embedding, tmp_path / "out"))
    pipe = draw.open_pipeline(opt, load_config(TINY_CONFIGS["sd"]))
    assert (tmp_path / "out" / "diffusers" / "model_index.json").is_file()  # exported there, then opened from the folder
    vectors = read_embeddings(embedding).vectors["*"]
    assert vectors.shape[0] == 2 and draw.file_token(str(embedding)) == "<*>"
    table = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[pipe.tokenizer.convert_tokens_to_ids(["<*>", "<*>_1"])], vectors)
    ours = load_model_from_config(TINY_CONFIGS["sd"], ckpt, "cpu", embedding)
    mine = ours.get_learned_conditioning(list(draw.prompts("*").values()))
    theirs = pipe.encode_prompt(list(draw.prompts("<*>").values()), "cpu", 1, False)[0]
    assert (theirs - mine).abs().max().item() <= 1e-5 * max(1.0, mine.abs().max().item())


def test_both_stacks_draw_and_are_judged_and_the_files_are_written(learned, tmp_path):
    ckpt, embedding = learned
    out = tmp_path / "out"
    draw.main(args(ckpt, embedding, out, "--seed", "3"))
    got = json.loads((out / "draw.json").read_text())
    assert set(got["prompts"]) == {"reconstruction", "blue", "green"} and got["diffusers_token"] == "<*>"
    assert got["prompts"]["blue"]["diffusers"]["prompt"] == "a photo of a <*> on a blue background"
    assert got["prompts"]["blue"]["ours"]["prompt"] == "a photo of a * on a blue background"
    for stack in ("ours", "diffusers"):
        assert 0.0 <= got[stack]["reconstruction"] <= 1.0 and 0.0 <= got[stack]["editability"] <= 1.0
    assert got["encoding_max_abs_diff"] <= 1e-5
    # the same noise into the same weights: the two stacks draw the same pictures (0 of 255 apart here; round-off allowed)
    assert max(p["pixels_max_abs_diff"] for p in got["prompts"].values()) <= 2
    grid = np.asarray(Image.open(out / "grid.png"))
    side = 16 * 3  # the tiny model's 16-pixel pictures, zoomed 3x
    assert grid.shape[0] == 3 * side and grid.shape[1] == 4 * side + 3 * 4  # 2 + 2 samples and the gap, per row


def test_a_missing_embedding_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        draw.main(["--config", str(TINY_CONFIGS["sd"]), "--ckpt", "x.ckpt", "--embedding", str(tmp_path / "no.safetensors"),
                   "--outdir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "--embedding" in err[0]
