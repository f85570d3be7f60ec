"""The file a run writes for other tools (ldm/modules/learned_embeds.py): diffusers' own ``load_textual_inversion``
reads a word learned by main.py on tiny SD v1 / SD 2.x models from ``learned_embeds.safetensors``, and on a tiny
SDXL model from ``embeddings.safetensors`` (one call per text encoder), and the prompt's encoding in the diffusers
pipeline is then exactly ours."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tiny_models import TINY_CONFIGS, make_concept_folder, make_tiny_checkpoint

from ldm.modules.embedding_formats import DIFFUSERS, read_embeddings
from ldm.modules.learned_embeds import diffusers_token, learned_embeds_names, save_learned_embeds


def test_the_token_is_new_to_the_tokenizer():
    assert diffusers_token("*") == "<*>" and diffusers_token("@") == "<@>" and diffusers_token("sks") == "<sks>"
    assert diffusers_token("<cat-toy>") == "<cat-toy>"
    assert learned_embeds_names(["*"]) == {"*": "learned_embeds.safetensors"}
    assert learned_embeds_names(["*", "@"]) == {"*": "learned_embeds-0.safetensors", "@": "learned_embeds-1.safetensors"}


def test_the_file_is_diffusers_layout_and_reads_back_as_our_word(tmp_path):
    vectors = {"*": torch.randn(2, 32), "@": torch.randn(1, 32)}
    written = save_learned_embeds(tmp_path, vectors, {"*": torch.tensor(265), "@": torch.tensor(287)}, {"step": 5, "seed": 23})
    assert [p.name for p in written] == ["learned_embeds-0.safetensors", "learned_embeds-1.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    raw = load_file(written[0])
    assert list(raw) == ["<*>"] and torch.equal(raw["<*>"], vectors["*"])
    with safe_open(str(written[0]), "pt") as handle:
        assert handle.metadata()["format"] == "pt"  # what diffusers itself writes
    back = read_embeddings(written[1])
    assert back.format == DIFFUSERS and back.token_ids == {"@": 287} and torch.equal(back.vectors["@"], vectors["@"])
    assert back.metadata["step"] == 5 and back.metadata["name"] == "<@>"


# ------------------------------------------------------------------------------ a word learned by main.py, in diffusers
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Where main.py ran 2 steps per family: ``{family: (checkpoint, run's checkpoints folder)}`` (filled lazily)."""
    root = tmp_path_factory.mktemp("learned")
    return {"root": root, "data": make_concept_folder(root / "cat_toy")}


def learn(runs, family, main_in_process, *overrides):
    root = runs["root"]
    ckpt = make_tiny_checkpoint(family, root / f"{family}.ckpt")
    logs = root / f"logs_{family}"
    argv = ["--base", str(TINY_CONFIGS[family]), "-t", "--actual_resume", str(ckpt), "-n", "w", "--data_root", str(runs["data"]),
            "-l", str(logs), "--max_steps", "2", "--init_word", "dog", *overrides]
    proc = main_in_process(argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = list(logs.iterdir())
    return ckpt, run / "checkpoints"


def both_stacks(family, ckpt, embedding):
    """Our model with the learned word, and the diffusers pipeline of the same checkpoint (without it)."""
    from ldm.checkpoint import load_state_dict
    from ldm.diffusers_export import diffusers_pipeline
    from ldm.inference import load_config, load_model_from_config

    config = load_config(TINY_CONFIGS[family])
    return load_model_from_config(config, ckpt, "cpu", embedding), diffusers_pipeline(config, load_state_dict(ckpt))


@pytest.mark.parametrize("family,vectors", [("sd", 2), ("sd2", 1)])
@torch.no_grad()
def test_diffusers_loads_the_word_main_py_learned(runs, main_in_process, family, vectors):
    pytest.importorskip("diffusers")
    ckpt, folder = learn(runs, family, main_in_process, f"model.params.personalization_config.params.num_vectors_per_token={vectors}")
    learned = read_embeddings(folder / "embeddings.pt").vectors["*"]
    assert learned.shape[0] == vectors and (folder / "learned_embeds.safetensors").is_file()
    ours, pipe = both_stacks(family, ckpt, folder / "embeddings.pt")
    with pytest.raises(KeyError, match="name"):  # what diffusers makes of embeddings.pt: why the second file exists
        pipe.load_textual_inversion(str(folder / "embeddings.pt"))
    pipe.load_textual_inversion(str(folder / "learned_embeds.safetensors"))
    tokens = ["<*>"] + [f"<*>_{i}" for i in range(1, vectors)]
    table = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[pipe.tokenizer.convert_tokens_to_ids(tokens)], learned)
    theirs = pipe.encode_prompt(["a photo of <*> on a hill", "a <*>"], "cpu", 1, False)[0]
    mine = ours.get_learned_conditioning(["a photo of * on a hill", "a *"])
    assert (theirs - mine).abs().max().item() <= 1e-5 * max(1.0, mine.abs().max().item())


@torch.no_grad()
def test_diffusers_sdxl_reads_the_shared_file_with_one_call_per_encoder(runs, main_in_process):
    pytest.importorskip("diffusers")
    ckpt, folder = learn(runs, "sdxl", main_in_process)
    assert not (folder / "learned_embeds.safetensors").exists()  # SDXL's shared file is embeddings.safetensors
    ours, pipe = both_stacks("sdxl", ckpt, folder / "embeddings.pt")
    state = load_file(folder / "embeddings.safetensors")
    pipe.load_textual_inversion(state["clip_l"], token="<*>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="<*>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    context, _, pooled, _ = pipe.encode_prompt(["a photo of <*> on a hill"], device="cpu", num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
    mine = ours.get_learned_conditioning(ours.size_batch(["a photo of * on a hill"], 16, 16))
    assert (context - mine["crossattn"]).abs().max().item() <= 1e-5 * max(1.0, mine["crossattn"].abs().max().item())
    assert (pooled - mine["vector"][:, : pooled.shape[1]]).abs().max().item() <= 1e-5


def test_bert_models_get_no_diffusers_file(runs, main_in_process):
    """The LDM / shapes models' BERT-style words have no reader in diffusers, A1111 or ComfyUI: nothing is written."""
    _, folder = learn(runs, "ldm", main_in_process)
    assert (folder / "embeddings.pt").is_file() and not list(folder.glob("learned_embeds*"))
