"""Small helpers every part of the package shares: building objects from configs, and a few tensor utilities.

Configs name classes by import path (``target``) and pass ``params``; :func:`instantiate_from_config` turns such a
node into an object. Extra keyword arguments are forwarded to the constructor, which is how the EmbeddingManager
receives the text encoder it works on (``embedder=``).
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Import ``package.module.Name`` and return ``Name``."""
    module, cls = string.rsplit(".", 1)
    if reload:
        importlib.reload(importlib.import_module(module))
    return getattr(importlib.import_module(module, package=None), cls)


def instantiate_from_config(config: Mapping, **kwargs: Any) -> Any:
    """Build ``config["target"](**config.get("params", {}), **kwargs)``.

    The special values ``__is_first_stage__`` and ``__is_unconditional__`` (used by upstream LDM configs) yield
    ``None``, as in the original.
    """
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError("Expected key `target` to instantiate.")
    params = config.get("params", None) or {}
    return get_obj_from_str(config["target"])(**dict(params), **kwargs)


def exists(x: Any) -> bool:
    return x is not None


def default(val: Any, d: Any) -> Any:
    """``val`` if it is not None, else ``d`` (called first when it is a function)."""
    if exists(val):
        return val
    return d() if callable(d) else d


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch dimension."""
    return tensor.mean(dim=list(range(1, len(tensor.shape))))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def ismap(x: Any) -> bool:
    """A batch of spatial maps with more than three channels (upstream's test for segmentation-like inputs).

    Kept for API compatibility (upstream code uses it); nothing in this project calls it.
    """
    return isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] > 3


def isimage(x: Any) -> bool:
    """A batch of one- or three-channel images. Kept for API compatibility (upstream code uses it); nothing in this project calls it."""
    return isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] in (1, 3)
