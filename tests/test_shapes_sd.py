"""The training configs of the shapes SD models: each builds with its family's classes and takes a training step in
which the UNet and the text encoders (trained from scratch there, frozen everywhere else) all learn."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import default_collate

from paths import REPO
from ldm.modules.encoders import sdxl
from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
from ldm.util import instantiate_from_config

CONFIGS = REPO / "configs" / "shapes"
FAMILIES = {
    "shapes-sd1-train.yaml": (FrozenCLIPEmbedder,),
    "shapes-sd2-train.yaml": (FrozenOpenCLIPEmbedder,),
    "shapes-sdxl-train.yaml": (sdxl.FrozenCLIPEmbedder, sdxl.FrozenOpenCLIPEmbedder2),
}


def _model_and_batch(name: str, n: int = 2):
    config = OmegaConf.load(CONFIGS / name)
    vae = config.model.params.first_stage_config.params
    if not (REPO / str(vae.ckpt_path)).is_file():
        vae.ckpt_path = None  # the autoencoder's weights are not shipped yet: random ones build the same model
    model = instantiate_from_config(config.model)
    data = instantiate_from_config(config.data.params.train)
    return model, default_collate([data[i] for i in range(n)])


def _text_encoders(model) -> list:
    if hasattr(model, "conditioner"):
        return [e for _, e in model.conditioner.text_embedders()]
    return [model.cond_stage_model]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_training_config_builds_and_a_step_trains_unet_and_text_encoders(name):
    torch.manual_seed(0)
    model, batch = _model_and_batch(name)
    encoders = _text_encoders(model)
    assert tuple(type(e) for e in encoders) == FAMILIES[name] and model.cond_stage_trainable
    trainable = {id(p) for p in model.trainable_model_parameters()}
    for encoder in encoders:
        assert {id(p) for p in encoder.parameters()} <= trainable
        assert all(p.requires_grad for p in encoder.parameters())
    assert not any(p.requires_grad for p in model.first_stage_model.parameters())
    optimizer = torch.optim.AdamW(model.trainable_model_parameters(), lr=1e-3)
    # the UNet's output convolution and its transformers' proj_out start at zero (as the original's): the first step
    # trains only the former, the second the latter too, and from the third the gradient reaches the text
    for _ in range(3):
        optimizer.zero_grad()
        loss, _ = model.shared_step(batch)
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    for encoder in encoders:
        assert encoder.token_embedding.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.model.parameters())
    assert len(model.latent_cache) == 2  # each picture encoded once, kept for its next visits


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_main_trains_and_resumes_the_config(tmp_path, family):
    """``main.py`` trains shapes-sd1 and shapes-sdxl (their learning-rate schedules; SDXL's fused optimizer) for two
    steps, and ``-r`` continues the run."""
    import os
    import subprocess
    import sys

    small = ["data.params.batch_size=2", "lightning.callbacks.image_logger.params.disabled=true",
             "lightning.modelcheckpoint.params.every_n_train_steps=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    first = [sys.executable, "main.py", "--base", str(CONFIGS / f"shapes-{family}-train.yaml"), "-t", "-n", family,
             "--max_steps", "2", "-l", str(tmp_path), *small]
    done = subprocess.run(first, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Done. Checkpoint:" in done.stderr + done.stdout  # not the inversion's "Embedding:" line
    (run,) = list(tmp_path.iterdir())
    again = [sys.executable, "main.py", "-r", str(run), "-t", "--max_steps", "4", *small]
    done = subprocess.run(again, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Restored all states" in done.stderr + done.stdout
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 4


def test_the_sdxl_config_trains_with_the_fused_optimizer():
    """fused_optimizer: true (the speed note in shapes-sdxl-train.yaml); the other configs keep the for-each AdamW."""
    for name, fused in (("shapes-sdxl-train.yaml", True), ("shapes-sd1-train.yaml", None)):
        model, _ = _model_and_batch(name)
        model.learning_rate = 1e-3
        (optimizer,), _ = model.configure_optimizers()
        assert optimizer.defaults["fused"] is fused
