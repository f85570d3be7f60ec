"""SDXL's conditioner and model wrapper: size embeddings, output assembly, dropout, zeroing, errors, wrong files.

Equality with the original code's outputs is in test_equivalence_sdxl.py.
"""
import math

import pytest
import torch
from omegaconf import OmegaConf

from paths import REPO
from ldm.checkpoint import CheckpointError
from ldm.errors import ConfigError
from ldm.modules.encoders.sdxl import ConcatTimestepEmbedderND, GeneralConditioner
from ldm.util import instantiate_from_config

TINY_SDXL = REPO / "tests" / "configs" / "sdxl-tiny.yaml"
TINY_SD2 = REPO / "tests" / "configs" / "sd2-tiny.yaml"
EQUIV2 = REPO / "tests" / "fixtures" / "equiv2"


@pytest.fixture(scope="module")
def conditioner():
    torch.manual_seed(0)
    return instantiate_from_config(OmegaConf.load(TINY_SDXL).model.params.conditioner_config)


def batch(prompts, h=1024, w=768):
    sizes = torch.tensor([[h, w]] * len(prompts))
    return {"txt": prompts, "original_size_as_tuple": sizes, "crop_coords_top_left": torch.tensor([[16, 0]] * len(prompts)),
            "target_size_as_tuple": sizes}


def test_size_embedding_is_cos_then_sin_of_each_number():
    emb = ConcatTimestepEmbedderND(outdim=4)(torch.tensor([[1024, 768]]))
    freqs = [1.0, math.exp(-math.log(10000) / 2)]
    expected = [f(v * fr) for v in (1024, 768) for f in (math.cos, math.sin) for fr in freqs]
    assert torch.allclose(emb[0], torch.tensor(expected), atol=1e-5)


def test_outputs_are_concatenated_in_embedder_order(conditioner):
    out = conditioner(batch(["a cat", "a dog"]))
    assert out["crossattn"].shape == (2, 77, 64) and out["vector"].shape == (2, 40)
    with torch.no_grad():
        clip_l = conditioner.embedders[0](["a cat", "a dog"])
        context_g, pooled = conditioner.embedders[1](["a cat", "a dog"])
    assert torch.equal(out["crossattn"][..., :32], clip_l) and torch.equal(out["crossattn"][..., 32:], context_g)
    assert torch.equal(out["vector"][:, :16], pooled)
    sizes = ConcatTimestepEmbedderND(4)(torch.tensor([[1024, 768]] * 2))
    assert torch.equal(out["vector"][:, 16:24], sizes) and torch.equal(out["vector"][:, 32:40], sizes)
    assert [i for i, _ in conditioner.text_embedders()] == [0, 1]


def test_force_zero_embeddings_zeroes_only_that_input(conditioner):
    out = conditioner(batch([""]), force_zero_embeddings=["txt"])
    assert out["crossattn"].abs().sum() == 0 and out["vector"][:, :16].abs().sum() == 0
    assert out["vector"][:, 16:].abs().sum() > 0


def test_empty_captions_are_zeroed_in_the_same_pass_as_the_others():
    """A batch with empty captions (caption dropout) runs each text encoder once: the empty ones' text parts are
    exactly the all-zero conditioning, the others' exactly their own, the size embeddings kept for all."""
    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.load(TINY_SDXL).model)
    prompts = ["a cat", "", "a dog", ""]
    calls = []
    hooks = [e.register_forward_hook(lambda m, i, o: calls.append(m)) for _, e in model.conditioner.text_embedders()]
    out = model.get_learned_conditioning(batch(prompts))
    for hook in hooks:
        hook.remove()
    assert len(calls) == 2  # one call per text encoder
    own = model.conditioner(batch(["a cat", "a dog"]))
    zero = model.conditioner(batch(["", ""]), force_zero_embeddings=["txt"])
    for key in ("crossattn", "vector"):
        assert torch.allclose(out[key][[0, 2]], own[key], atol=1e-6)  # another batch size: float round-off only
        assert torch.equal(out[key][[1, 3]], zero[key])


