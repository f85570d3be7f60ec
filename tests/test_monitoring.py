"""Seeing a run: CSV always, TensorBoard when installed; a learned vector nearest to a function word is warned about."""
import logging
from types import SimpleNamespace

import pytest
import torch

from ldm.train import monitoring
from ldm.train.monitoring import EmbeddingMonitor, run_loggers
from test_validation import build, tiny  # noqa: F401  (tiny is a fixture)


def set_vector_to_word(model, word):
    embedder = model.cond_stage_model
    row = embedder.token_embedding.weight[embedder.content_token_ids(word)[0]].detach()
    with torch.no_grad():
        model.embedding_manager.string_to_param_dict["*"].copy_(row[None])


@pytest.mark.parametrize("word,warned", [("on", True), ("the", True), ("dog", False)])
def test_warns_when_a_vector_ends_nearest_to_a_function_word(tiny, caplog, word, warned):
    model, _ = build(tiny)
    set_vector_to_word(model, word)
    monitor = EmbeddingMonitor()
    with caplog.at_level(logging.INFO, logger="ldm.train.monitoring"):
        monitor.on_train_end(SimpleNamespace(is_global_zero=True), model)
    assert monitor.final["*"][0][0] == (word, pytest.approx(1.0))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert bool(warnings) == warned
    if warned:
        assert f"function word '{word}'" in warnings[0] and "--seed" in warnings[0]


def test_csv_alone_without_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setattr(monitoring, "tensorboard_available", lambda: False)
    loggers = run_loggers(tmp_path)
    assert [type(x).__name__ for x in loggers] == ["CSVLogger"]


def test_tensorboard_next_to_csv_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    loggers = run_loggers(tmp_path)
    assert [type(x).__name__ for x in loggers] == ["CSVLogger", "TensorBoardLogger"]
    assert loggers[1].save_dir == str(tmp_path)
