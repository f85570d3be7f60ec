"""Interrupt and resume exactly (ldm/train/resume.py): the generators' states, the loader that resumes mid-epoch with
the interrupted run's order and draws, the stop at the end of a step, and the whole of it on a tiny model in this
process (the shipped shapes model, in subprocesses with real signals, is in tests/test_main.py)."""
import io
import random

import numpy as np
import pytorch_lightning as pl
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset

from ldm.train.callbacks import EmbeddingRescue
from ldm.train.early_stopping import DVAREarlyStopping
from ldm.train.restarts import BestOfRestarts
from ldm.train.resume import ResumableDataLoader, StopAtStepEnd, StopRequests, capture_rng, restore_rng
from ldm.train.validation import DeterministicLoss
from ldm.util import instantiate_from_config
from test_validation import tiny  # noqa: F401  (a fixture)
from tiny_models import TINY_CONFIGS


def draw() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def through_a_file(state):
    """``state`` after torch.save and torch.load(weights_only=True), as a checkpoint carries it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_generators_come_back_where_they_were():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    draw()
    state = through_a_file(capture_rng())
    first = draw()
    draw()
    restore_rng(state)
    assert draw() == first


class Draws(Dataset):
    """Each item draws from all three global generators, as the template, the dual-template coin and the flip do."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.tensor([i, random.random(), np.random.rand(), torch.rand(1).item()], dtype=torch.float64)


def train_on(batches, steps):
    """What a training step would leave of each batch, with a draw of its own (the noise) after it."""
    return [torch.cat([next(batches), torch.rand(1, 4, dtype=torch.float64)]) for _ in range(steps)]


@pytest.mark.parametrize("served", [2, 4])  # in the middle of the epoch; at its end (10 items, batches of 3: 4 batches)
def test_a_resumed_loader_goes_on_with_the_same_order_and_draws(served):
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    whole = ResumableDataLoader(Draws(), batch_size=3, shuffle=True)
    epochs = iter(whole)
    expected = train_on(epochs, 4) + train_on(iter(whole), 4)

    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    interrupted = ResumableDataLoader(Draws(), batch_size=3, shuffle=True)
    done = train_on(iter(interrupted), served)
    state = through_a_file(interrupted.state_dict())
    torch.manual_seed(99), random.seed(99), np.random.seed(99)  # a new process: other states
    resumed = ResumableDataLoader(Draws(), batch_size=3, shuffle=True)
    resumed.load_state_dict(state)
    rest = train_on(iter(resumed), 4 - served) if served < 4 else []
    rest += train_on(iter(resumed), 4)
    assert all(torch.equal(a, b) for a, b in zip(expected, done + rest, strict=True))


def test_the_first_signal_waits_for_the_step_and_the_second_stops_at_once():
    requests = StopRequests()
    with pytest.raises(KeyboardInterrupt):
        requests(15, None)  # outside training: at once
    requests.deferring = True
    requests(2, None)
    assert requests.signum == 2
    with pytest.raises(KeyboardInterrupt):
        requests(15, None)


class RequestStopAt(pl.Callback):
    """Notes a stop request during step ``step``, as the signal handler would (``times=2``: Ctrl-C twice)."""

    def __init__(self, requests, step, times=1):
        self.requests, self.step, self.times = requests, step, times

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step - 1:
            for _ in range(self.times):
                self.requests(2, None)


def inversion(tiny, tmp_path, stop_at=None, ckpt_path=None, times=1):
    """12 steps of a tiny inversion with two starts, DVAR and the deterministic loss; a stop request at ``stop_at``."""
    pl.seed_everything(11, workers=True)
    config = OmegaConf.load(TINY_CONFIGS["ldm"])
    config.model.params.ckpt_path = str(tiny["ckpt"])
    config.data.params.train.params.update(data_root=str(tiny["data"]), repeats=5)  # 15 items: 8 batches an epoch
    config.data.params.pop("validation")
    model, data = instantiate_from_config(config.model), instantiate_from_config(config.data)
    model.learning_rate, model.embedding_provenance = 1e-2, {"seed": 11}  # main.py gives the run's record
    requests = StopRequests()
    callbacks = [DeterministicLoss(every_n_steps=2, batch_size=4), DVAREarlyStopping(window=4, threshold=0.3),
                 BestOfRestarts(candidates=2, noise=0.5, score_evals=1)]
    if stop_at:
        callbacks.append(RequestStopAt(requests, stop_at, times))
    callbacks += [EmbeddingRescue(str(tmp_path), "python main.py -r RUN -t"), StopAtStepEnd(requests, str(tmp_path), "python main.py -r RUN -t")]
    trainer = pl.Trainer(max_steps=12, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(model, data, ckpt_path=ckpt_path, weights_only=True)
    return trainer, model, callbacks


@pytest.fixture(scope="module")
def whole(tiny, tmp_path_factory):
    """The run never interrupted: its starts end at steps 4 and 10 (DVAR both times), and the run with the second."""
    trainer, model, callbacks = inversion(tiny, tmp_path_factory.mktemp("whole"))
    assert [step for _, step, _ in callbacks[2].results] == [4, 10] and trainer.global_step == 10
    return model.embedding_manager.string_to_param_dict["*"].detach().clone(), list(callbacks[0].history)


# in start 1; at its DVAR stop; at the end of an epoch (in start 2); in the middle of one (start 2)
@pytest.mark.parametrize("stop_at", [3, 4, 8, 9])
def test_a_stopped_inversion_resumes_to_the_same_vectors(tiny, whole, tmp_path, stop_at):
    expected, history = whole
    with pytest.raises(SystemExit):  # Lightning ends a KeyboardInterrupt with exit status 1
        inversion(tiny, tmp_path, stop_at=stop_at)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == stop_at
    trainer, model, callbacks = inversion(tiny, tmp_path, ckpt_path=str(tmp_path / "last.ckpt"))
    assert trainer.global_step == 10
    assert torch.equal(model.embedding_manager.string_to_param_dict["*"], expected)
    assert callbacks[0].history == history


def test_a_second_ctrl_c_stops_in_the_step_and_says_where_r_goes_back_to(tiny, tmp_path, caplog):
    with pytest.raises(SystemExit):
        inversion(tiny, tmp_path, stop_at=3)
    with pytest.raises(SystemExit), caplog.at_level("WARNING"):
        inversion(tiny, tmp_path, stop_at=6, ckpt_path=str(tmp_path / "last.ckpt"), times=2)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 3  # not a half step
    assert torch.load(tmp_path / "embeddings.pt", weights_only=True)["step"] == 4  # the vectors after 5 steps
    assert "last.ckpt is the checkpoint of step 3: python main.py -r RUN -t resumes from step 3 (the 2 steps" in caplog.text
