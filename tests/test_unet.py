"""The diffusion UNet and its helpers: structure against the real models' state-dict manifests (built on the meta
device), numerics against the original code's outputs on the tiny fixture model, gradient checkpointing with frozen
weights, bf16 autocast, device independence, and the schedule / DDIM helpers of ``diffusionmodules.util``."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from paths import FIXTURES, REFERENCE
from ldm.modules.diffusionmodules import util
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.util import instantiate_from_config

PREFIX = "model.diffusion_model."

FULL_UNET = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=320,
    attention_resolutions=[4, 2, 1],
    num_res_blocks=2,
    channel_mult=[1, 2, 4, 4],
    num_heads=8,
    use_spatial_transformer=True,
    transformer_depth=1,
    use_checkpoint=True,
    legacy=False,
)
MANIFESTS = {
    "ldm": ("ldm-txt2img-1p4B.state_dict.json", 1280, 872_300_484),
    "sd": ("sd-v1.state_dict.json", 768, 859_520_964),
}


def assert_close(out: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4) -> None:
    atol = rtol * max(1.0, ref.abs().max().item())
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def fixtures() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / "ldm-tiny.fixtures.pt", map_location="cpu", weights_only=True)


def tiny_unet(**overrides) -> UNetModel:
    """The fixture config's UNet with the fixture checkpoint's weights, in eval mode."""
    config = OmegaConf.load(FIXTURES / "ldm-tiny.yaml").model.params.unet_config
    config.params.update(overrides)
    unet = instantiate_from_config(config)
    sd = torch.load(FIXTURES / "ldm-tiny.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    unet.load_state_dict({k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}, strict=True)
    return unet.eval()


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_full_size_state_dict_matches_manifest(name: str) -> None:
    file, context_dim, n_params = MANIFESTS[name]
    manifest = json.loads((REFERENCE / file).read_text())
    expected = {
        k[len(PREFIX):]: tuple(v["shape"]) for k, v in manifest["state_dict"].items() if k.startswith(PREFIX)
    }
    with torch.device("meta"):
        unet = UNetModel(**FULL_UNET, context_dim=context_dim)
    got = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert set(got) == set(expected), (sorted(set(got) - set(expected))[:5], sorted(set(expected) - set(got))[:5])
    assert got == expected
    assert list(got) == list(expected)  # same order as the original
    assert sum(p.numel() for p in unet.parameters()) == n_params
    assert manifest["param_counts"]["model.diffusion_model (UNetModel)"] == n_params


@pytest.mark.parametrize(
    ("ref", "x", "t", "cond"),
    [
        ("apply_model.eps_c", "q_sample.x_noisy", "inputs.t", "cond.c"),
        ("apply_model.eps_uc", "q_sample.x_noisy", "inputs.t", "cond.uc"),
        ("apply_model.eps_c_placeholder", "q_sample.x_noisy", "inputs.t", "cond.c_placeholder"),
        ("apply_model.eps_c_xstart_t0", "inputs.x_start", None, "cond.c"),
    ],
)
def test_tiny_unet_matches_original(fixtures, ref: str, x: str, t: str | None, cond: str) -> None:
    unet = tiny_unet()
    timesteps = fixtures[t] if t else torch.tensor([0, 999])
    with torch.no_grad():
        out = unet(fixtures[x], timesteps, context=fixtures[cond])
    assert_close(out, fixtures[ref])


def _context_grad(unet: UNetModel, fixtures, checkpointing: bool) -> tuple[torch.Tensor, int]:
    """Gradient of a loss w.r.t. the context, and how many times ``torch.utils.checkpoint`` ran."""
    calls = 0
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    context = fixtures["cond.c"].clone().requires_grad_(True)
    if checkpointing is not None:
        assert util.set_gradient_checkpointing(unet, checkpointing) > 0
    torch.utils.checkpoint.checkpoint = counting
    try:
        out = unet(fixtures["q_sample.x_noisy"], fixtures["inputs.t"], context=context)
        ((out - fixtures["inputs.noise"]) ** 2).mean().backward()
    finally:
        torch.utils.checkpoint.checkpoint = original
    return context.grad, calls


def test_checkpointing_with_frozen_weights_gives_context_grad(fixtures) -> None:
    unet = tiny_unet()
    assert unet.use_checkpoint
    unet.requires_grad_(False)
    grad_plain, calls_plain = _context_grad(unet, fixtures, checkpointing=False)
    grad_ckpt, calls_ckpt = _context_grad(unet, fixtures, checkpointing=True)
    assert calls_plain == 0 and calls_ckpt > 0
    assert grad_ckpt.abs().max() > 0
    torch.testing.assert_close(grad_ckpt, grad_plain, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in unet.parameters())


def test_module_flag_controls_checkpointing(fixtures) -> None:
    _, calls_on = _context_grad(tiny_unet(), fixtures, checkpointing=None)
    _, calls_off = _context_grad(tiny_unet(use_checkpoint=False), fixtures, checkpointing=None)
    assert calls_on > 0 and calls_off == 0


def test_checkpointing_keeps_parameter_grads(fixtures) -> None:
    grads = []
    for flag in (False, True):
        unet = tiny_unet(use_checkpoint=flag)
        out = unet(fixtures["q_sample.x_noisy"], fixtures["inputs.t"], context=fixtures["cond.c"])
        out.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_bf16_autocast_on_cpu(fixtures) -> None:
    unet = tiny_unet()
    args = (fixtures["q_sample.x_noisy"], fixtures["inputs.t"])
    with torch.no_grad():
        ref = unet(*args, context=fixtures["cond.c"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = unet(*args, context=fixtures["cond.c"])
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_bf16_weights(fixtures) -> None:
    unet = tiny_unet().to(torch.bfloat16)
    with torch.no_grad():
        out = unet(fixtures["q_sample.x_noisy"], fixtures["inputs.t"], context=fixtures["cond.c"])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    ref = fixtures["apply_model.eps_c"]
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_forward_follows_the_device() -> None:
    config = OmegaConf.load(FIXTURES / "ldm-tiny.yaml").model.params.unet_config
    with torch.device("meta"):
        unet = instantiate_from_config(config)
        x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([3, 5]), torch.randn(2, 7, 32)
    out = unet(x, t, context=c)
    assert out.device.type == "meta" and out.shape == x.shape


def test_legacy_attention_unet_runs() -> None:
    torch.manual_seed(0)
    unet = UNetModel(
        image_size=8, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
        attention_resolutions=[2], channel_mult=(1, 2), num_head_channels=16, num_classes=5,
        use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=True,
    )
    x = torch.randn(2, 3, 8, 8)
    out = unet(x, torch.tensor([1, 500]), y=torch.tensor([0, 4]))
    assert out.shape == x.shape
    assert unet.middle_block[1].num_heads == 4


def test_schedule_matches_original(fixtures) -> None:
    betas = util.make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
    assert betas.dtype == np.float64
    torch.testing.assert_close(torch.tensor(betas, dtype=torch.float32), fixtures["schedule.betas"], rtol=1e-6, atol=0)
    alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
    torch.testing.assert_close(
        torch.tensor(alphas_cumprod, dtype=torch.float32), fixtures["schedule.alphas_cumprod"], rtol=1e-6, atol=1e-7
    )
    for schedule in ("cosine", "sqrt_linear", "sqrt"):
        other = util.make_beta_schedule(schedule, 50)
        assert other.shape == (50,) and (other > 0).all() and (other < 1).all()


def test_ddim_helpers_match_original(fixtures) -> None:
    steps = util.make_ddim_timesteps("uniform", 5, 1000, verbose=False)
    np.testing.assert_array_equal(steps, fixtures["ddim.ddim_timesteps"].numpy())
    alphacums = fixtures["schedule.alphas_cumprod"]
    for eta, key in ((0.0, "ddim.ddim_sigmas"), (1.0, "ddim.eta1.ddim_sigmas")):
        sigmas, alphas, alphas_prev = util.make_ddim_sampling_parameters(alphacums, steps, eta, verbose=False)
        torch.testing.assert_close(torch.as_tensor(sigmas, dtype=torch.float64), fixtures[key], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(alphas.double(), fixtures["ddim.ddim_alphas"], rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.as_tensor(alphas_prev), fixtures["ddim.ddim_alphas_prev"], rtol=1e-6, atol=0)
    assert alphas_prev[0] == pytest.approx(float(alphacums[0]))
    quad = util.make_ddim_timesteps("quad", 10, 1000, verbose=False)
    assert quad[0] == 1 and (np.diff(quad) > 0).all()


def test_timestep_embedding() -> None:
    t = torch.tensor([0, 10, 999])
    emb = util.timestep_embedding(t, 7)
    assert emb.shape == (3, 7)
    assert torch.equal(emb[0, :3], torch.ones(3)) and torch.equal(emb[:, -1], torch.zeros(3))
    half = 3
    freqs = torch.exp(-np.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    torch.testing.assert_close(emb[:, half:2 * half], torch.sin(t[:, None].float() * freqs))
    assert torch.equal(util.timestep_embedding(t, 4, repeat_only=True), t[:, None].repeat(1, 4))


def test_extract_and_groupnorm32() -> None:
    a = torch.arange(10.0)
    out = util.extract_into_tensor(a, torch.tensor([2, 7]), (2, 3, 4, 4))
    assert out.shape == (2, 1, 1, 1) and out.flatten().tolist() == [2.0, 7.0]
    norm = util.normalization(64)
    x = torch.randn(2, 64, 4, 4).to(torch.bfloat16)
    assert norm(x).dtype == torch.bfloat16
    assert util.noise_like((3, 2, 2), "cpu", repeat=True).unique(dim=0).shape[0] == 1


SD2_UNET = dict(FULL_UNET, num_heads=-1, num_head_channels=64, use_linear_in_transformer=True, context_dim=1024)
SDXL_UNET = dict(
    FULL_UNET, num_heads=-1, num_head_channels=64, use_linear_in_transformer=True, context_dim=2048,
    attention_resolutions=[4, 2], channel_mult=[1, 2, 4], transformer_depth=[1, 2, 10],
    num_classes="sequential", adm_in_channels=2816,
)


@pytest.mark.parametrize(("file", "kwargs"), [("sd2-v.state_dict.json", SD2_UNET), ("sdxl-base.state_dict.json", SDXL_UNET)])
def test_sd2_and_sdxl_unets_match_their_manifests_in_order_and_size(file: str, kwargs: dict) -> None:
    """Linear projections, per-level depth (SDXL level 0 has no attention, the middle block the last level's depth)
    and ``label_emb`` give exactly the original's keys, order and parameter count."""
    manifest = json.loads((REFERENCE / file).read_text())
    expected = {k[len(PREFIX):]: tuple(v["shape"]) for k, v in manifest["state_dict"].items() if k.startswith(PREFIX)}
    with torch.device("meta"):
        unet = UNetModel(**kwargs)
    got = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert list(got.items()) == list(expected.items())
    assert sum(p.numel() for p in unet.parameters()) == manifest["param_counts"]["model.diffusion_model"]


def test_sequential_label_emb_adds_the_vector_to_the_time_embedding() -> None:
    torch.manual_seed(0)
    unet = UNetModel(
        image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1, attention_resolutions=[2],
        channel_mult=[1, 2], num_head_channels=16, use_spatial_transformer=True, use_linear_in_transformer=True,
        transformer_depth=[1, 2], context_dim=8, num_classes="sequential", adm_in_channels=6,
    ).eval()
    for p in unet.parameters():  # the zero-initialised output layers would hide every difference
        torch.nn.init.normal_(p, std=0.1)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 8)
    y = torch.randn(2, 6)
    with torch.no_grad():
        out = unet(x, t, ctx, y=y)
        assert not torch.allclose(out, unet(x, t, ctx, y=torch.zeros_like(y)))
        unet.label_emb[0][2].weight.zero_()
        unet.label_emb[0][2].bias.zero_()
        assert torch.allclose(unet(x, t, ctx, y=y), unet(x, t, ctx, y=torch.zeros_like(y)))
    assert len(unet.middle_block[1].transformer_blocks) == 2


def test_sdxl_unet_options_are_checked() -> None:
    base = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
                attention_resolutions=[2], channel_mult=[1, 2], num_head_channels=16, use_spatial_transformer=True,
                context_dim=8)
    with pytest.raises(ValueError, match="needs adm_in_channels"):
        UNetModel(**base, num_classes="sequential")
    with pytest.raises(ValueError, match="transformer_depth has 3 entries for 2 levels"):
        UNetModel(**base, transformer_depth=[1, 1, 1])
