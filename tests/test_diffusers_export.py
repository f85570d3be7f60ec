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
from ldm.diffusers_export import diffusers_pipeline  # noqa: E402
from ldm.inference import load_config, load_model_from_config  # noqa: E402

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
