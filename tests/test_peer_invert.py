"""scripts/peer_invert.py, the peer's whole recipe from diffusers' classes, for two updates on a tiny SD v1 model
exported by ldm/diffusers_export.py; the word it learns there loads into our model and encodes as it does there."""
import json

import pytest
import torch
from safetensors.torch import load_file

from paths import load_script
from tiny_models import TINY_CONFIGS, make_concept_folder, make_tiny_checkpoint

pytest.importorskip("diffusers")

from ldm.checkpoint import load_state_dict  # noqa: E402
from ldm.diffusers_export import diffusers_pipeline, export_pipeline  # noqa: E402
from ldm.inference import load_config, load_model_from_config  # noqa: E402

peer_invert = load_script("peer_invert")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("peer")
    ckpt = make_tiny_checkpoint("sd", root / "sd.ckpt")
    config = load_config(TINY_CONFIGS["sd"])
    folder = export_pipeline(diffusers_pipeline(config, load_state_dict(ckpt)), root / "sd-diffusers")
    return {"root": root, "ckpt": ckpt, "folder": folder, "data": make_concept_folder(root / "cat_toy")}


def peer_args(world, out, *extra):
    return ["--pretrained_model_name_or_path", str(world["folder"]), "--train_data_dir", str(world["data"]), "--placeholder_token",
            "<*>", "--initializer_token", "dog", "--output_dir", str(out), "--max_train_steps", "2", "--gradient_accumulation_steps",
            "2", "--save_steps", "1", "--seed", "0", "--device", "cpu", *extra]


def test_the_peer_templates_are_its_own():
    assert len(peer_invert.PEER_OBJECT_TEMPLATES) == 27 and peer_invert.PEER_OBJECT_TEMPLATES[-1] == "a photo of a small {}"
    assert len(peer_invert.PEER_STYLE_TEMPLATES) == 19


@torch.no_grad()
def test_two_updates_and_the_word_draws_here_as_there(world, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "peer"
    with torch.enable_grad():
        peer_invert.main(peer_args(world, out, "--num_vectors", "2"))
    run = json.loads((out / "peer_run.json").read_text())
    assert run["updates"] == 2 and run["images"] == 4 and run["learning_rate"] == pytest.approx(5e-4 * 2)
    assert {p.name for p in out.glob("learned_embeds*")} == {
        "learned_embeds.safetensors", "learned_embeds-steps-1.safetensors", "learned_embeds-steps-2.safetensors"}
    word = load_file(out / "learned_embeds.safetensors")["<*>"]
    pipe = StableDiffusionPipeline.from_pretrained(world["folder"], local_files_only=True)
    dog = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("dog</w>")]
    assert word.shape == (2, 32) and bool(torch.isfinite(word).all()) and not torch.equal(word[0], dog)
    assert torch.equal(word, load_file(out / "learned_embeds-steps-2.safetensors")["<*>"])

    # learn there, draw here: our loader takes the peer's file once its token is renamed to one of our tokenizer's
    tool = load_script("embedding_tool")
    tool.main(["convert", str(out / "learned_embeds.safetensors"), str(tmp_path / "word.pt"), "--rename", "<*>=*", "--tokenizer", "clip"])
    ours = load_model_from_config(TINY_CONFIGS["sd"], world["ckpt"], "cpu", tmp_path / "word.pt")
    pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"))
    theirs = pipe.encode_prompt(["a photo of <*> on a hill"], "cpu", 1, False)[0]
    mine = ours.get_learned_conditioning(["a photo of * on a hill"])
    assert (theirs - mine).abs().max().item() <= 1e-5 * max(1.0, mine.abs().max().item())


def test_a_known_token_is_one_line(world, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        peer_invert.main(peer_args(world, tmp_path / "x", "--placeholder_token", "*"))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "already a token" in err[0]
