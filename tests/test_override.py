"""The override signals read the same on the LDM (BERT) and SD (CLIP) code paths: neutral for the init word's own
vectors, and moved by vectors that rewrite the rest of the prompt."""
import pytest
import torch
from omegaconf import OmegaConf

from ldm.train.override import override_signals, set_reference, text_contrast, text_override, unet_contrast
from ldm.util import instantiate_from_config
from tiny_models import TINY_CONFIGS, make_tiny_checkpoint

PROMPTS = ["a photo of a * on a red background", "a photo of a * on a blue background", "a photo of a * in a box"]


@pytest.fixture(scope="module", params=["ldm", "sd"])
def model(request, tmp_path_factory):
    config = OmegaConf.load(TINY_CONFIGS[request.param])
    config.model.params.ckpt_path = str(make_tiny_checkpoint(request.param, tmp_path_factory.mktemp("override") / "m.ckpt"))
    config.model.params.personalization_config.params.num_vectors_per_token = 2
    built = instantiate_from_config(config.model).eval()
    built.family = request.param
    return built


def learned(model):
    return model.embedding_manager.string_to_param_dict["*"]


def test_the_init_words_own_vectors_change_nothing(model):
    with torch.no_grad():
        learned(model).copy_(model.embedding_manager.initial_embeddings["*"])
    signals = override_signals(model, PROMPTS)
    assert signals["text_override"] == pytest.approx(0.0, abs=1e-10)
    for name in ("text_contrast", "text_contrast_min", "unet_contrast", "unet_contrast_min"):
        assert signals[name] == pytest.approx(1.0, abs=1e-5)


def test_vectors_far_from_the_init_word_move_the_context_and_are_repeatable(model):
    with torch.no_grad():
        learned(model).copy_(50.0 * torch.randn(learned(model).shape, generator=torch.Generator().manual_seed(3)))
    first = override_signals(model, PROMPTS)
    assert override_signals(model, PROMPTS) == first  # no global random generator, no training-mode noise
    if model.family == "ldm":  # BERT reads both ways: the prefix and the phrase after the word change
        assert first["text_override"] > 1e-3
    else:  # CLIP is causal: only the rows after the word change
        assert first["text_override"] > 1e-4
    assert first["text_contrast"] != pytest.approx(1.0, abs=1e-4)
    assert first["unet_contrast"] != pytest.approx(1.0, abs=1e-4)
    assert first["text_contrast_min"] <= first["text_contrast"] * 1.0001  # the smallest per-prompt ratio
    assert first["unet_contrast_min"] <= first["unet_contrast"] * 1.0001


def test_a_loaded_word_gets_the_init_words_reference(model):
    manager = model.embedding_manager
    saved = manager.initial_embeddings.pop("*")
    try:
        set_reference(model, "sculpture")
        assert torch.equal(manager.initial_embeddings["*"], saved)
    finally:
        manager.initial_embeddings["*"] = saved


def test_contrast_needs_two_prompts(model):
    with pytest.raises(ValueError, match="two prompts"):
        text_contrast(model, PROMPTS[:1])
    with pytest.raises(ValueError, match="two prompts"):
        unet_contrast(model, PROMPTS[:1])
    assert text_override(model, PROMPTS[:1]) >= 0.0
