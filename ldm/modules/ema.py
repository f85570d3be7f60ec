"""Exponential moving average of a model's parameters, stored as buffers (``model_ema.*`` keys of LDM checkpoints).

Buffer names are the parameter names with the dots removed, as in the original checkpoints, so ``use_ema: True``
checkpoints load unchanged.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class LitEma(nn.Module):
    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_upates: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError("Decay must be between 0 and 1")
        self.m_name2s_name: dict[str, str] = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_upates else -1, dtype=torch.int))
        for name, p in model.named_parameters():
            if p.requires_grad:
                s_name = name.replace(".", "")
                self.m_name2s_name[name] = s_name
                self.register_buffer(s_name, p.clone().detach().data)
        self.collected_params: list[torch.Tensor] = []

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One EMA update from ``model``'s current parameters (warm-up ``(1+n)/(10+n)`` as the original)."""
        decay = float(self.decay)
        if self.num_updates >= 0:
            self.num_updates += 1
            decay = min(decay, (1 + int(self.num_updates)) / (10 + int(self.num_updates)))
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if p.requires_grad:
                s = shadow[self.m_name2s_name[name]]
                s.sub_((1.0 - decay) * (s - p.to(s.dtype)))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.data.copy_(shadow[self.m_name2s_name[name]].data)

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Keep the current parameters to :meth:`restore` after evaluating with the EMA weights."""
        self.collected_params = [p.clone() for p in parameters]

    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        for c, p in zip(self.collected_params, parameters):
            p.data.copy_(c.data)
