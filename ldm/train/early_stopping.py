"""DVAR early stopping (Voronov et al., "Is This Loss Informative?", NeurIPS 2023) on the deterministic loss.

An inversion has converged when its deterministic loss (:mod:`ldm.train.validation`) has stopped moving relative to
how far it moved over the whole run: the run stops at the first check where

    var(last ``window`` values) / var(all values) < ``threshold``.

A loss that still falls keeps the recent variance a large share of the total; one that has fallen and gone flat
makes it small. The paper's textual-inversion setting is a window of 310 steps and a threshold of 0.15; ``window``
here counts training steps and is turned into a number of deterministic-loss evaluations.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl

from ldm.errors import ConfigError
from ldm.train.validation import DeterministicLoss

logger = logging.getLogger(__name__)


def dvar_ratio(values: Sequence[float], window: int) -> float | None:
    """var(last ``window`` values) / var(all values), or None while there are not more than ``window`` values."""
    if window < 2 or len(values) <= window:
        return None
    everything = np.asarray(values, dtype=np.float64)
    total = everything.var()
    if total == 0.0:
        return 0.0
    return float(everything[-window:].var() / total)


def dvar_should_stop(values: Sequence[float], window: int, threshold: float) -> bool:
    ratio = dvar_ratio(values, window)
    return ratio is not None and ratio < threshold


class DVAREarlyStopping(pl.Callback):
    """Stops training when the deterministic loss has flattened (see the module docstring); off with ``enabled: false``.

    It reads the values of the :class:`~ldm.train.validation.DeterministicLoss` callback, which must run too. The
    stop is logged in one line (step, ratio, window, threshold); the embedding then saved is the one of that step.
    """

    def __init__(self, window: int = 310, threshold: float = 0.15, min_steps: int = 0, enabled: bool = True) -> None:
        super().__init__()
        if window < 1 or threshold <= 0:
            raise ConfigError("DVAREarlyStopping needs window >= 1 (steps) and threshold > 0")
        self.window, self.threshold, self.min_steps, self.enabled = window, threshold, min_steps, enabled
        self.source: DeterministicLoss | None = None
        self.stopped_at: int | None = None
        self._seen = 0
        self.restored = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sources = [cb for cb in trainer.callbacks if isinstance(cb, DeterministicLoss)]
        if self.enabled and not sources:
            raise ConfigError("DVAR early stopping needs the deterministic loss: add the callback "
                              "ldm.train.validation.DeterministicLoss to lightning.callbacks (before it)")
        self.source = sources[0] if sources else None
        if not self.restored:
            self.reset()

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self._seen, "stopped_at": self.stopped_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed run goes on counting the deterministic-loss history where the checkpoint left it."""
        self._seen, self.stopped_at, self.restored = int(state_dict["seen"]), state_dict["stopped_at"], True

    def reset(self) -> None:
        """Forget what was seen: the deterministic loss starts a new history (a restart)."""
        self.stopped_at, self._seen = None, 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.enabled or self.source is None or len(self.source.history) == self._seen:
            return
        self._seen = len(self.source.history)
        step = trainer.global_step
        if step < self.min_steps:
            return
        values = [v for _, v in self.source.history]
        evaluations = max(2, round(self.window / self.source.every_n_steps))
        ratio = dvar_ratio(values, evaluations)
        if ratio is not None and ratio < self.threshold:
            self.stopped_at = step
            trainer.should_stop = True
            logger.info("DVAR early stopping at step %d: var(last %d steps of %s) / var(all) = %.3f < %.3f; the embedding "
                        "saved is the one of this step", step, self.window, "val/loss_det", ratio, self.threshold)
