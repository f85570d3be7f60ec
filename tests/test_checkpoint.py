"""ldm/checkpoint.py: a file that is not model weights says what it is and which flag takes it."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from paths import REPO
from ldm.checkpoint import CheckpointError, load_state_dict, looks_like_embedding
from ldm.modules.embedding_formats import save_diffusers, save_original

SHIPPED = REPO / "models" / "shapes" / "embeddings" / "orange_cross_4_vectors.pt"


def test_an_embedding_file_given_as_the_model_says_so():
    with pytest.raises(CheckpointError) as err:
        load_state_dict(SHIPPED, what="--actual_resume / ckpt_path")
    assert str(err.value) == (
        f"--actual_resume: '{SHIPPED}' is an embedding file, not a model checkpoint; pass it as --embedding_manager_ckpt, "
        "and the model as --actual_resume"
    )


@pytest.mark.parametrize("layout", ["original", "diffusers", "kohya", "flattened"])
def test_embedding_layouts_are_recognised(tmp_path, layout):
    vector = torch.randn(2, 32)
    path = tmp_path / ("e.safetensors" if layout in ("diffusers", "flattened") else "e.pt")
    if layout == "original":
        save_original(path, {"*": vector}, {"*": 265})
    elif layout == "diffusers":
        save_diffusers(path, "<cat-toy>", vector)
    elif layout == "kohya":
        torch.save({"emb_params": vector}, path)
    else:
        save_file({"string_to_param.*": vector, "string_to_token.*": torch.tensor(265)}, str(path))
    with pytest.raises(CheckpointError, match="is an embedding file.*pass it as --embedding_path, and the model as --ckpt"):
        load_state_dict(path, what="--ckpt")


def test_model_weights_are_not_taken_for_an_embedding(tmp_path):
    weights = {"model.diffusion_model.out.0.weight": torch.randn(4), "cond_stage_model.x.weight": torch.randn(2, 2)}
    assert not looks_like_embedding({"state_dict": weights}) and not looks_like_embedding(weights)
    torch.save({"state_dict": weights}, tmp_path / "m.ckpt")
    assert set(load_state_dict(tmp_path / "m.ckpt")) == set(weights)
    torch.save({"state_dict": {}, "global_step": 3}, tmp_path / "empty.ckpt")
    with pytest.raises(CheckpointError, match="holds no weights"):
        load_state_dict(tmp_path / "empty.ckpt")


def test_numpy_scalars_of_older_training_checkpoints_load_for_resuming(tmp_path):
    import numpy as np

    from ldm.checkpoint import numpy_scalars_allowed

    path = tmp_path / "last.ckpt"
    torch.save({"lr_schedulers": [{"_last_lr": [np.float64(1.5e-3)]}], "step": np.int64(500)}, path)
    with pytest.raises(Exception, match="weights_only|Weights only"):
        torch.load(path, weights_only=True)
    with numpy_scalars_allowed():
        loaded = torch.load(path, weights_only=True)
    assert loaded["lr_schedulers"][0]["_last_lr"][0] == pytest.approx(1.5e-3) and loaded["step"] == 500