def test_ucg_rate_drops_that_embedders_output_per_sample(conditioner):
    assert conditioner(batch(["a"]))["vector"][:, 16:24].abs().sum() > 0
    conditioner.embedders[2].ucg_rate = 1.0
    try:
        dropped = conditioner(batch(["a", "b"]))["vector"]
    finally:
        conditioner.embedders[2].ucg_rate = 0.0
    assert dropped[:, 16:24].abs().sum() == 0 and dropped[:, 24:].abs().sum() > 0


def test_bad_embedder_entries_are_clear_errors():
    entry = {"target": "ldm.modules.encoders.sdxl.ConcatTimestepEmbedderND", "params": {"outdim": 4}}
    with pytest.raises(KeyError, match="needs input_key or input_keys"):
        GeneralConditioner([entry])
    with pytest.raises(ValueError, match="legacy_ucg_val is not supported"):
        GeneralConditioner([{**entry, "input_key": "x", "legacy_ucg_val": 0}])


def test_sdxl_personalization_builds_one_manager_per_text_encoder():
    config = OmegaConf.load(TINY_SDXL)
    config.model.params.personalization_config = {"target": "ldm.modules.embedding_manager.EmbeddingManager",
                                                  "params": {"placeholder_strings": ["*"], "initializer_words": ["dog"]}}
    model = instantiate_from_config(config.model)
    assert set(model.embedding_manager.halves) == {"clip_l", "clip_g"}
    assert set(model.embedding_manager.by_embedder()) == {0, 1}
    config.model.params.personalization_config.target = "some.other.Manager"
    with pytest.raises(ValueError, match="cannot run on SDXL"):
        instantiate_from_config(config.model)
    config = OmegaConf.load(TINY_SDXL)
    with pytest.raises(ConfigError, match="unfreeze_model is not supported on SDXL"):
        instantiate_from_config({**config.model, "params": {**config.model.params, "unfreeze_model": True}})


@pytest.mark.parametrize("config,ckpt,have,want", [
    (TINY_SD2, "sdxl-tiny.safetensors", "SDXL", "SD 2.x"),
    (TINY_SDXL, "sd2-tiny.ckpt", "SD 2.x", "SDXL"),
])
def test_file_of_the_other_family_is_one_line_naming_both(config, ckpt, have, want):
    model = instantiate_from_config(OmegaConf.load(config).model)
    with pytest.raises(CheckpointError, match=f"it is an {have} .*checkpoint but the config builds an {want} ") as err:
        model.init_from_ckpt(str(EQUIV2 / ckpt))
    assert "\n" not in str(err.value) and ckpt in str(err.value)


def test_context_regulariser_covers_both_encoders_and_only_the_other_positions():
    """On SDXL the context rows of both encoders: zero with the init words in place; after moving the learned vectors
    (either half), positive, and its gradient reaches only them; logged as part of the loss."""
    config = OmegaConf.load(REPO / "configs" / "shapes" / "shapes-sdxl-finetune.yaml")
    torch.manual_seed(0)
    model = instantiate_from_config(config.model)
    prompts = ["a photo of a * on a blue background", "a photo of a *", ""]
    captions = model.size_batch(prompts, 32, 32)
    halves = model.embedding_manager.halves
    with torch.no_grad():  # init_noise moved the vectors off the init word: put them on it
        for half in halves.values():
            half.string_to_param_dict["*"].copy_(half.initial_embeddings["*"])
    assert float(model.context_preservation_loss(captions, model.get_learned_conditioning(captions))) == 0.0
    for name in ("clip_l", "clip_g"):
        with torch.no_grad():
            for half in halves.values():
                half.string_to_param_dict["*"].copy_(half.initial_embeddings["*"])
            halves[name].string_to_param_dict["*"].add_(torch.randn(4, 64))
        model.zero_grad(set_to_none=True)
        reg = model.context_preservation_loss(captions, model.get_learned_conditioning(captions))
        assert float(reg) > 0
        reg.backward()
        assert halves[name].string_to_param_dict["*"].grad.abs().sum() > 0
        assert all(p.grad is None for p in model.conditioner.parameters())
    loss, logged = model(torch.randn(3, 4, 8, 8), captions)
    assert float(logged["train/loss_context_reg"]) > 0 and torch.isclose(logged["train/loss"], loss)
