"""Lightning callbacks of a run: the run folder and its configs, image grids, the loss curve, and saving the
embedding when a run ends early (Ctrl-C, SIGTERM, an error) so nothing learned is lost.

Every file is written by global rank 0 only.
"""
from __future__ import annotations

import csv
import logging
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import OmegaConf

from ldm.checkpoint import atomic_torch_save
from ldm.data.images import make_grid, save_image_grid
from ldm.io import atomic_write, atomic_write_text
from ldm.train.monitoring import log_image_grid
from ldm.train.resume import StoppedAtStepEnd, checkpoint_step

logger = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file and renamed: a killed run never leaves half a file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_torch_save(checkpoint, path)


class SetupCallback(pl.Callback):
    """Creates ``<run>/{checkpoints,configs}`` and writes ``<now>-project.yaml`` and ``<now>-lightning.yaml``."""

    def __init__(self, resume: bool, now: str, logdir: str, ckptdir: str, cfgdir: str, config: Any, lightning_config: Any) -> None:
        super().__init__()
        self.resume, self.now = resume, now
        self.logdir, self.ckptdir, self.cfgdir = Path(logdir), Path(ckptdir), Path(cfgdir)
        self.config, self.lightning_config = config, lightning_config

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        for folder in (self.logdir, self.ckptdir, self.cfgdir):
            folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.cfgdir / f"{self.now}-project.yaml", OmegaConf.to_yaml(self.config))
        atomic_write_text(self.cfgdir / f"{self.now}-lightning.yaml", OmegaConf.to_yaml({"lightning": self.lightning_config}))
        # the merged config (~100 lines) goes to the run folder only, as the original's configs/; the console gets where
        logger.info("merged config: %s (and %s-lightning.yaml)", self.cfgdir / f"{self.now}-project.yaml", self.now)


