"""The project's one checkpoint reader: model weights from ``.ckpt``/``.pt``/``.bin`` or ``.safetensors`` files, safely.

Pickled checkpoints are read with ``torch.load(weights_only=True)``: no code in the file ever runs. Lightning-era
checkpoints (Stable Diffusion v1.x, LDM) also pickle a few harmless objects next to the weights (numpy scalars, a
``ModelCheckpoint`` callback's state); those names are mapped to inert stand-ins so the weights still load.
Every failure becomes a :class:`CheckpointError` whose message is one line naming the file and the fix.
"""
from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from ldm.errors import UserError
from ldm.file_kinds import foreign_kind
from ldm.io import atomic_write

logger = logging.getLogger(__name__)

_YAML_SUFFIXES = {".yaml", ".yml", ".json"}


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be used; ``str(err)`` is a one-line message for the user."""


class _Inert:
    """Stand-in for pickled training-time objects (callbacks, loggers): keeps their state as a plain dict."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _numpy_safe_globals() -> list[Any]:
    import numpy as np

    found: list[Any] = [np.dtype, np.ndarray]
    for path in ("numpy.core.multiarray", "numpy._core.multiarray"):
        try:
            module = __import__(path, fromlist=["scalar"])
        except ImportError:
            continue
        found += [module.scalar, module._reconstruct]
    found += [type(np.dtype(name)) for name in ("float64", "float32", "int64", "int32", "bool")]
    return found


_INERT_NAMES = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
)


def numpy_scalars_allowed() -> Any:
    """A context in which ``torch.load(weights_only=True)`` accepts numpy scalars and dtypes: Lightning resumes a run
    (``main.py -r``) that way, and the optimizer and scheduler states of a run trained with a ``scheduler_config``
    written before the schedulers returned Python floats hold numpy floats (``lr``, ``_last_lr``)."""
    return torch.serialization.safe_globals(_numpy_safe_globals())


def safe_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load`` with ``weights_only=True`` and the allow-list Lightning checkpoints need."""
    allowed: list[Any] = _numpy_safe_globals() + [(_Inert, name) for name in _INERT_NAMES]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(path: str | os.PathLike, *, what: str = "--actual_resume") -> dict[str, Any]:
    """Read a checkpoint and return the whole dict it holds (``{"state_dict": ...}`` or a bare state dict).

    ``what`` names the flag or config key the path came from, for the error message.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{what}: file '{p}' does not exist; pass the path of a model checkpoint (.ckpt or .safetensors)")
    if p.is_dir():
        raise CheckpointError(f"{what}: '{p}' is a folder; pass the checkpoint file inside it (e.g. model.ckpt)")
    if p.suffix.lower() in _YAML_SUFFIXES:
        raise CheckpointError(f"{what}: '{p}' is a config file, not a checkpoint; give the config with --base and the weights (.ckpt) here")
    kind = foreign_kind(p)
    if kind is not None:
        raise CheckpointError(f"{what}: '{p}' is {kind}, not a model checkpoint; pass a .ckpt/.safetensors model file")
    if p.suffix.lower() == ".safetensors":
        return _load_safetensors(p, what)
    try:
        obj = safe_torch_load(p)
    except Exception as err:  # the safe unpickler trips in many ways on a damaged or cut file
        refused = refused_global(err)
        if refused is not None:
            raise CheckpointError(
                f"{what}: '{p}' was refused by the safe reader ({refused[:160]}): it needs Python code to load, which is "
                "never run; pass a .ckpt/.safetensors model file"
            ) from err
        raise CheckpointError(
            f"{what}: '{p}' is a damaged or truncated PyTorch file ({type(err).__name__}); pass a .ckpt/.safetensors model file"
        ) from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what}: '{p}' holds a {type(obj).__name__}, not a checkpoint dict; pass a model checkpoint")
    return obj


def refused_global(err: Exception) -> str | None:
    """The line of the safe unpickler's refusal that names the class it would not load; None for other failures
    (the checkpoint reader and the embedding reader both tell a refused class from a damaged file by it)."""
    if not isinstance(err, pickle.UnpicklingError):
        return None
    return next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), None)


def _load_safetensors(p: Path, what: str) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return {"state_dict": load_file(str(p), device="cpu")}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{what}: '{p}' is not a readable safetensors file ({err}); pass a model checkpoint") from err


def state_dict_from_checkpoint(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint dict: its ``state_dict`` entry, or the dict itself when it is bare."""
    sd = ckpt.get("state_dict", ckpt)
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def looks_like_embedding(ckpt: dict[str, Any]) -> bool:
    """Whether a loaded file is a textual-inversion embedding (any common layout) rather than model weights."""
    entries = ckpt.get("state_dict", ckpt)  # a .safetensors file arrives as {"state_dict": its tensors}
    if not isinstance(entries, dict):
        return False
    keys = [str(k) for k in entries]
    if "string_to_param" in entries or "emb_params" in entries or any(k.startswith("string_to_param.") for k in keys):
        return True
    tensors = [v for v in entries.values() if isinstance(v, torch.Tensor)]
    return 0 < len(tensors) == len(entries) <= 16 and all(v.dim() in (1, 2) and "." not in k for k, v in zip(keys, tensors))


def require_weights(ckpt: dict[str, Any], path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """The weights of a loaded checkpoint; a one-line :class:`CheckpointError` when there are none (or it is an
    embedding file, which then says which flag takes it)."""
    model_flag = what.split(" /")[0]
    if looks_like_embedding(ckpt):
        embedding_flag = "--embedding_manager_ckpt" if model_flag == "--actual_resume" else "--embedding_path"
        raise CheckpointError(
            f"{model_flag}: '{path}' is an embedding file, not a model checkpoint; pass it as {embedding_flag}, "
            f"and the model as {model_flag}"
        )
    sd = state_dict_from_checkpoint(ckpt)
    if not sd:
        raise CheckpointError(f"{what}: '{path}' holds no weights (an empty Lightning checkpoint?); pass the model checkpoint")
    return sd


def load_state_dict(path: str | os.PathLike, *, what: str = "--actual_resume") -> dict[str, torch.Tensor]:
    """Read only the tensors of a model checkpoint (see :func:`load_checkpoint` and :func:`require_weights`)."""
    return require_weights(load_checkpoint(path, what=what), path, what)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`ldm.io.atomic_write`: readers never see half a file."""
    atomic_write(path, lambda temp: torch.save(obj, temp))
