"""DVAR early stopping: a loss that fell and went flat stops the run, a falling one does not; a stopped run of the
real ``main.py`` exits 0 with its embedding written."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from paths import REPO
from ldm.train.early_stopping import dvar_ratio, dvar_should_stop
from tiny_models import TINY_CONFIGS, make_concept_folder, make_tiny_checkpoint

WINDOW, THRESHOLD = 31, 0.15


def noisy(values, seed=0, scale=1e-3):
    return list(np.asarray(values) + scale * np.random.default_rng(seed).standard_normal(len(values)))


def first_stop(values):
    return next((n for n in range(1, len(values) + 1) if dvar_should_stop(values[:n], WINDOW, THRESHOLD)), None)


def test_a_loss_that_fell_and_went_flat_stops_soon_after():
    fall = np.linspace(0.04, 0.028, 30)
    values = noisy(list(fall) + [0.028] * 120)
    stop = first_stop(values)
    assert stop is not None and 30 + WINDOW // 2 <= stop <= 30 + 2 * WINDOW


def test_a_falling_loss_does_not_stop():
    values = noisy(list(0.04 * np.exp(-np.arange(60) / 200.0)))  # still falling at the end of the run
    assert first_stop(values) is None
    assert not dvar_should_stop(values[:WINDOW], WINDOW, THRESHOLD)  # never before a full window


def test_ratio_of_variances():
    assert dvar_ratio([1.0, 2.0, 3.0], 3) is None
    assert dvar_ratio([0.0, 4.0, 1.0, 1.0], 2) == 0.0
    assert dvar_ratio([2.0, 2.0, 2.0], 2) == 0.0  # nothing moved at all


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("dvar")
    return {"root": root, "ckpt": make_tiny_checkpoint("ldm", root / "ldm.ckpt"), "data": make_concept_folder(root / "toy")}


def test_a_stopped_run_writes_its_embedding_and_exits_0(workspace):
    # a window of 2 steps and a threshold above any ratio: it stops at the first check after the window
    cmd = [sys.executable, str(REPO / "main.py"), "--base", str(TINY_CONFIGS["ldm"]), "-t", "--actual_resume", str(workspace["ckpt"]),
           "-n", "run", "--data_root", str(workspace["data"]), "-l", str(workspace["root"] / "logs"), "--max_steps", "40",
           "lightning.callbacks.deterministic_loss.target=ldm.train.validation.DeterministicLoss",
           "lightning.callbacks.deterministic_loss.params.every_n_steps=1",
           "lightning.callbacks.early_stopping.target=ldm.train.early_stopping.DVAREarlyStopping",
           "lightning.callbacks.early_stopping.params.window=2", "lightning.callbacks.early_stopping.params.threshold=2.0",
           "lightning.callbacks.image_logger.params.batch_frequency=100"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "DVAR early stopping at step" in line]
    assert len(lines) == 1 and "at step 2:" in lines[0], lines
    run = next((workspace["root"] / "logs").iterdir())
    emb = torch.load(run / "checkpoints" / "embeddings.pt", weights_only=True)
    assert emb["step"] == 1  # numbered as the original: the index of the last batch trained (2 steps)
    assert torch.isfinite(emb["string_to_param"]["*"]).all()
