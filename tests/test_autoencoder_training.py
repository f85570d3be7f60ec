"""Training the KL autoencoder (the shapes models' first stage): the reconstruction + KL loss against a hand
computation, the optimizer's parameters, a few Lightning steps on shapes pictures, the refusal of an inference
config, and scripts/evaluate_vae.py on a trained-for-seconds model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from paths import REPO, load_script
from ldm.data.shapes import ShapesDataset
from ldm.errors import ConfigError
from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.losses import ReconstructionKLLoss
from ldm.util import instantiate_from_config

TINY_DDCONFIG = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                     num_res_blocks=1, attn_resolutions=[], dropout=0.0)
LOSS = {"target": "ldm.modules.losses.ReconstructionKLLoss", "params": {"kl_weight": 1.0e-3}}


def test_loss_is_the_originals_without_lpips_and_discriminator():
    torch.manual_seed(0)
    x, rec = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    moments = torch.randn(3, 8, 2, 2)
    posterior = DiagonalGaussianDistribution(moments)
    loss, log = ReconstructionKLLoss(kl_weight=0.5, logvar_init=1.0)(x, rec, posterior)
    mean, logvar = moments[:, :4], moments[:, 4:]
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum() / 3
    nll = ((x - rec).abs() / torch.e + 1.0).sum() / 3
    torch.testing.assert_close(loss, nll + 0.5 * kl)
    torch.testing.assert_close(log["train/kl_loss"], kl)
    torch.testing.assert_close(log["train/rec_loss"], (x - rec).abs().mean())
    with pytest.raises(ValueError, match="kl_weight"):
        ReconstructionKLLoss(kl_weight=-1.0)


def test_optimizer_holds_the_autoencoder_not_the_loss_logvar():
    model = AutoencoderKL(TINY_DDCONFIG, LOSS, embed_dim=4)
    model.learning_rate = 1e-3
    opt = model.configure_optimizers()
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters()}  # logvar is a buffer, as it is never trained in the original
    assert "loss.logvar" in model.state_dict()
    assert opt.param_groups[0]["betas"] == (0.5, 0.9)


def test_inference_config_refuses_to_train():
    model = AutoencoderKL(TINY_DDCONFIG, {"target": "torch.nn.Identity"}, embed_dim=4)
    model.learning_rate = 1e-3
    with pytest.raises(ConfigError, match="ReconstructionKLLoss"):
        model.configure_optimizers()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny autoencoder after 30 Lightning steps on 8 shapes pictures, its first loss and its checkpoint."""
    torch.manual_seed(0)
    model = AutoencoderKL(TINY_DDCONFIG, LOSS, embed_dim=4)
    model.learning_rate = 2e-3
    data = ShapesDataset(length=8, seed=5)
    batch = {"image": torch.tensor(np.stack([data[i]["image"] for i in range(8)]))}
    with torch.no_grad():
        first = float(model.loss(model.get_input(batch, "image"), *model(model.get_input(batch, "image"), sample_posterior=False))[0])
    root = tmp_path_factory.mktemp("vae")
    trainer = pl.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root))
    trainer.fit(model, DataLoader(data, batch_size=8))
    trainer.save_checkpoint(root / "last.ckpt")
    with torch.no_grad():
        after = float(model.loss(model.get_input(batch, "image"), *model(model.get_input(batch, "image"), sample_posterior=False))[0])
    return model, first, after, root / "last.ckpt"


def test_training_steps_lower_the_reconstruction_loss(trained):
    _, first, after, _ = trained
    assert after < 0.85 * first


def test_log_images_gives_the_three_grids(trained):
    model = trained[0]
    data = ShapesDataset(length=4, seed=6)
    batch = {"image": torch.tensor(np.stack([data[i]["image"] for i in range(4)]))}
    images = model.log_images(batch, N=2)
    assert set(images) == {"inputs", "reconstructions", "samples"}
    assert all(v.shape == (2, 3, 32, 32) for v in images.values())


def test_evaluate_vae_reports_errors_accuracy_and_scale(trained, tmp_path):
    config = tmp_path / "vae.yaml"
    OmegaConf.save({"model": {"target": "ldm.models.autoencoder.AutoencoderKL",
                              "params": {"embed_dim": 4, "ddconfig": TINY_DDCONFIG, "lossconfig": LOSS}}}, config)
    out = tmp_path / "eval.json"
    load_script("evaluate_vae").main(["--config", str(config), "--ckpt", str(trained[3]), "--n", "8",
                                      "--n_held_out", "4", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["all"]["n"] == 8 and result["orange_cross"]["n"] == 4
    assert result["all"]["latent_shape"] == [4, 16, 16]
    assert result["all"]["judge_on_originals"]["all"] == 1.0
    assert 0 < result["all"]["mean_abs_error_0_255"] < 255
    assert result["scale_factor"] == pytest.approx(1.0 / result["all"]["latent_std"])


def test_shipped_training_config_builds_and_takes_a_step():
    config = OmegaConf.load(REPO / "configs" / "shapes" / "shapes-vae-train.yaml")
    model = instantiate_from_config(config.model)
    data = instantiate_from_config(config.data.params.train)
    x = model.get_input({"image": torch.tensor(np.stack([data[i]["image"] for i in range(2)]))}, "image")
    rec, posterior = model(x)
    assert posterior.mode().shape == (2, 4, 8, 8)
    loss, _ = model.loss(x, rec, posterior)
    loss.backward()
    assert all(p.grad is not None for p in model.autoencoder_parameters())

