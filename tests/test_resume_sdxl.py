"""Resuming on SDXL (tests/configs/sdxl-tiny-finetune.yaml, random weights): an inversion with random crops, two
starts and DVAR, stopped at a step end and resumed from its last.ckpt, ends with BOTH halves of the uninterrupted
run's vectors, bit for bit (the crops are drawn from the run's one generator stream, so the resumed run draws the
same ones); main.py's ``-r`` and ``--embedding_manager_ckpt`` restore both halves (the LDM pattern is in
tests/test_resume.py)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.train.callbacks import EmbeddingRescue
from ldm.train.early_stopping import DVAREarlyStopping
from ldm.train.restarts import BestOfRestarts, vector_sets
from ldm.train.resume import StopAtStepEnd, StopRequests
from ldm.train.validation import DeterministicLoss
from ldm.util import instantiate_from_config
from test_main import read_embedding
from test_resume import RequestStopAt
from tiny_models import TINY_CONFIGS, make_tiny_checkpoint


class CropRecorder(pl.Callback):
    """The crops of every training batch, in order."""

    def __init__(self):
        self.crops = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.crops.append(batch["crop"].tolist())


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """A tiny SDXL model file and three wide pictures (16 x 28: a 16-px square has 13 places)."""
    root = tmp_path_factory.mktemp("sdxl-resume")
    data = root / "wide"
    data.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (16, 28, 3), dtype=np.uint8)).save(data / f"{i}.png")
    return {"ckpt": make_tiny_checkpoint("sdxl", root / "sdxl.ckpt"), "data": data}


def config_of(sdxl):
    config = OmegaConf.load(TINY_CONFIGS["sdxl"])
    config.model.params.ckpt_path = str(sdxl["ckpt"])
    config.model.params.personalization_config.params.num_vectors_per_token = 2
    config.data.params.train.params.update(data_root=str(sdxl["data"]), repeats=5, random_crop=True)  # 15 items
    config.data.params.pop("validation")
    return config


def inversion(sdxl, tmp_path, stop_at=None, ckpt_path=None):
    """10 steps of a tiny SDXL inversion (two starts, DVAR, the deterministic loss); a stop request at ``stop_at``."""
    pl.seed_everything(11, workers=True)
    config = config_of(sdxl)
    model, data = instantiate_from_config(config.model), instantiate_from_config(config.data)
    model.learning_rate, model.embedding_provenance = 1e-2, {"seed": 11}
    requests, crops = StopRequests(), CropRecorder()
    callbacks = [DeterministicLoss(every_n_steps=2, batch_size=4), DVAREarlyStopping(window=4, threshold=0.3),
                 BestOfRestarts(candidates=2, noise=0.5, score_evals=1), crops]
    if stop_at:
        callbacks.append(RequestStopAt(requests, stop_at))
    callbacks += [EmbeddingRescue(str(tmp_path), "python main.py -r RUN -t"), StopAtStepEnd(requests, str(tmp_path), "python main.py -r RUN -t")]
    trainer = pl.Trainer(max_steps=10, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(model, data, ckpt_path=ckpt_path, weights_only=True)
    return trainer, model, crops


def halves_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, (v, _) in vector_sets(model.embedding_manager).items()}


@pytest.fixture(scope="module")
def whole(sdxl, tmp_path_factory):
    trainer, model, crops = inversion(sdxl, tmp_path_factory.mktemp("whole"))
    vectors = halves_of(model)
    restarts = next(cb for cb in trainer.callbacks if isinstance(cb, BestOfRestarts))
    assert [step for _, step, _ in restarts.results] == [4, 8]  # DVAR ends both starts
    assert set(vectors) == {"clip_l/*", "clip_g/*"} and trainer.global_step == 8
    assert len({tuple(c) for batch in crops.crops for c in batch}) > 3  # crops at several places
    return vectors, crops.crops


@pytest.mark.parametrize("stop_at", [3, 6])  # in the first start; in the second
def test_a_stopped_sdxl_inversion_with_random_crops_resumes_to_the_same_vectors(sdxl, whole, tmp_path, stop_at):
    expected, crops = whole
    with pytest.raises(SystemExit):
        inversion(sdxl, tmp_path, stop_at=stop_at)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == stop_at
    trainer, model, resumed = inversion(sdxl, tmp_path, ckpt_path=str(tmp_path / "last.ckpt"))
    assert trainer.global_step == 8
    got = halves_of(model)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert resumed.crops == crops[stop_at:]


def test_restarts_keep_and_restart_both_halves(sdxl, tmp_path):
    """Each start's record holds both halves; the kept start's two halves are back in the model."""
    _, model, _ = inversion(sdxl, tmp_path)
    restarts = next(cb for cb in model.trainer.callbacks if isinstance(cb, BestOfRestarts))
    assert len(restarts.results) == 2
    first, second = (vectors for _, _, vectors in restarts.results)
    assert set(first) == {"clip_l/*", "clip_g/*"}
    assert not any(torch.equal(first[k], second[k]) for k in first)  # the second start moved both halves
    best = min(restarts.results, key=lambda r: r[0])[2]
    now = halves_of(model)
    assert all(torch.equal(now[k], best[k]) for k in best)


def main_args(sdxl, root, *extra):
    return ["--base", str(TINY_CONFIGS["sdxl"]), "-t", "--actual_resume", str(sdxl["ckpt"]), "-n", "run", "--data_root",
            str(sdxl["data"]), "-l", str(root), "--init_word", "dog", "lightning.callbacks.image_logger.params.disabled=true",
            "data.params.train.params.random_crop=true", "data.params.validation.params.random_crop=true", *extra]


def test_main_r_and_embedding_manager_ckpt_restore_both_halves(sdxl, tmp_path, main_in_process):
    """main.py: a run of 4 steps resumed with -r to 6 has the vectors of a run of 6; a new run started with
    --embedding_manager_ckpt from the first run's file starts with both of its halves."""
    straight = main_in_process(main_args(sdxl, tmp_path / "straight", "--max_steps", "6", "--seed", "5"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    # each call a new run (main.py notes its run for its DDP ranks); not monkeypatch.delenv: its teardown would put the
    # noted run back after main_in_process restored the environment, and later subprocesses would write into it
    os.environ.pop("TI_RUN_DIR", None)
    first = main_in_process(main_args(sdxl, tmp_path / "resumed", "--max_steps", "4", "--seed", "5"))
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = (tmp_path / "resumed").iterdir()
    os.environ.pop("TI_RUN_DIR", None)
    again = main_in_process(["-r", str(run), "-t", "--actual_resume", str(sdxl["ckpt"]), "--data_root", str(sdxl["data"]),
                             "--max_steps", "6"])
    assert again.returncode == 0, again.stderr[-3000:]
    (straight_run,) = (tmp_path / "straight").iterdir()
    want = read_embedding(straight_run / "checkpoints" / "embeddings.pt")["string_to_param"]
    got = read_embedding(run / "checkpoints" / "embeddings.pt")["string_to_param"]
    assert set(got) == {"clip_l", "clip_g"}
    assert all(torch.equal(got[h]["*"], want[h]["*"]) for h in ("clip_l", "clip_g"))

    start = straight_run / "checkpoints" / "embeddings.pt"
    config = config_of(sdxl)
    config.model.params.personalization_config.params.update(num_vectors_per_token=1, embedding_manager_ckpt=str(start))
    model = instantiate_from_config(config.model)
    loaded = halves_of(model)
    assert all(torch.equal(loaded[f"{h}/*"], want[h]["*"]) for h in ("clip_l", "clip_g"))
    os.environ.pop("TI_RUN_DIR", None)
    cont = main_in_process(main_args(sdxl, tmp_path / "from_file", "--max_steps", "1", "--embedding_manager_ckpt", str(start)))
    assert cont.returncode == 0, cont.stderr[-3000:]


def test_the_latent_cache_keeps_one_latent_per_crop(sdxl):
    """With random crops the cache key holds the crop: each cached latent is the encoding of its own square."""
    from torch.utils.data import default_collate

    from ldm.models.diffusion.training import latent_cache_keys

    plain = {"index": torch.tensor([2, 0]), "flip": torch.tensor([True, False])}
    assert latent_cache_keys(plain) == [(2, True), (0, False)]
    assert latent_cache_keys({**plain, "crop": torch.tensor([[0, 1], [0, 12]])}) == [(2, True, 0, 1), (0, False, 0, 12)]
    config = config_of(sdxl)
    model, data = instantiate_from_config(config.model), instantiate_from_config(config.data.params.train)
    torch.manual_seed(1)
    batch = default_collate([data[0] for _ in range(8)])
    x = batch["image"].permute(0, 3, 1, 2).float()
    model.encode_latents(batch, x)
    keys = latent_cache_keys(batch)
    assert len(model.latent_cache) == len(set(keys)) > 2
    for j, key in enumerate(keys):
        with torch.no_grad():
            own = model.encode_first_stage(x[j : j + 1]).mean[0]
        assert torch.equal(model.latent_cache[key][0], own)
