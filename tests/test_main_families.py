"""The real ``main.py`` inverting words on tiny random-weight SD 2.x and SDXL models (CPU, a few steps)."""
import pytest
import torch

from test_main import main_args, newest_run, read_embedding
from tiny_models import TINY_CONFIGS, make_concept_folder, make_tiny_checkpoint


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {"root": root, "sd2": make_tiny_checkpoint("sd2", root / "sd2.ckpt"), "data": make_concept_folder(root / "cat_toy")}


def tiny_model(family, ckpt, **overrides):
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    config = OmegaConf.load(TINY_CONFIGS[family])
    config.model.params.ckpt_path = str(ckpt)
    for key, value in overrides.items():
        OmegaConf.update(config, key, value)
    return config, instantiate_from_config(config.model)


def test_sd2_inversion_writes_the_original_files(workspace, main_in_process):
    proc = main_in_process(main_args(workspace, "--init_word", "dog", "--max_steps", "4", family="sd2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = newest_run(workspace) / "checkpoints"
    assert {"embeddings.pt", "embeddings_gs-3.pt", "last.ckpt"} <= {p.name for p in ckpt.iterdir()}
    emb = read_embedding(ckpt / "embeddings_gs-3.pt")
    assert list(emb["string_to_param"]) == ["*"] and emb["string_to_param"]["*"].shape == (1, 32)  # the tower's width
    assert set(torch.load(ckpt / "last.ckpt", weights_only=True)["state_dict"]) <= {
        "embedding_manager.string_to_param_dict.*", "embedding_manager.initial_embeddings.*"}


def test_sd2_init_vector_is_the_init_words_token_embedding(workspace):
    """OpenCLIP: no position-0 embedding is added to the init vector (the v1 quirk of the original is not carried over)."""
    _, model = tiny_model("sd2", workspace["sd2"])
    embedder = model.cond_stage_model
    (token,) = embedder.content_token_ids("sculpture")
    init = model.embedding_manager.string_to_param_dict["*"]
    assert torch.equal(init.detach()[0], embedder.token_embedding.weight[token])
    # so "*" before training gives exactly the conditioning of the init word
    assert torch.equal(model.get_learned_conditioning(["a * photo"]), model.get_learned_conditioning(["a sculpture photo"]))


@pytest.mark.parametrize("family", ["sd2"])
def test_only_the_placeholder_vectors_change(workspace, family):
    import pytorch_lightning as pl

    from ldm.util import instantiate_from_config

    config, model = tiny_model(family, workspace[family], **{
        f"data.params.{split}.params.data_root": str(workspace["data"]) for split in ("train", "validation")})
    model.learning_rate = 0.01
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         limit_val_batches=0, enable_model_summary=False)
    trainer.fit(model, instantiate_from_config(config.data))
    after = model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == sorted(k for k in before if k.startswith("embedding_manager.") and "string_to_param" in k)
    assert changed
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("embedding_manager"))
