"""Tiny random-weight checkpoints and concept folders for tests of the real commands (built once per session)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.util import instantiate_from_config

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIGS = {
    "ldm": REPO / "tests" / "configs" / "ldm-tiny-finetune.yaml",
    "sd": REPO / "tests" / "configs" / "sd-tiny-finetune.yaml",
    "sd2": REPO / "tests" / "configs" / "sd2-tiny-finetune.yaml",
    "sdxl": REPO / "tests" / "configs" / "sdxl-tiny-finetune.yaml",
}


def make_tiny_checkpoint(family: str, out: Path, seed: int = 0) -> Path:
    """A ``{"state_dict": ...}`` checkpoint of the tiny config's model (no personalization) with random weights."""
    config = OmegaConf.load(TINY_CONFIGS[family])
    config.model.params.pop("personalization_config")
    torch.manual_seed(seed)
    model = instantiate_from_config(config.model)
    with torch.no_grad():
        for p in model.model.parameters():  # the UNet's output layer starts at zero; make it say something
            p.add_(0.02 * torch.randn_like(p))
    torch.save({"state_dict": model.state_dict(), "global_step": 0}, out)
    return out


def make_concept_folder(folder: Path, n: int = 3, size: int = 24, seed: int = 0) -> Path:
    """``n`` small RGB pictures of a coloured square on a plain background."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = np.full((size, size, 3), rng.integers(0, 255, 3), dtype=np.uint8)
        a, b = sorted(rng.integers(2, size - 2, 2))
        img[a : b + 2, a : b + 2] = (230, 120, 20)
        Image.fromarray(img).save(folder / f"img{i}.png")
    return folder


def train_briefly(model, datamodule, steps: int = 3) -> list[str]:
    """Train ``model`` ``steps`` steps with the real Trainer (CPU, no logger, no validation); the state-dict keys
    whose values changed."""
    import pytorch_lightning as pl

    model.learning_rate = 0.01
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         limit_val_batches=0, enable_model_summary=False)
    trainer.fit(model, datamodule)
    after = model.state_dict()
    return [k for k in before if not torch.equal(before[k], after[k])]
