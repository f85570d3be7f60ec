"""LatentDiffusion built from every shipped config; real checkpoints' keys load with nothing missing or unexpected."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from paths import REFERENCE, REPO
from ldm.checkpoint import CheckpointError
from ldm.models.diffusion.training import NonFiniteLossError
from ldm.util import instantiate_from_config

CONFIGS = sorted((REPO / "configs").glob("*-diffusion/*.yaml")) + sorted((REPO / "configs").glob("stable-diffusion-xl/*.yaml"))


def family_of(config):
    """The reference manifest a shipped config's model must match."""
    if config.parent.name == "stable-diffusion-xl":
        return "sdxl-base"
    if config.parent.name == "stable-diffusion":
        return "sd2-v" if config.stem.startswith("v2-") else "sd-v1"
    return "ldm-txt2img-1p4B"


def build_on_meta(path):
    config = OmegaConf.load(path)
    pers = config.model.params.get("personalization_config", None)
    if pers is not None:
        pers.params.initializer_words = []  # no token table to read on the meta device
    with torch.device("meta"):
        return instantiate_from_config(config.model)


def reference(name):
    return json.loads((REFERENCE / f"{name}.state_dict.json").read_text())


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_builds(config):
    model = build_on_meta(config)
    assert model.num_timesteps == 1000
    ref = reference(family_of(config))["state_dict"]
    ours = {k: list(v.shape) for k, v in model.state_dict().items() if not k.startswith("embedding_manager.")}
    assert ours == {k: v["shape"] for k, v in ref.items()}
    if "personalization_config" in OmegaConf.load(config).model.params:
        assert model.embedding_manager is not None
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        unfrozen = OmegaConf.load(config).model.params.get("unfreeze_model", False)
        assert unfrozen or all(n.startswith("embedding_manager.") and "string_to_param_dict" in n for n in trainable)


@pytest.mark.parametrize("family,config", [
    ("ldm-txt2img-1p4B", "latent-diffusion/txt2img-1p4B-eval.yaml"),
    ("sd-v1", "stable-diffusion/v1-inference.yaml"),
    ("sd2-v", "stable-diffusion/v2-inference-v.yaml"),
    ("sdxl-base", "stable-diffusion-xl/sdxl-inference.yaml"),
])
def test_real_checkpoint_keys_load_cleanly(family, config, tmp_path, monkeypatch):
    model = build_on_meta(REPO / "configs" / config)
    ref = reference(family)
    keys = {k: v["shape"] for k, v in ref["state_dict"].items()}
    for group in ref["optional_keys_in_real_checkpoints"].values():  # EMA weights, CLIP position_ids
        keys.update({k: v["shape"] for k, v in group.items()})
    # the model's schedule buffers are real CPU tensors; everything else lives on the meta device
    sd = {k: torch.zeros(shape) if "." not in k else torch.empty(shape, device="meta") for k, shape in keys.items()}
    assert any(k.startswith("model_ema.") for k in sd) or family in ("sd2-v", "sdxl-base")  # those list no EMA keys
    monkeypatch.setattr("ldm.models.diffusion.ddpm.load_state_dict", lambda *a, **k: dict(sd))
    missing, unexpected = model.init_from_ckpt("model.ckpt")
    assert missing == [] and unexpected == []


def test_wrong_family_checkpoint_is_refused(monkeypatch):
    model = build_on_meta(REPO / "configs/latent-diffusion/txt2img-1p4B-eval.yaml")
    sd = {k: torch.empty(v["shape"], device="meta") for k, v in reference("sd-v1")["state_dict"].items() if "." in k}
    monkeypatch.setattr("ldm.models.diffusion.ddpm.load_state_dict", lambda *a, **k: dict(sd))
    with pytest.raises(CheckpointError, match="SD v1 .* checkpoint but the config builds an LDM"):
        model.init_from_ckpt("sd.ckpt")


@pytest.mark.parametrize("config,family,have,want", [
    ("stable-diffusion/v1-inference.yaml", "sd2-v", "SD 2.x", "SD v1"),
    ("stable-diffusion/v2-inference-v.yaml", "sd-v1", "SD v1", "SD 2.x"),
    ("stable-diffusion/v2-inference-v.yaml", "sdxl-base", "SDXL", "SD 2.x"),
    ("stable-diffusion-xl/sdxl-inference.yaml", "sd2-v", "SD 2.x", "SDXL"),
    ("stable-diffusion-xl/sdxl-inference.yaml", "sd-v1", "SD v1", "SDXL"),
])
def test_other_family_checkpoint_is_one_line_naming_both(monkeypatch, config, family, have, want):
    model = build_on_meta(REPO / "configs" / config)
    sd = {k: torch.empty(v["shape"], device="meta") for k, v in reference(family)["state_dict"].items() if "." in k}
    monkeypatch.setattr("ldm.models.diffusion.ddpm.load_state_dict", lambda *a, **k: dict(sd))
    with pytest.raises(CheckpointError, match=f"{have} .* checkpoint but the config builds an {want}") as err:
        model.init_from_ckpt("other.ckpt")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_samplers_follow_the_parameterization(parameterization):
    """An oracle for a one-point data distribution, in each parameterization: DDIM and PLMS land on the point."""
    from ldm.models.diffusion.ddim import DDIMSampler
    from ldm.models.diffusion.plms import PLMSSampler

    config = OmegaConf.load(REPO / "configs" / "shapes" / "shapes-ldm-train-continue.yaml")
    config.model.params.parameterization = parameterization
    config.model.params.use_ema = False
    model = instantiate_from_config(config.model)
    point = torch.rand(1, 12, 16, 16, generator=torch.Generator().manual_seed(0)) - 0.5

    def oracle(x_t, t, cond):
        a = model.alphas_cumprod[t].view(-1, 1, 1, 1)
        x0 = point.expand_as(x_t)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return {"eps": eps, "x0": x0, "v": model.get_v(x0, eps, t)}[parameterization]

    model.apply_model = oracle
    t = torch.tensor([0, 500, 999])
    noise = torch.randn(3, 12, 16, 16)
    x_t = model.q_sample(point.expand(3, -1, -1, -1), t, noise)
    assert torch.allclose(model.eps_from_output(x_t, t, oracle(x_t, t, None)), noise, atol=2e-4)
    for sampler in (DDIMSampler, PLMSSampler):
        samples, steps = sampler(model).sample(10, 2, (12, 16, 16), conditioning=torch.zeros(2, 4, 64), verbose=False)
        assert torch.allclose(steps["pred_x0"][-1], point.expand(2, -1, -1, -1), atol=1e-3)
        assert (samples - point).abs().max() < 0.2  # x at t = 0 keeps sqrt(1 - abar_0) ~ 0.03 of its noise


