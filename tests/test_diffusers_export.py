"""The same model in both stacks: a tiny SD v1 / SD 2.x / SDXL checkpoint opened by our code and, through
ldm/diffusers_export.py (diffusers' own converters), as a diffusers pipeline, computes the same text-encoder states,
UNet output and VAE decode on the same inputs, to float32 round-off; scripts/convert_to_diffusers.py writes a folder
that from_pretrained opens offline."""

import pytest
import torch

from paths import load_script
from tiny_models import TINY_CONFIGS, make_tiny_checkpoint

diffusers = pytest.importorskip("diffusers")

from ldm.checkpoint import load_state_dict  # noqa: E402
from ldm.diffusers_export import diffusers_pipeline, diffusers_unet_config, text_encoder_configs  # noqa: E402
from ldm.inference import load_config, load_model_from_config  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

REAL = {"sd": "configs/stable-diffusion/v1-inference.yaml", "sd2": "configs/stable-diffusion/v2-inference-v.yaml",
        "sdxl": "configs/stable-diffusion-xl/sdxl-inference.yaml"}
TINY_OPEN_CLIP = {"width": 32, "heads": 2, "layers": 3, "embed_dim": 16}
TINY_CLIP_L = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32, "num_hidden_layers": 2,
               "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
               "pad_token_id": 1, "bos_token_id": 49406, "eos_token_id": 49407}

PROMPTS = ["a photo of a cat", "a painting of a * on a hill, trending on artstation"]
SIZE = 16  # pixels; the tiny models' latents are 8 x 8


def close(ours: torch.Tensor, theirs: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal to float32 round-off: within ``rel`` of the larger of 1 and our largest value."""
    assert ours.shape == theirs.shape
    scale = max(1.0, ours.abs().max().item())
    assert (ours - theirs).abs().max().item() <= rel * scale, (ours - theirs).abs().max().item()


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """``{family: (our model, the diffusers pipeline, checkpoint path)}``, built once from one checkpoint each."""
    root = tmp_path_factory.mktemp("export")
    built = {}
    for family in ("sd", "sd2", "sdxl"):
        ckpt = make_tiny_checkpoint(family, root / f"{family}.ckpt")
        config = load_config(TINY_CONFIGS[family])
        built[family] = (load_model_from_config(config, ckpt, "cpu"), diffusers_pipeline(config, load_state_dict(ckpt)), ckpt)
    return built


def narrow(family):
    """The shipped inference config of ``family`` with every block, level and layer count kept and the widths cut
    (UNet 32 channels, VAE 32, text encoders 32 wide): the key layout of the real model at a test's cost."""
    config = load_config(REAL[family])
    params = config.model.params
    params.image_size = 8
    params.first_stage_config.params.ddconfig.ch = 32
    unet = params.unet_config.params
    unet.model_channels = 32
    if "num_heads" in unet:
        unet.num_heads = 8
    else:
        unet.num_head_channels = 8
    if family == "sdxl":
        clip_l, clip_g = params.conditioner_config.params.emb_models[:2]
        clip_l.params.text_config, clip_l.params.layer_idx = TINY_CLIP_L, 1
        clip_g.params.text_config = TINY_OPEN_CLIP
        unet.context_dim, unet.adm_in_channels = 64, 16 + 3 * 2 * 256
    elif family == "sd2":
        params.cond_stage_config.params.text_config, unet.context_dim = TINY_OPEN_CLIP, 32
    else:
        params.cond_stage_config.params = {"version": str(TINY_CONFIGS["sd"].parents[1] / "fixtures" / "tiny-clip")}
        unet.context_dim = 32
    return config


def conditioning(model, pipe, family):
    """Ours and theirs for PROMPTS: (context, context) or, for SDXL, ({crossattn, vector}, (context, pooled))."""
    if family == "sdxl":
        ours = model.get_learned_conditioning(model.size_batch(PROMPTS, SIZE, SIZE))
        context, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        return ours, (context, pooled)
    return model.get_learned_conditioning(PROMPTS), pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0]


@pytest.mark.parametrize("family", ["sd", "sd2", "sdxl"])
@torch.no_grad()
def test_text_unet_and_vae_agree(both, family):
    model, pipe, _ = both[family]
    ours, theirs = conditioning(model, pipe, family)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([10, 700])
    if family == "sdxl":
        context, pooled = theirs
        close(ours["crossattn"], context)
        close(ours["vector"][:, : pooled.shape[1]], pooled)
        time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2, dtype=torch.float32)  # original, crop, target
        unet = pipe.unet(x, t, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    else:
        close(ours, theirs)
        unet = pipe.unet(x, t, encoder_hidden_states=ours).sample
    close(model.apply_model(x, t, ours), unet)
    z = torch.randn(2, 4, 8, 8, generator=generator)
    close(model.decode_first_stage(z), pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample)


@pytest.mark.parametrize("family", ["sd", "sd2", "sdxl"])
@torch.no_grad()
def test_the_real_key_layouts_convert(family):
    """Four levels with two res blocks each (SDXL: three, 1/2/10 transformer blocks): not only the tiny layout."""
    config = narrow(family)
    torch.manual_seed(0)
    model = instantiate_from_config(config.model).eval()
    model.embedding_manager = None  # as load_model_from_config without an embedding: '*' is an ordinary token
    for p in model.model.parameters():
        p.add_(0.02 * torch.randn_like(p))
    pipe = diffusers_pipeline(config, model.state_dict())
    ours, theirs = conditioning(model, pipe, family)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    if family == "sdxl":
        time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2, dtype=torch.float32)  # the sizes conditioning() gave
        close(ours["crossattn"], theirs[0])
        unet = pipe.unet(x, t, encoder_hidden_states=theirs[0], added_cond_kwargs={"text_embeds": theirs[1], "time_ids": time_ids}).sample
    else:
        close(ours, theirs)
        unet = pipe.unet(x, t, encoder_hidden_states=ours).sample
    close(model.apply_model(x, t, ours), unet)
    z = torch.randn(1, 4, 8, 8)
    close(model.decode_first_stage(z), pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample)


