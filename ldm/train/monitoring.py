"""Seeing an inversion while it runs: TensorBoard next to the CSV log, the learned vectors' norms and nearest words,
and a warning when a vector ends nearest to a function word of the captions.

TensorBoard is optional (``pip install -e ".[tensorboard]"``): without it, runs log to CSV alone, as before.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from ldm.modules.nearest_words import FUNCTION_WORDS, nearest_words
from ldm.train.validation import log_now

logger = logging.getLogger(__name__)


def tensorboard_available() -> bool:
    """Whether Lightning's TensorBoard logger can write (it needs ``tensorboard`` or ``tensorboardX``)."""
    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


def run_loggers(logdir: str | Path) -> list[pl.loggers.Logger]:
    """CSV under ``<run>/csv`` (first: the loss curve reads it) and, when installed, TensorBoard under ``<run>/tensorboard``."""
    loggers: list[pl.loggers.Logger] = [pl.loggers.CSVLogger(save_dir=str(logdir), name="csv")]
    if tensorboard_available():
        loggers.append(pl.loggers.TensorBoardLogger(save_dir=str(logdir), name="tensorboard", default_hp_metric=False))
    return loggers


def tensorboard_writer(trainer: pl.Trainer) -> Any:
    """The TensorBoard ``SummaryWriter`` of the run, or None without a TensorBoard logger."""
    for each in trainer.loggers:
        if isinstance(each, pl.loggers.TensorBoardLogger):
            return each.experiment
    return None


def log_image_grid(trainer: pl.Trainer, tag: str, grid: torch.Tensor, step: int) -> None:
    """Add a ``[C, H, W]`` grid in [0, 1] to TensorBoard when it is in use."""
    writer = tensorboard_writer(trainer)
    if writer is not None:
        writer.add_image(tag, grid.clamp(0.0, 1.0), global_step=step)


class EmbeddingMonitor(pl.Callback):
    """Every ``every_n_steps``: each learned vector's norm (logged) and nearest words (TensorBoard text); at the end
    of training one line per vector with its nearest words, and a warning for a vector nearest to a function word."""

    def __init__(self, every_n_steps: int = 100, top: int = 3, function_words: tuple[str, ...] | list[str] = FUNCTION_WORDS) -> None:
        super().__init__()
        self.every_n_steps, self.top = every_n_steps, top
        self.function_words = frozenset(w.lower() for w in function_words)
        self.final: dict[str, list[list[tuple[str, float]]]] = {}

    @staticmethod
    def learned(pl_module: pl.LightningModule) -> dict[str, tuple[Any, torch.Tensor]]:
        """Each placeholder's vectors with the text encoder whose table they live in, by label: the placeholder, or
        ``clip_l/<placeholder>`` and ``clip_g/<placeholder>`` for SDXL's two halves (one manager per encoder)."""
        manager = getattr(pl_module, "embedding_manager", None)
        if manager is None:
            return {}
        halves = getattr(manager, "halves", None)
        managers = dict(halves.items()) if halves is not None else {"": manager}
        return {
            f"{half}/{p}" if half else p: (m.embedder[0], v.detach())
            for half, m in managers.items()
            for p, v in m.string_to_param_dict.items()
        }

    def neighbours(self, pl_module: pl.LightningModule) -> dict[str, list[list[tuple[str, float]]]]:
        return {p: nearest_words(embedder, vectors, self.top) for p, (embedder, vectors) in self.learned(pl_module).items()}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps:
            return
        norms = {
            f"embedding/{p}_{i}_norm": float(v.norm()) for p, (_, vectors) in self.learned(pl_module).items() for i, v in enumerate(vectors)
        }
        if norms:
            log_now(trainer, norms)
        writer = tensorboard_writer(trainer)
        if writer is not None and trainer.is_global_zero:
            for placeholder, rows in self.neighbours(pl_module).items():
                writer.add_text(f"nearest_words/{placeholder}", describe_neighbours(rows), global_step=step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self.final = self.neighbours(pl_module)
        for placeholder, rows in self.final.items():
            logger.info("learned '%s', nearest words: %s", placeholder, describe_neighbours(rows))
            for i, row in enumerate(rows):
                word, cosine = row[0]
                if word.lower() in self.function_words:
                    logger.warning(
                        "learned '%s' vector %d ends nearest to the function word '%s' (cosine %.2f), not a content "
                        "word: it may have learned the captions rather than the concept; check its samples or run "
                        "again with another --seed", placeholder, i, word, cosine,
                    )


def describe_neighbours(rows: list[list[tuple[str, float]]]) -> str:
    return "; ".join(f"vector {i}: " + ", ".join(f"{w} ({s:.2f})" for w, s in row) for i, row in enumerate(rows))
