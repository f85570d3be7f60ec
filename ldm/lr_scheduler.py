"""Learning-rate multipliers of upstream LDM configs (``scheduler_config``), as LambdaLR-compatible callables.

Every multiplier is a Python float: ``LambdaLR`` keeps what they return in the optimizer's and its own state, and a
numpy float there made the run's checkpoints unreadable by ``torch.load(weights_only=True)``, so ``main.py -r``
could not resume them.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence


class LambdaWarmUpCosineScheduler:
    """Linear warm-up to ``lr_max``, then cosine decay to ``lr_min`` by ``max_decay_steps``.

    Kept for API compatibility: upstream LDM configs name it; no shipped config does.
    """

    def __init__(self, warm_up_steps: int, lr_min: float, lr_max: float, lr_start: float, max_decay_steps: int, verbosity_interval: int = 0) -> None:
        self.lr_warm_up_steps = warm_up_steps
        self.lr_start, self.lr_min, self.lr_max = lr_start, lr_min, lr_max
        self.lr_max_decay_steps = max_decay_steps
        self.verbosity_interval = verbosity_interval

    def schedule(self, n: int, **kwargs) -> float:
        if n < self.lr_warm_up_steps:
            return (self.lr_max - self.lr_start) / self.lr_warm_up_steps * n + self.lr_start
        t = min((n - self.lr_warm_up_steps) / (self.lr_max_decay_steps - self.lr_warm_up_steps), 1.0)
        return self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (1 + math.cos(t * math.pi))

    def __call__(self, n: int, **kwargs) -> float:
        return self.schedule(n, **kwargs)


class LambdaWarmUpCosineScheduler2:
    """Several warm-up + cosine cycles; ``cycle_lengths`` etc. are per-cycle lists."""

    def __init__(self, warm_up_steps: Sequence[int], f_min: Sequence[float], f_max: Sequence[float], f_start: Sequence[float], cycle_lengths: Sequence[int], verbosity_interval: int = 0) -> None:
        if not len(warm_up_steps) == len(f_min) == len(f_max) == len(f_start) == len(cycle_lengths):
            raise ValueError("every scheduler list must have one entry per cycle")
        self.lr_warm_up_steps, self.f_start, self.f_min, self.f_max = warm_up_steps, f_start, f_min, f_max
        self.cycle_lengths = cycle_lengths
        self.cum_cycles = list(itertools.accumulate([0] + [int(c) for c in cycle_lengths]))
        self.verbosity_interval = verbosity_interval

    def find_in_interval(self, n: int) -> int:
        for interval, cl in enumerate(self.cum_cycles[1:]):
            if n <= cl:
                return interval
        return len(self.cycle_lengths) - 1

    def cycle_position(self, n: int) -> tuple[int, int]:
        cycle = self.find_in_interval(n)
        return cycle, n - self.cum_cycles[cycle]

    def schedule(self, n: int, **kwargs) -> float:
        cycle, n = self.cycle_position(n)
        if n < self.lr_warm_up_steps[cycle]:
            return (self.f_max[cycle] - self.f_start[cycle]) / self.lr_warm_up_steps[cycle] * n + self.f_start[cycle]
        t = min((n - self.lr_warm_up_steps[cycle]) / (self.cycle_lengths[cycle] - self.lr_warm_up_steps[cycle]), 1.0)
        return self.f_min[cycle] + 0.5 * (self.f_max[cycle] - self.f_min[cycle]) * (1 + math.cos(t * math.pi))

    def __call__(self, n: int, **kwargs) -> float:
        return self.schedule(n, **kwargs)


class LambdaLinearScheduler(LambdaWarmUpCosineScheduler2):
    """Warm-up, then linear decay from ``f_max`` to ``f_min`` over each cycle (the SD v1 training schedule)."""

    def schedule(self, n: int, **kwargs) -> float:
        cycle, n = self.cycle_position(n)
        if n < self.lr_warm_up_steps[cycle]:
            return (self.f_max[cycle] - self.f_start[cycle]) / self.lr_warm_up_steps[cycle] * n + self.f_start[cycle]
        return self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * (self.cycle_lengths[cycle] - n) / self.cycle_lengths[cycle]
