"""The deterministic validation loss: the same number for the same vectors, and no effect on the training stream."""
import pytorch_lightning as pl
import pytest
import torch
from omegaconf import OmegaConf

from ldm.train.validation import DeterministicLoss, build_fixed_batch, deterministic_loss, spread_timesteps
from ldm.util import instantiate_from_config
from tiny_models import TINY_CONFIGS, make_concept_folder, make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    return {"ckpt": make_tiny_checkpoint("ldm", root / "ldm.ckpt"), "data": make_concept_folder(root / "toy")}


def build(tiny):
    config = OmegaConf.load(TINY_CONFIGS["ldm"])
    config.model.params.ckpt_path = str(tiny["ckpt"])
    config.data.params.train.params.data_root = str(tiny["data"])
    config.data.params.pop("validation")
    model = instantiate_from_config(config.model)
    model.learning_rate = 1e-2
    data = instantiate_from_config(config.data)
    data.setup()
    return model, data


class StepRecorder(pl.Callback):
    """Each training step's loss and the vectors after it."""

    def __init__(self):
        self.losses, self.vectors = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.vectors.append(pl_module.embedding_manager.string_to_param_dict["*"].detach().clone())


def train(tiny, callbacks, steps=10):
    pl.seed_everything(7, workers=True)
    model, data = build(tiny)
    recorder = StepRecorder()
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[*callbacks, recorder])
    trainer.fit(model, data)
    return recorder


def test_spread_timesteps_cover_the_schedule():
    t = spread_timesteps(8, 1000)
    assert t.tolist() == [62, 187, 312, 437, 562, 687, 812, 937]


def test_loss_is_bit_identical_across_calls_and_leaves_the_rng_alone(tiny):
    model, data = build(tiny)
    batch = build_fixed_batch(model, data.datasets["train"], 6, seed=0)
    assert len(set(batch.captions)) > 1 and batch.timesteps.unique().numel() == 6
    torch.manual_seed(3)
    before = torch.get_rng_state()
    first, second = deterministic_loss(model, batch), deterministic_loss(model, batch)
    assert torch.equal(torch.get_rng_state(), before)
    assert first == second and first > 0
    again = build_fixed_batch(model, data.datasets["train"], 6, seed=0)
    assert torch.equal(again.noise, batch.noise) and torch.equal(again.latents, batch.latents)
    assert deterministic_loss(model, again) == first
    with torch.no_grad():
        vectors = model.embedding_manager.string_to_param_dict["*"]
        vectors.add_(torch.randn(vectors.shape, generator=torch.Generator().manual_seed(0)))  # not a constant: LayerNorm
    assert deterministic_loss(model, batch) != first  # it does see the learned vectors


def test_training_steps_are_the_same_with_and_without_it(tiny):
    plain = train(tiny, [])
    watcher = DeterministicLoss(every_n_steps=1, batch_size=4)
    watched = train(tiny, [watcher])
    assert len(plain.losses) == 10 and plain.losses == watched.losses
    assert all(torch.equal(a, b) for a, b in zip(plain.vectors, watched.vectors))
    assert [s for s, _ in watcher.history] == list(range(11))  # before the first step, then after each
    assert len({v for _, v in watcher.history}) > 1
