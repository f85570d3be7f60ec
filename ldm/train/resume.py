"""Interrupt and resume exactly: an interrupted run resumed with ``-r`` ends with the vectors of the run that was never
interrupted, bit for bit, at no more than the steps left.

Three pieces, each doing its part through Lightning's own checkpoint and restore path:

* :class:`StopRequests` and :class:`StopAtStepEnd`: Ctrl-C or SIGTERM during training does not cut a step in two.
  The first signal is noted; the step in progress finishes (its callbacks too: the deterministic loss, DVAR, the
  best-of-starts bookkeeping), ``last.ckpt`` and the embedding are written at the step reached, and the run exits
  saying what ``-r`` will do. A second signal stops at once (the embedding of that moment is saved; ``-r`` then goes
  back to the last checkpoint, and the steps after it are done again, to the same result).
* :class:`ResumableDataLoader`: the training loader as a Lightning "stateful" loader. Everything random in a run
  (the sampler's order, the dataset's templates and flips with ``num_workers: 0``, the noise, the timesteps, the
  latent samples, a new start's vectors, the image grids' sampling) draws from the global generators of Python,
  NumPy and torch, in one stream. At every checkpoint the loader records where that stream is, and where it was when
  the epoch's iterator was made, with the number of batches served; on resume it makes the epoch's iterator again
  from that state, serves the batches already trained on to nobody, and puts the generators back where the
  checkpoint left them. The run goes on with the next batch it would have drawn, and every later draw is the same.
* the callbacks' ``state_dict``: the deterministic loss's history, DVAR's position in it, the starts already done and
  the image logger's schedule (each in its own module).

What stays different: with ``num_workers > 0`` the dataset's draws happen in worker processes whose generators are
not in the checkpoint, so the templates and flips after a resume differ (the order and the training noise do not).
"""
from __future__ import annotations

import logging
import pickle
import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

logger = logging.getLogger(__name__)


def capture_rng() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's global generators (CPU, and every CUDA device in use), as
    tensors and plain values, so a checkpoint holding them loads with ``weights_only=True``."""
    version, keys, gauss = random.getstate()
    name, mt, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": (version, torch.tensor(keys, dtype=torch.int64), gauss),
        "numpy": (name, torch.from_numpy(mt.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put the global generators back where :func:`capture_rng` found them."""
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(int(k) for k in keys.tolist()), gauss))
    name, mt, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, mt.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose epoch Lightning can resume in the middle (its ``state_dict`` / ``load_state_dict``).

    The state: the global generators when the epoch's iterator was made (``epoch_rng``), how many batches it has
    served (``batches``) and the generators now (``rng``). Lightning asks for it when it writes a checkpoint (after a
    step: no batch is fetched ahead for a loader of known length, so served = trained on) and gives it back before
    it makes the first iterator of a resumed run. That iterator then replays the epoch up to where the checkpoint
    was (the sampler draws the same order, the dataset the same templates and flips), drops those batches, and sets
    the generators to ``rng``: the next batch and every draw after it are those of the uninterrupted run. A
    checkpoint written at the end of an epoch only sets the generators: the next epoch then starts as it would have.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch_rng: dict[str, Any] | None = None
        self._served = 0
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_rng": self._epoch_rng, "batches": self._served, "rng": capture_rng()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state

    def __iter__(self) -> Iterator[Any]:
        state, self._pending = self._pending, None
        mid_epoch = state is not None and state["epoch_rng"] is not None and 0 < state["batches"] < len(self)
        if state is not None:
            restore_rng(state["epoch_rng"] if mid_epoch else state["rng"])
        self._epoch_rng, self._served = capture_rng(), 0
        batches = super().__iter__()
        if mid_epoch:
            for _ in range(state["batches"]):
                next(batches)
            self._served = state["batches"]
            restore_rng(state["rng"])
            logger.info("resuming the epoch at batch %d of %d (the order and the random draws of the interrupted run)",
                        self._served, len(self))
        return self._count(batches)

    def _count(self, batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            self._served += 1
            yield batch


class StopRequests:
    """The handler of SIGINT (Ctrl-C) and SIGTERM.

    Outside training both stop at once (``KeyboardInterrupt``). While :class:`StopAtStepEnd` defers them (during
    ``fit``), the first signal is only noted in ``signum``, and the step in progress finishes; a second one stops at
    once. :meth:`installed` sets the handler and puts the previous ones back afterwards.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.deferring = False
        self.signum: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        if self.deferring and self.signum is None:
            self.signum = signum
            logger.warning("%s: finishing the current step, then saving a checkpoint to resume from (again to stop at once)",
                           signal.Signals(signum).name)
            return
        raise KeyboardInterrupt(f"signal {signum}")

    def install(self) -> dict[int, Any]:
        """Handle SIGINT and SIGTERM here; returns the previous handlers."""
        previous = {s: signal.getsignal(s) for s in self.SIGNALS}
        for each in self.SIGNALS:
            signal.signal(each, self)
        return previous


class StoppedAtStepEnd(KeyboardInterrupt):
    """Raised after a step when a stop was requested: Lightning handles it as Ctrl-C (``on_exception``, exit 1)."""


class StopAtStepEnd(pl.Callback):
    """Defers Ctrl-C and SIGTERM during training to the end of the step (see the module docstring).

    Put it after every other callback (``ModelCheckpoint`` comes after it anyway): at its ``on_train_batch_end``
    the step's bookkeeping is complete, so the checkpoint written there is one Lightning resumes from, like the
    periodic ones. ``resume_command`` is what the message tells the user to run.
    """

    def __init__(self, requests: StopRequests, ckptdir: str, resume_command: str) -> None:
        super().__init__()
        self.requests, self.ckptdir, self.resume_command = requests, Path(ckptdir), resume_command

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.requests.deferring = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.requests.deferring = False

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.requests.deferring = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.requests.signum is None:
            return
        step = trainer.global_step
        if trainer.should_stop or (trainer.max_steps is not None and 0 < trainer.max_steps <= step):
            logger.warning("the run ends at this step anyway (step %d): finishing", step)
            return
        last = self.ckptdir / "last.ckpt"
        trainer.save_checkpoint(last, weights_only=False)
        where = describe_position(trainer)
        vectors = " and embeddings.pt (the vectors of this step)" if getattr(pl_module, "embedding_manager", None) is not None else ""
        logger.warning("interrupted at step %d%s: saved %s%s; resume with `%s` to continue from step %d, as if never "
                       "interrupted", step, f" ({where})" if where else "", last, vectors, self.resume_command, step)
        raise StoppedAtStepEnd(f"signal {self.requests.signum}")


def describe_position(trainer: pl.Trainer) -> str:
    """Where in the run a stop came, for the messages: "start 1 of 2" with best-of-starts, else nothing."""
    for each in trainer.callbacks:
        position = getattr(each, "position", None)
        if callable(position):
            return position()
    return ""


def checkpoint_step(path: Path) -> int | None:
    """The step a Lightning checkpoint was written at, or None if there is none (or it cannot be read)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except (OSError, KeyError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError):
        return None