def test_context_regulariser_measures_only_the_other_positions():
    """Zero at the init words; after moving the learned vectors, positive, and its gradient reaches only them."""
    config = OmegaConf.load(REPO / "configs" / "shapes" / "shapes-ldm-finetune.yaml")
    torch.manual_seed(0)
    model = instantiate_from_config(config.model)
    assert model.context_reg_weight == 0.03
    captions = ["a photo of a * on a blue background", "a photo of a *"]
    manager = model.embedding_manager
    with torch.no_grad():  # the shapes config starts the vectors near the init word (init_noise); put them on it
        manager.string_to_param_dict["*"].copy_(manager.initial_embeddings["*"])
    assert float(model.context_preservation_loss(captions, model.get_learned_conditioning(captions))) == 0.0
    with torch.no_grad():
        manager.string_to_param_dict["*"].add_(torch.randn_like(manager.string_to_param_dict["*"]))
    reg = model.context_preservation_loss(captions, model.get_learned_conditioning(captions))
    assert float(reg) > 0
    reg.backward()
    assert manager.string_to_param_dict["*"].grad.abs().sum() > 0
    assert all(p.grad is None for p in model.cond_stage_model.parameters())
    x = torch.randn(2, 12, 16, 16)
    loss, logged = model(x, captions)
    assert float(logged["train/loss_context_reg"]) > 0 and torch.isclose(logged["train/loss"], loss)


def test_both_regularisers_add_up_in_one_place():
    """With both weights on, the loss is the diffusion loss plus each weighted regulariser, each logged once."""
    config = OmegaConf.load(REPO / "configs" / "shapes" / "shapes-ldm-finetune.yaml")
    config.model.params.embedding_reg_weight = 0.5
    torch.manual_seed(0)
    model = instantiate_from_config(config.model)
    with torch.no_grad():
        model.embedding_manager.string_to_param_dict["*"].add_(1.0)
    captions = ["a photo of a * on a blue background", "a photo of a *"]
    x, t, noise = torch.randn(2, 12, 16, 16), torch.tensor([10, 500]), torch.randn(2, 12, 16, 16)
    cond = model.get_learned_conditioning(captions)
    plain, _ = model.loss_from_prediction(model.apply_model(model.q_sample(x, t, noise), t, cond), x, noise, t)
    loss, logged = model.p_losses(x, cond, t, noise=noise, captions=captions)
    emb, ctx = logged["train/loss_emb_reg"], logged["train/loss_context_reg"]
    assert float(emb) > 0 and float(ctx) > 0
    torch.testing.assert_close(loss, plain + 0.5 * emb + 0.03 * ctx)
    assert logged["train/loss"] is loss
    without, logged = model.p_losses(x, cond, t, noise=noise)  # conditioning given ready-made: no context term
    assert "train/loss_context_reg" not in logged
    torch.testing.assert_close(without, plain + 0.5 * emb)


def test_training_state_is_created_with_the_model(tmp_path):
    config = OmegaConf.load(REPO / "configs" / "shapes" / "shapes-ldm-finetune.yaml")
    provenance = {"seed": 5, "config": None, "base_model": None, "data_files": []}
    model = instantiate_from_config(config.model, embedding_provenance=provenance)
    assert model.latent_cache == {} and model.step_finite is None and model.all_finite is None
    assert model.embedding_provenance is provenance
    model.track_finite(torch.tensor(1.0))
    assert bool(model.step_finite) and bool(model.all_finite)
    with pytest.raises(NonFiniteLossError):  # step 0: a step at which the flag is read
        model.track_finite(torch.tensor(float("nan")))
    assert not bool(model.step_finite) and not bool(model.all_finite)
    model.save_embeddings(tmp_path, 7)
    saved = torch.load(tmp_path / "embeddings_gs-7.pt", weights_only=True)
    assert saved["seed"] == 5 and saved["step"] == 7


def test_offset_noise_adds_a_constant_per_image_and_channel_and_is_off_by_default():
    config = OmegaConf.load(REPO / "configs" / "shapes" / "shapes-ldm-train-continue.yaml")
    config.model.params.use_ema = False
    model = instantiate_from_config(config.model)
    x = torch.zeros(256, 12, 16, 16)
    torch.manual_seed(0)
    plain = model.training_noise(x)
    torch.manual_seed(0)
    assert torch.equal(plain, torch.randn_like(x))  # off: the same draws as before the option existed
    model.offset_noise = 0.3
    torch.manual_seed(0)
    noise = model.training_noise(x)
    assert torch.allclose(noise - plain, (noise - plain)[:, :, :1, :1].expand_as(noise), atol=1e-6)  # one per image/channel
    offsets = (noise - plain)[:, :, 0, 0]
    assert 0.25 < float(offsets.std()) < 0.35
