"""The first-stage autoencoders: AutoencoderKL's structure against the real models' manifests (built on the meta
device) and its numerics against the original code's outputs on the tiny fixture model; the posterior
distribution; VQModel / VQModelInterface / IdentityFirstStage behaviour; checkpoint loading."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from paths import FIXTURES, REFERENCE
from ldm.models.autoencoder import AutoencoderKL, IdentityFirstStage, VQModel, VQModelInterface
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution, normal_kl
from ldm.util import instantiate_from_config

PREFIX = "first_stage_model."
SCALE_FACTOR = 0.18215

FULL_DDCONFIG = dict(
    double_z=True,
    z_channels=4,
    resolution=256,
    in_channels=3,
    out_ch=3,
    ch=128,
    ch_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_resolutions=[],
    dropout=0.0,
)
IDENTITY_LOSS = {"target": "torch.nn.Identity"}
TINY_DDCONFIG = dict(FULL_DDCONFIG, resolution=16, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8])


def assert_close(out: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4) -> None:
    atol = rtol * max(1.0, ref.abs().max().item())
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def fixtures() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / "ldm-tiny.fixtures.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def tiny_state_dict() -> dict[str, torch.Tensor]:
    sd = torch.load(FIXTURES / "ldm-tiny.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}


@pytest.fixture(scope="module")
def ae(tiny_state_dict) -> AutoencoderKL:
    model = instantiate_from_config(OmegaConf.load(FIXTURES / "ldm-tiny.yaml").model.params.first_stage_config)
    model.load_state_dict(tiny_state_dict, strict=True)
    return model.eval()


@pytest.mark.parametrize("file", ["ldm-txt2img-1p4B.state_dict.json", "sd-v1.state_dict.json"])
def test_full_size_state_dict_matches_manifest(file: str) -> None:
    manifest = json.loads((REFERENCE / file).read_text())
    expected = {
        k[len(PREFIX):]: tuple(v["shape"]) for k, v in manifest["state_dict"].items() if k.startswith(PREFIX)
    }
    with torch.device("meta"):
        model = AutoencoderKL(FULL_DDCONFIG, IDENTITY_LOSS, embed_dim=4)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(got) == set(expected), (sorted(set(got) - set(expected))[:5], sorted(set(expected) - set(got))[:5])
    assert got == expected
    assert list(got) == list(expected)  # same order as the original
    counts = manifest["param_counts"]
    assert sum(p.numel() for p in model.parameters()) == counts["first_stage_model (AutoencoderKL)"] == 83_653_863
    for part in ("encoder", "decoder", "quant_conv", "post_quant_conv"):
        n = sum(p.numel() for p in getattr(model, part).parameters())
        assert n == counts[f"first_stage_model.{part}"]


def test_posterior_matches_original(ae, fixtures) -> None:
    with torch.no_grad():
        posterior = ae.encode(fixtures["inputs.image"])
    assert_close(posterior.mean, fixtures["first_stage.posterior_mean"])
    assert_close(posterior.logvar, fixtures["first_stage.posterior_logvar"])
    assert_close(posterior.std, fixtures["first_stage.posterior_std"])
    assert_close(SCALE_FACTOR * posterior.mode(), fixtures["first_stage.z_mode_scaled"])
    torch.manual_seed(77)
    assert_close(SCALE_FACTOR * posterior.sample(), fixtures["first_stage.z_sample_scaled_seed77"])


def test_decode_matches_original(ae, fixtures) -> None:
    with torch.no_grad():
        posterior = ae.encode(fixtures["inputs.image"])
        assert_close(ae.decode(fixtures["inputs.z_dec"]), fixtures["first_stage.raw_decode_z_dec"])
        z_dec = fixtures["inputs.z_dec"]
        assert_close(ae.decode(z_dec / SCALE_FACTOR), fixtures["first_stage.decode_first_stage_z_dec"])
        assert_close(ae.decode(posterior.mode()), fixtures["first_stage.reconstruction_of_image_mode"])
        dec, post = ae(fixtures["inputs.image"], sample_posterior=False)
    assert_close(dec, fixtures["first_stage.autoencoder_forward_no_sample"])
    assert isinstance(post, DiagonalGaussianDistribution)


def test_bf16_autocast_on_cpu(ae, fixtures) -> None:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = ae.decode(fixtures["inputs.z_dec"])
    ref = fixtures["first_stage.raw_decode_z_dec"]
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_init_from_ckpt_with_ignore_keys(tmp_path, tiny_state_dict) -> None:
    path = tmp_path / "ae.ckpt"
    torch.save({"state_dict": tiny_state_dict, "global_step": 3}, path)
    ddconfig = OmegaConf.to_container(OmegaConf.load(FIXTURES / "ldm-tiny.yaml").model.params.first_stage_config)
    params = ddconfig["params"]
    model = AutoencoderKL(params["ddconfig"], params["lossconfig"], 4, ckpt_path=str(path), ignore_keys=["decoder."])
    for key, value in model.state_dict().items():
        if key.startswith("decoder."):
            assert not torch.equal(value, tiny_state_dict[key]), key
        else:
            assert torch.equal(value, tiny_state_dict[key]), key


def test_attention_and_gaussian_helpers() -> None:
    torch.manual_seed(0)
    model = AutoencoderKL(TINY_DDCONFIG, IDENTITY_LOSS, embed_dim=3, colorize_nlabels=5, monitor="val/rec_loss")
    assert len(model.encoder.down[1].attn) == 1 and len(model.decoder.up[1].attn) == 2
    assert model.colorize.shape == (3, 5, 1, 1) and model.monitor == "val/rec_loss"
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    dec, post = model(x)
    assert dec.shape == x.shape and post.mean.shape == (2, 3, 8, 8)
    assert post.kl().shape == (2,) and (post.kl() >= 0).all()
    torch.testing.assert_close(post.kl(post), torch.zeros(2), atol=1e-5, rtol=0)
    assert post.nll(post.mean).shape == (2,)
    torch.testing.assert_close(
        normal_kl(post.mean, post.logvar, 0.0, 0.0).sum(dim=[1, 2, 3]), post.kl(), rtol=1e-5, atol=1e-5
    )
    det = DiagonalGaussianDistribution(torch.randn(2, 6, 4, 4), deterministic=True)
    assert torch.equal(det.sample(), det.mean) and det.kl().item() == 0


def test_batch_input_layout() -> None:
    model = AutoencoderKL(TINY_DDCONFIG, IDENTITY_LOSS, embed_dim=4)
    batch = {"image": torch.rand(2, 16, 16, 3, dtype=torch.float64)}
    x = model.get_input(batch, "image")
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32 and x.is_contiguous()


def test_vq_models() -> None:
    torch.manual_seed(0)
    kwargs = dict(ddconfig=dict(TINY_DDCONFIG, double_z=False), lossconfig=IDENTITY_LOSS, n_embed=16, embed_dim=3)
    vq = VQModel(**kwargs)
    assert vq.quantize.embedding.weight.shape == (16, 3)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    quant, loss, (_, _, indices) = vq.encode(x)
    assert quant.shape == (2, 3, 8, 8) and loss.dim() == 0
    codebook = vq.quantize.embedding.weight
    torch.testing.assert_close(quant.permute(0, 2, 3, 1).reshape(-1, 3), codebook[indices])
    dec, diff = vq(x)
    assert dec.shape == x.shape and diff.dim() == 0
    torch.testing.assert_close(vq.decode_code(indices.reshape(2, 8, 8)), vq.decode(quant))

    iface = VQModelInterface(**kwargs)
    iface.load_state_dict(vq.state_dict())
    h = iface.encode(x)
    torch.testing.assert_close(h, vq.encode_to_prequant(x))
    torch.testing.assert_close(iface.decode(h), vq.decode(quant))
    torch.testing.assert_close(iface.decode(h, force_not_quantize=True), vq.decode(h))


def test_identity_first_stage() -> None:
    x = torch.randn(2, 3)
    stage = IdentityFirstStage(vq_interface=True)
    assert stage.encode(x) is x and stage.decode(x) is x and stage(x) is x
    assert stage.quantize(x)[0] is x
    assert IdentityFirstStage().quantize(x) is x
