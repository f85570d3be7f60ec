"""A callback for the interrupt-and-resume tests: at a given step it sends the run's own process a real signal, in
the middle of the step (from ``on_train_batch_start``, after the batch was drawn), as Ctrl-C, SIGTERM or kill -9
would. Named in a run's config (``lightning.callbacks.interrupter.target=tests.interrupter.SignalAtStep``)."""
import os
import signal
from typing import Any

import pytorch_lightning as pl


class SignalAtStep(pl.Callback):
    """Sends ``signal_name`` (SIGINT, SIGTERM, SIGKILL) while step ``step`` runs (``global_step`` is ``step - 1``
    when it starts); ``step: 0`` sends nothing (a resumed run is given that)."""

    def __init__(self, step: int = 0, signal_name: str = "SIGINT") -> None:
        super().__init__()
        self.step, self.signum = step, signal.Signals[signal_name]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.step and trainer.global_step == self.step - 1:
            os.kill(os.getpid(), self.signum)
