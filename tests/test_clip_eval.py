"""evaluation/clip_eval.py with a tiny random CLIPModel saved to a temporary folder (nothing downloaded): the
preprocessing, the two similarities, and the paper's sampling protocol."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

import evaluation.clip_eval as clip_eval
from evaluation.clip_eval import CLIP_MEAN, CLIP_STD, CLIPEvaluator, ImageDirEvaluator, LDMCLIPEvaluator, strip_placeholders
from ldm.inference import load_model_from_config
from ldm.modules.encoders.tokenizers import SHIPPED_CLIP_BPE, converted_clip_vocab
from ldm.errors import ConfigError

from tiny_models import TINY_CONFIGS, make_tiny_checkpoint


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-clip-model")
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(small, vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407),
        vision_config=dict(small, image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    CLIPTokenizer.from_pretrained(str(converted_clip_vocab(SHIPPED_CLIP_BPE))).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def evaluator(clip_dir):
    return LDMCLIPEvaluator("cpu", str(clip_dir))


def test_preprocess_maps_to_clip_space(evaluator):
    constant = torch.full((2, 3, 40, 56), 0.5)  # [-1, 1] value 0.5 -> 0.75 in [0, 1]
    x = evaluator.preprocess(constant)
    assert x.shape == (2, 3, 32, 32)
    expected = (0.75 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(x[0, :, 5, 7], expected, atol=1e-5)
    ramp = torch.linspace(-1, 1, 64).view(1, 1, 1, 64).expand(1, 3, 32, 64)  # centre crop keeps the middle columns
    centre = evaluator.preprocess(ramp)[0, 0, 0] * CLIP_STD[0] + CLIP_MEAN[0]
    assert abs(float(centre.mean()) - 0.5) < 0.02 and float(centre.min()) > 0.2 and float(centre.max()) < 0.8


def test_features_are_clips_normalised_embeddings(evaluator, clip_dir):
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    reference = CLIPModel.from_pretrained(str(clip_dir)).eval()
    tokens = evaluator.tokenize(["a photo of a dog"])
    with torch.no_grad():
        out = reference(input_ids=tokens, pixel_values=evaluator.preprocess(images))
    assert torch.allclose(evaluator.get_text_features("a photo of a dog"), out.text_embeds, atol=1e-5)
    assert torch.allclose(evaluator.get_image_features(images), out.image_embeds, atol=1e-5)


def test_similarities(evaluator, clip_dir):
    torch.manual_seed(0)
    src, gen = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(3, 3, 32, 32) * 2 - 1
    assert evaluator.img_to_img_similarity(src[:1], src[:1]) == pytest.approx(1.0, abs=1e-5)
    pairs = evaluator.get_image_features(src) @ evaluator.get_image_features(gen).T
    assert evaluator.img_to_img_similarity(src, gen) == pytest.approx(float(pairs.mean()), abs=1e-6)
    text = evaluator.get_text_features("a photo of ") @ evaluator.get_image_features(gen).T
    assert evaluator.txt_to_img_similarity("a photo of ", gen) == pytest.approx(float(text.mean()), abs=1e-6)
    image_dir = ImageDirEvaluator("cpu", str(clip_dir))
    assert image_dir.evaluate(gen, src, "a photo of *") == pytest.approx(
        (evaluator.img_to_img_similarity(src, gen), evaluator.txt_to_img_similarity("a photo of ", gen)), abs=1e-6
    )


def test_paper_protocol(evaluator, monkeypatch):
    """64 samples in 8 batches of 8, DDIM 50 steps, eta 0, scale 5, LDM's 256 px; the text without the placeholder."""
    calls = []

    def fake_sample_images(model, prompts, **kwargs):
        calls.append((list(prompts), kwargs))
        return torch.rand(len(prompts), 3, kwargs["H"], kwargs["W"])

    monkeypatch.setattr(clip_eval, "sample_images", fake_sample_images)
    texts = []
    real_text_features = evaluator.get_text_features
    monkeypatch.setattr(evaluator, "get_text_features", lambda text, norm=True: texts.append(text) or real_text_features(text, norm))
    ldm = SimpleNamespace(
        image_size=32, num_downs=3, betas=torch.zeros(1), ema_scope=torch.no_grad,
        embedding_manager=SimpleNamespace(string_to_token_dict={"*": 1008}),
    )
    image_sim, text_sim = evaluator.evaluate(ldm, torch.rand(4, 3, 256, 256) * 2 - 1, "a photo of *")
    assert len(calls) == 8 and all(len(prompts) == 8 and prompts[0] == "a photo of *" for prompts, _ in calls)
    assert {(k["steps"], k["eta"], k["scale"], k["H"], k["W"], k["sampler"]) for _, k in calls} == {(50, 0.0, 5.0, 256, 256, "ddim")}
    assert texts == ["a photo of "] and -1 <= image_sim <= 1 and -1 <= text_sim <= 1
    assert strip_placeholders("* and @ in a box", ["*", "@"]) == " and  in a box"


def test_evaluate_a_tiny_ldm_model(evaluator, tmp_path):
    ckpt = make_tiny_checkpoint("ldm", tmp_path / "ldm.ckpt")
    model = load_model_from_config(TINY_CONFIGS["ldm"], ckpt, "cpu")
    samples = evaluator.generate_samples(model, "a photo of a dog", n_samples=3, n_steps=2, seed=0)
    assert samples.shape == (3, 3, 16, 16) and samples.min() >= -1 and samples.max() <= 1
    again = evaluator.generate_samples(model, "a photo of a dog", n_samples=3, n_steps=2, seed=0)
    assert torch.equal(samples, again)
    image_sim, text_sim = evaluator.evaluate(model, samples, "a photo of a dog", n_samples=2, n_steps=2, seed=0)
    assert isinstance(image_sim, float) and isinstance(text_sim, float)


def test_missing_clip_model_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="neither a local CLIPModel folder nor in the Hugging Face cache"):
        CLIPEvaluator("cpu", str(tmp_path / "nowhere"))