class ImageLogger(pl.Callback):
    """Every ``batch_frequency`` steps: ``images/<split>/<key>_gs-XXXXXX_e-XXXXXX_b-XXXXXX.jpg`` grids."""

    def __init__(
        self,
        batch_frequency: int,
        max_images: int,
        clamp: bool = True,
        increase_log_steps: bool = True,
        rescale: bool = True,
        disabled: bool = False,
        log_on_batch_idx: bool = False,
        log_first_step: bool = False,
        log_images_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        self.batch_freq = batch_frequency
        self.max_images = max_images
        self.log_steps = [2**n for n in range(int(torch.log2(torch.tensor(float(batch_frequency)))) + 1)] if increase_log_steps else [batch_frequency]
        self.clamp, self.rescale, self.disabled = clamp, rescale, disabled
        self.log_on_batch_idx, self.log_first_step = log_on_batch_idx, log_first_step
        self.log_images_kwargs = dict(log_images_kwargs or {})

    def state_dict(self) -> dict[str, Any]:
        """The steps of the doubling schedule still to come (``increase_log_steps``): a resumed run keeps to it."""
        return {"log_steps": list(self.log_steps)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.log_steps = [int(step) for step in state_dict["log_steps"]]

    def check_frequency(self, step: int) -> bool:
        if step == 0 and not self.log_first_step:
            return False
        if step % self.batch_freq == 0 or step in self.log_steps:
            if self.log_steps and step in self.log_steps:
                self.log_steps.pop(0)
            return True
        return False

    def log_img(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: dict, batch_idx: int, split: str) -> None:
        step = batch_idx if self.log_on_batch_idx else pl_module.global_step
        if self.disabled or self.max_images <= 0 or not hasattr(pl_module, "log_images") or not self.check_frequency(step):
            return
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            images = pl_module.log_images(batch, split=split, N=self.max_images, **self.log_images_kwargs)
        if was_training:
            pl_module.train()
        if not trainer.is_global_zero:
            return
        root = Path(trainer.logger.save_dir if trainer.logger else trainer.default_root_dir) / "images" / split
        for key, value in images.items():
            grid = value[: self.max_images].detach().float().cpu()
            if self.clamp:
                grid = grid.clamp(-1.0, 1.0)
            name = f"{key}_gs-{pl_module.global_step:06}_e-{pl_module.current_epoch:06}_b-{batch_idx:06}.jpg"
            save_image_grid(grid, root / name, nrow=4, signed=self.rescale)
            log_image_grid(trainer, f"{split}/{key}", make_grid((grid + 1.0) / 2.0 if self.rescale else grid, nrow=4), pl_module.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log_img(trainer, pl_module, batch, batch_idx, split="train")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if pl_module.global_step > 0:
            self.log_img(trainer, pl_module, batch, batch_idx, split="val")


class ProgressBar(pl.callbacks.TQDMProgressBar):
    """Lightning's bar, showing the step's losses as read from the device only when the bar refreshes.

    Metrics logged with ``prog_bar=True`` are read back to the host by Lightning after every step, whatever the
    refresh rate (a host synchronisation per step on a GPU); the training step therefore logs without it, and this
    bar reads the logged step values (``train/..._step`` and ``global_step``) at a refresh, in one copy.
    """

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.update(step_metrics(trainer))
        return items


def step_metrics(trainer: pl.Trainer) -> dict[str, Any]:
    """The logged step values (``train/..._step`` losses as 3 significant digits, ``global_step``), read from the
    device in one copy."""
    shown = {k: v for k, v in trainer.callback_metrics.items() if (k.startswith("train/") and k.endswith("_step")) or k == "global_step"}
    if not shown:
        return {}
    values = torch.stack([v.detach().float().reshape(()) for v in shown.values()]).tolist()
    return {k: f"{v:.3g}" if k != "global_step" else int(v) for k, v in zip(shown, values)}


class StepLog(pl.callbacks.ProgressBar):
    """The progress display when stdout, where Lightning's bar goes, is not a terminal (a redirected log, a batch
    job): one log line (on stderr, with the other log lines) every
    ``log_every_n_steps`` training steps and at the last, with the step, the losses and the speed since the line
    before.

    A tqdm bar redraws itself after every step; a terminal overwrites the redraws, a file keeps them all (hundreds of
    kilobytes of one line per run). The lines come at the steps the metrics logger writes anyway, so reading the
    losses costs no extra device synchronisation.
    """

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._mark = (0, 0.0)  # (step, time) of the last line or of the start

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mark = (trainer.global_step, time.perf_counter())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step, total = trainer.global_step, trainer.max_steps
        at_end = total is not None and total > 0 and step >= total
        if not self._enabled or not trainer.is_global_zero or step == self._mark[0]:
            return
        if step % max(1, trainer.log_every_n_steps) and not at_end:
            return
        now = time.perf_counter()
        rate = (step - self._mark[0]) / max(now - self._mark[1], 1e-9)
        self._mark = (step, now)
        losses = ", ".join(f"{k.removeprefix('train/').removesuffix('_step')} {v}" for k, v in step_metrics(trainer).items() if k != "global_step")
        of_total = f"/{total}" if total is not None and total > 0 else f" (epoch {trainer.current_epoch})"
        logger.info("step %d%s: %s%s%.2f it/s", step, of_total, losses, ", " if losses else "", rate)


def progress_display(on_gpu: bool) -> pl.callbacks.ProgressBar:
    """A bar when stdout (where Lightning's bar writes) is a terminal (refreshed every 10 steps on a GPU, where each
    refresh reads the losses back from the device; every step on the CPU), else :class:`StepLog`'s lines."""
    if sys.stdout.isatty():
        return ProgressBar(refresh_rate=10 if on_gpu else 1)
    return StepLog()


class EmbeddingRescue(pl.Callback):
    """Saves the embedding and a last checkpoint at the end of training, and the embedding when a run stops early.

    A stop at the end of a step (Ctrl-C or SIGTERM, :class:`ldm.train.resume.StopAtStepEnd`) has saved both already.
    Any other stop (a second Ctrl-C, an error) comes in the middle of a step: the embedding of that moment is saved,
    and ``last.ckpt`` stays the one of the last checkpoint, which the message names with what ``-r`` will do.
    """

    def __init__(self, ckptdir: str, resume_command: str = "python main.py -r <run> -t") -> None:
        super().__init__()
        self.ckptdir = Path(ckptdir)
        self.resume_command = resume_command

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1 and getattr(pl_module, "embedding_manager", None) is not None:
            check_ranks_agree(pl_module)
        trainer.save_checkpoint(self.ckptdir / "last.ckpt", weights_only=False)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, StoppedAtStepEnd) or getattr(pl_module, "embedding_manager", None) is None or not trainer.is_global_zero:
            return
        step = max(trainer.global_step - 1, 0)
        if pl_module.embeddings_are_finite():
            pl_module.save_embeddings(self.ckptdir, step)
            logger.warning("run stopped (%s): embedding of step %d saved to %s", type(exception).__name__, step, self.ckptdir / "embeddings.pt")
        last = self.ckptdir / "last.ckpt"
        resumable = checkpoint_step(last)
        if resumable is None:
            logger.warning("no checkpoint to resume from yet: -r cannot continue this run (start it again, or from the "
                           "embedding with --embedding_manager_ckpt)")
        else:
            logger.warning("%s is the checkpoint of step %d: %s resumes from step %d (the %d steps after it are done "
                           "again, to the same result)", last, resumable, self.resume_command, resumable,
                           max(trainer.global_step - resumable, 0))


def check_ranks_agree(pl_module: pl.LightningModule) -> None:
    """DDP sanity check: every rank must end with the same vectors (a collective call: all ranks run it)."""
    vec = torch.cat([p.detach().flatten() for p in pl_module.embedding_manager.embedding_parameters()])
    gathered = pl_module.all_gather(vec)
    if bool((gathered == gathered[0]).all()):
        logger.info("all %d ranks hold the same embedding", gathered.shape[0])
    else:
        logger.warning("the ranks hold different embeddings (max difference %.3g); rank 0's is saved", float((gathered - gathered[0]).abs().max()))


class LossCurve(pl.Callback):
    """At the end of training, ``<run>/loss.png``: the training loss per step from the CSV logs of every version of
    the run (a resumed run logs to ``csv/version_1``, ...; the curve still covers all its steps)."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger_ = trainer.logger
        if not trainer.is_global_zero or logger_ is None or not logger_.log_dir:
            return
        logger_.save()
        plot_loss_curve(run_metrics(Path(logger_.log_dir).parent), Path(logger_.save_dir) / "loss.png")


def run_metrics(csv_root: Path) -> list[Path]:
    """``version_*/metrics.csv`` under ``csv_root``, oldest version first."""
    versions = [d for d in csv_root.glob("version_*") if d.name.removeprefix("version_").isdigit()]
    ordered = sorted(versions, key=lambda d: int(d.name.removeprefix("version_")))
    return [d / "metrics.csv" for d in ordered if (d / "metrics.csv").is_file()]


def read_losses(metrics_csvs: list[Path], key: str = "train/loss_step") -> tuple[list[int], list[float]]:
    """Steps and losses from several CSV logs; where a resumed version repeats a step, its value wins."""
    by_step: dict[int, float] = {}
    for metrics_csv in metrics_csvs:
        with open(metrics_csv, newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get(key):
                    by_step[int(row["step"])] = float(row[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_loss_curve(metrics_csvs: list[Path], out_png: Path, key: str = "train/loss_step") -> None:
    steps, losses = read_losses(metrics_csvs, key)
    if not steps:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=0.6, alpha=0.5, label="per step")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = torch.tensor(losses).unfold(0, window, 1).mean(1).tolist()
        ax.plot(steps[window - 1 :], smooth, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.legend()
    fig.tight_layout()
    atomic_write(out_png, lambda temp: fig.savefig(temp, dpi=100, format="png"))
    plt.close(fig)
