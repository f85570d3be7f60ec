"""Best of several starts: an inversion can settle in a local optimum (in the shapes world, the second vector of a
two-vector word ends near "on" and the shape is lost, whatever the number of steps), and which one it finds depends
on the start. This callback trains ``candidates`` starts one after another within the run's step budget, each from
the init word plus fresh noise, and keeps the one with the lowest deterministic loss (:mod:`ldm.train.validation`).

A candidate ends when DVAR (:mod:`ldm.train.early_stopping`, if configured) says its loss has flattened, or after
``max_steps / candidates`` steps. The optimizer's state is cleared between candidates, so each starts as a fresh run.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from ldm.train.early_stopping import DVAREarlyStopping
from ldm.errors import ConfigError
from ldm.train.validation import DeterministicLoss

logger = logging.getLogger(__name__)


def vector_sets(manager: Any) -> dict[str, tuple[torch.nn.Parameter, torch.Tensor | None]]:
    """Each learned vector set with its init-word rows (None without an init word), by label: the placeholder, or
    ``clip_l/<placeholder>`` and ``clip_g/<placeholder>`` for SDXL's two halves (as the monitor labels them): a
    start is all of them, so an SDXL start keeps and restarts both halves together."""
    halves = getattr(manager, "halves", None)
    managers = dict(halves.items()) if halves is not None else {"": manager}
    return {
        f"{half}/{p}" if half else p: (v, m.initial_embeddings[p] if p in m.initial_embeddings else None)
        for half, m in managers.items()
        for p, v in m.string_to_param_dict.items()
    }


class BestOfRestarts(pl.Callback):
    """Train ``candidates`` starts in turn and keep the lowest deterministic loss (mean of its last ``score_evals``
    evaluations). ``noise`` is the relative size of the noise added to the init word for every start after the first
    (the first keeps the start the model was built with). With ``save_starts``, every start's vectors are also written
    next to the run's checkpoints (``start1.pt``, ...; with the deterministic loss and step), so that starts can be
    compared afterwards (judged, or scored by another signal) without running them again. With ``signal_prompts``
    (prompts holding the placeholder next to different contexts, e.g. "a photo of a * on a blue background"), each
    start also logs how much its word overrides those contexts (:mod:`ldm.train.override`); the choice of the start
    kept does not use them."""

    def __init__(self, candidates: int = 3, noise: float = 0.1, score_evals: int = 5, save_starts: bool = False,
                 signal_prompts: list[str] | None = None) -> None:
        super().__init__()
        if candidates < 1 or score_evals < 1:
            raise ConfigError("BestOfRestarts needs candidates >= 1 and score_evals >= 1")
        if signal_prompts is not None and len(signal_prompts) < 2:
            raise ConfigError("BestOfRestarts: signal_prompts needs at least two prompts that differ in their context")
        self.candidates, self.noise, self.score_evals, self.save_starts = candidates, noise, score_evals, save_starts
        self.signal_prompts = list(signal_prompts) if signal_prompts is not None else None
        self.results: list[tuple[float, int, dict[str, torch.Tensor]]] = []
        self.signals: list[dict[str, float]] = []
        self.start_step = 0
        self.restored = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.source = next((cb for cb in trainer.callbacks if isinstance(cb, DeterministicLoss)), None)
        if self.source is None:
            raise ConfigError("BestOfRestarts needs the deterministic loss: add ldm.train.validation.DeterministicLoss "
                              "to lightning.callbacks (before it)")
        self.dvar = next((cb for cb in trainer.callbacks if isinstance(cb, DVAREarlyStopping)), None)
        self.budget = max(1, trainer.max_steps // self.candidates) if trainer.max_steps and trainer.max_steps > 0 else None
        if not self.restored:
            self.results, self.signals, self.start_step = [], [], trainer.global_step

    def state_dict(self) -> dict[str, Any]:
        """The starts done (score, step, vectors, signals) and where the current one began: a resumed run goes on
        with it."""
        results = [{"score": score, "step": step, "vectors": {k: v.detach().cpu() for k, v in vectors.items()}}
                   for score, step, vectors in self.results]
        return {"results": results, "start_step": self.start_step, "signals": [dict(s) for s in self.signals]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = [(float(r["score"]), int(r["step"]), dict(r["vectors"])) for r in state_dict["results"]]
        self.signals = [dict(s) for s in state_dict.get("signals", [])]
        self.start_step, self.restored = int(state_dict["start_step"]), True

    def position(self) -> str:
        """Which start is running, for the interrupt message: "start 2 of 2, begun at step 560"."""
        return f"start {min(len(self.results) + 1, self.candidates)} of {self.candidates}, begun at step {self.start_step}"

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        last = trainer.max_steps is not None and 0 < trainer.max_steps <= step
        out_of_budget = self.budget is not None and step - self.start_step >= self.budget
        if not (trainer.should_stop or out_of_budget or last) or len(self.results) >= self.candidates:
            return
        if not self.source.history or self.source.history[-1][0] != step:
            self.source.record(trainer, pl_module)
        manager = pl_module.embedding_manager
        score = sum(v for _, v in self.source.history[-self.score_evals:]) / len(self.source.history[-self.score_evals:])
        self.results.append((score, step, {k: v.detach().clone() for k, (v, _) in vector_sets(manager).items()}))
        logger.info("start %d of %d: deterministic loss %.5f after %d steps", len(self.results), self.candidates, score,
                    step - self.start_step)
        extra: dict[str, Any] = {"deterministic_loss": score, "step": step - self.start_step}
        if self.signal_prompts is not None:
            extra["signals"] = self.override(pl_module)
        if self.save_starts and trainer.is_global_zero:
            folder = Path(getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir)
            folder.mkdir(parents=True, exist_ok=True)
            manager.save(folder / f"start{len(self.results)}.pt", extra=extra)
        if len(self.results) < self.candidates and not last:
            trainer.should_stop = False
            self.restart(trainer, pl_module)
            return
        best = min(range(len(self.results)), key=lambda k: self.results[k][0])
        learned = vector_sets(manager)
        with torch.no_grad():
            for name, vectors in self.results[best][2].items():
                learned[name][0].copy_(vectors)
        trainer.should_stop = True
        logger.info("keeping start %d of %d (deterministic loss %.5f; the others %s)", best + 1, len(self.results),
                    self.results[best][0], ", ".join(f"{r[0]:.5f}" for k, r in enumerate(self.results) if k != best))

    def override(self, pl_module: pl.LightningModule) -> dict[str, float]:
        """The override signals of the vectors now (in eval mode, restored after), logged and kept in ``signals``."""
        from ldm.train.override import override_signals

        training = pl_module.training
        pl_module.eval()
        try:
            signals = override_signals(pl_module, self.signal_prompts)
        finally:
            pl_module.train(training)
        self.signals.append(signals)
        logger.info("start %d override signals: %s", len(self.results), ", ".join(f"{k} {v:.4f}" for k, v in signals.items()))
        return signals

    def restart(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """New vectors (init word + noise), a fresh optimizer state, and fresh loss histories."""
        manager = pl_module.embedding_manager
        with torch.no_grad():
            for param, initial in vector_sets(manager).values():
                start = initial if initial is not None else param
                rms = start.pow(2).mean(dim=-1, keepdim=True).sqrt()
                param.copy_(start + self.noise * rms * torch.randn(start.shape, device=start.device, dtype=start.dtype))
        for optimizer in trainer.optimizers:
            optimizer.state.clear()
        self.start_step = trainer.global_step
        self.source.history = []
        self.source.record(trainer, pl_module)
        if self.dvar is not None:
            self.dvar.reset()
