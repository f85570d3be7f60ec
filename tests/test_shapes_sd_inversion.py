"""The inference and inversion configs of the shapes SD models (SD v1, 2.x, SDXL; configs/shapes/shapes-<family>-*):
each builds its family's classes with the text encoders frozen; an inversion with each finetune config, through
main.py and through the Trainer, learns the placeholder's vectors (both halves on SDXL) and nothing else; the
family readers (of configs, checkpoints and embedding files) name each family. The models have random weights: what is tested is the code path, not the result."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from paths import REPO
from ldm.diffusers_export import model_family
from ldm.inference import learns_words_without_config
from ldm.models.diffusion.ddpm import checkpoint_family
from ldm.modules.embedding_manager import EmbeddingManager
from ldm.modules.embedding_formats import read_embeddings
from ldm.modules.embedding_manager_sdxl import SDXLEmbeddingManager
from ldm.util import instantiate_from_config
from test_main import read_embedding
from tiny_models import train_briefly

CONFIGS = REPO / "configs" / "shapes"
CONCEPT = REPO / "models" / "shapes" / "concepts" / "orange_cross"  # 32x32 pictures with their .txt captions
FAMILIES = {  # family: (model_family's name, checkpoint_family's and the embedding file's family begin with, manager class)
    "sd1": ("sd1", "SD v1", EmbeddingManager),
    "sd2": ("sd2", "SD 2.x", EmbeddingManager),
    "sdxl": ("sdxl", "SDXL", SDXLEmbeddingManager),
}


def text_encoders(model) -> list:
    if hasattr(model, "conditioner"):
        return [e for _, e in model.conditioner.text_embedders()]
    return [model.cond_stage_model]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Per family, a random-weight model file of the inference config (the UNet made to say something), as
    scripts/export_ema_weights.py writes them."""
    root = tmp_path_factory.mktemp("shapes-sd")
    out = {}
    for family in FAMILIES:
        config = OmegaConf.load(CONFIGS / f"shapes-{family}-inference.yaml")
        config.model.params.pop("personalization_config")
        torch.manual_seed(0)
        model = instantiate_from_config(config.model)
        with torch.no_grad():
            for p in model.model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        out[family] = root / f"{family}.ckpt"
        torch.save({"state_dict": model.state_dict(), "global_step": 0}, out[family])
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kind", ["inference", "finetune"])
def test_config_builds_with_frozen_text_encoders_and_names_its_family(family, kind):
    name, checkpoint_name, manager = FAMILIES[family]
    config = OmegaConf.load(CONFIGS / f"shapes-{family}-{kind}.yaml")
    assert model_family(config) == name
    assert learns_words_without_config(config) == (family != "sd1")  # stable_txt2img adds a manager for these
    model = instantiate_from_config(config.model)
    assert checkpoint_family(model.state_dict()).startswith(checkpoint_name)
    assert type(model.embedding_manager) is manager and not model.use_ema
    encoders = text_encoders(model)
    assert len(encoders) == (2 if family == "sdxl" else 1)
    assert not any(p.requires_grad for e in encoders for p in e.parameters())
    assert not any(p.requires_grad for p in model.model.parameters())
    widths = [int(t.shape[-1]) for t in model.embedding_manager.string_to_param_dict.values()]
    assert widths and set(widths) == {64}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_inversion_learns_only_the_placeholder_vectors(family, checkpoints):
    """The finetune config with the Trainer: the placeholder's vectors change (both halves on SDXL), no weight of
    the model does, and the context regulariser (on by default) is part of the loss."""
    config = OmegaConf.load(CONFIGS / f"shapes-{family}-finetune.yaml")
    config.model.params.ckpt_path = str(checkpoints[family])
    config.data.params.train.params.data_root = str(CONCEPT)
    config.data.params.batch_size = 2
    torch.manual_seed(0)
    model = instantiate_from_config(config.model)
    assert model.context_reg_weight == 0.03
    changed = sorted(train_briefly(model, instantiate_from_config(config.data)))
    halves = ("halves.clip_l.", "halves.clip_g.") if family == "sdxl" else ("",)
    assert changed == sorted(f"embedding_manager.{h}string_to_param_dict.*" for h in halves)
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("embedding_manager"))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_main_inverts_with_each_finetune_config(family, checkpoints, tmp_path, main_in_process):
    """main.py with the finetune config as shipped (its callbacks: deterministic loss, DVAR, two starts), 4 steps."""
    proc = main_in_process([
        "--base", str(CONFIGS / f"shapes-{family}-finetune.yaml"), "-t", "--actual_resume", str(checkpoints[family]),
        "-n", family, "--data_root", str(CONCEPT), "--init_word", "shape", "-l", str(tmp_path), "--max_steps", "4",
        "lightning.callbacks.image_logger.params.disabled=true", "lightning.callbacks.deterministic_loss.params.every_n_steps=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = tmp_path.iterdir()
    emb = read_embedding(run / "checkpoints" / "embeddings.pt")
    vectors = emb["string_to_param"]
    if family == "sdxl":
        assert set(vectors) == {"clip_l", "clip_g"}
        vectors = {f"{half}/{p}": v for half, d in vectors.items() for p, v in d.items()}
        assert (run / "checkpoints" / "embeddings.safetensors").is_file()
    assert vectors and all(v.shape == (4, 64) and torch.isfinite(v).all() for v in vectors.values())
    assert read_embeddings(run / "checkpoints" / "embeddings.pt").family.startswith(FAMILIES[family][1])
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all(k.startswith("embedding_manager.") for k in state)