def test_the_shipped_configs_give_the_published_diffusers_shapes():
    """What diffusers' own SD 1.x / 2.x / XL model folders hold (their unet, text_encoder(_2) configs)."""
    v1, v2, xl = (diffusers_unet_config(load_config(REAL[f])) for f in ("sd", "sd2", "sdxl"))
    assert v1["block_out_channels"] == [320, 640, 1280, 1280] and v1["attention_head_dim"] == 8 and v1["cross_attention_dim"] == 768
    assert v2["attention_head_dim"] == [5, 10, 20, 20] and v2["use_linear_projection"] and v2["cross_attention_dim"] == 1024
    assert xl["attention_head_dim"] == [5, 10, 20] and xl["transformer_layers_per_block"] == [1, 2, 10]
    assert (xl["addition_embed_type"], xl["addition_time_embed_dim"], xl["projection_class_embeddings_input_dim"]) == ("text_time", 256, 2816)
    shapes = {f: [(name, c.hidden_size, c.num_hidden_layers, c.hidden_act) for name, c in text_encoder_configs(load_config(REAL[f]))]
              for f in REAL}
    assert shapes == {"sd": [("CLIPTextModel", 768, 12, "quick_gelu")], "sd2": [("CLIPTextModel", 1024, 23, "gelu")],
                      "sdxl": [("CLIPTextModel", 768, 12, "quick_gelu"), ("CLIPTextModelWithProjection", 1280, 32, "gelu")]}


def test_schedules_agree(both):
    for family in ("sd", "sd2"):
        model, pipe, _ = both[family]
        assert torch.allclose(model.alphas_cumprod.float(), pipe.scheduler.alphas_cumprod.float(), rtol=1e-5)
    assert both["sd2"][1].scheduler.config.prediction_type == "v_prediction"
    assert both["sd"][1].scheduler.config.prediction_type == "epsilon"


@torch.no_grad()
def test_the_exported_folder_opens_offline(both, tmp_path):
    convert_to_diffusers = load_script("convert_to_diffusers")

    model, pipe, ckpt = both["sd"]
    out = tmp_path / "sd-diffusers"
    convert_to_diffusers.main(["--config", str(TINY_CONFIGS["sd"]), "--ckpt", str(ckpt), "--out", str(out)])
    assert (out / "model_index.json").is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    loaded = diffusers.StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    close(model.get_learned_conditioning(PROMPTS), loaded.encode_prompt(PROMPTS, "cpu", 1, False)[0])
    image = loaded("a photo of a cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(1)).images
    assert image.shape == (1, SIZE, SIZE, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())


def test_bad_input_is_one_line(both, tmp_path, capsys):
    convert_to_diffusers = load_script("convert_to_diffusers")

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    cases = [
        (["--config", str(TINY_CONFIGS["ldm"]), "--ckpt", str(both["sd"][2]), "--out", str(tmp_path / "a")], "only Stable Diffusion"),
        (["--config", str(TINY_CONFIGS["sd"]), "--ckpt", str(both["sd"][2]), "--out", str(tmp_path / "taken")], "already exists"),
        (["--config", str(TINY_CONFIGS["sd"]), "--ckpt", str(both["sd2"][2]), "--out", str(tmp_path / "b")], "does not fit config"),
    ]
    for argv, words in cases:
        with pytest.raises(SystemExit) as exit_:
            convert_to_diffusers.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and words in err[0], err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@torch.no_grad()
def test_the_shapes_sd1_layout_converts():
    """configs/shapes/shapes-sd1-inference.yaml gives its heads as channels per head (num_head_channels: 32, no linear
    projections), which diffusers' helper leaves unset; the exporter derives the heads per level and the UNet agrees."""
    config = load_config("configs/shapes/shapes-sd1-inference.yaml")
    assert diffusers_unet_config(config)["attention_head_dim"] == [1, 2, 4]  # 32, 64, 128 channels / 32 per head
    torch.manual_seed(0)
    model = instantiate_from_config(config.model).eval()
    model.embedding_manager = None
    for p in model.model.parameters():
        p.add_(0.02 * torch.randn_like(p))
    pipe = diffusers_pipeline(config, model.state_dict())
    context = model.get_learned_conditioning(PROMPTS)
    close(context, pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0])
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    close(model.apply_model(x, t, context), pipe.unet(x, t, encoder_hidden_states=context).sample)
