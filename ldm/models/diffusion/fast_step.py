"""The training step near the device's limit: the denoiser under ``torch.compile``, a fused optimizer step, a
non-finite flag read without waiting for the device, and the instruments that check all of it.

On a GPU the textual-inversion step is host-bound: one SD v1 step dispatches about 4,400 aten ops, each a kernel
launch of ~10 us, while the kernels themselves need a fraction of that time. ``torch.compile`` fuses the UNet's
elementwise chains (GroupNorm + SiLU, residual adds, attention projections) into fewer kernels, and its
``reduce-overhead`` mode replays the whole forward and backward as CUDA graphs (one launch). Both need the step to
stay on the device: a single read of a device value on the host (``.item()``, ``bool(t)``, ``int(t)``, ``.cpu()``)
stalls the launch queue and breaks graph capture. :class:`HostSyncDetector` finds such reads; :class:`OpCounter`
counts what a step dispatches.

Static shapes are assumed: fixed batch size, 77 (or the config's) tokens, cached latents of one size. A batch of
another size (the short last batch of an epoch) compiles a second graph; sampling and validation stay eager.
"""
from __future__ import annotations

import collections
import importlib.util
import logging
import os
import shutil
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ldm.errors import UserError

logger = logging.getLogger(__name__)

COMPILE_CHOICES = ("auto", "off", "unet", "all")
# aten ops whose result the host must wait for: a scalar read, data-dependent truth values and output shapes
SYNC_OPS = frozenset({"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "unique", "_unique2", "item"})


class CompileSettingError(UserError, ValueError):
    """A ``model.params.compile`` value that is not one of the choices; ``str()`` is a one-line message."""


@dataclass(frozen=True)
class CompileOptions:
    """What ``model.params.compile`` / ``compile_mode`` / ``compile_backend`` ask for.

    ``compile``: ``auto`` (the default: the UNet compiled on CUDA, nothing on other devices, where inductor's
    compile time dominates short runs and there is no launch overhead to win), ``off``/``false``, ``unet``/``true``
    (the denoiser's forward, hence its backward), ``all`` (also the text encoder's transformer).
    ``mode``: inductor's mode, e.g. ``reduce-overhead`` for CUDA graphs, ``max-autotune``; None is its default.
    """

    setting: str = "auto"
    mode: str | None = None
    backend: str = "inductor"

    @classmethod
    def from_config(cls, setting: Any = "auto", mode: str | None = None, backend: str = "inductor") -> "CompileOptions":
        if setting is None or setting is True or setting is False:
            setting = {None: "auto", True: "unet", False: "off"}[setting]
        setting = str(setting).lower()
        setting = {"true": "unet", "false": "off", "none": "off"}.get(setting, setting)
        if setting not in COMPILE_CHOICES:
            raise CompileSettingError(f"model.params.compile must be one of {', '.join(COMPILE_CHOICES)} (or true/false), not '{setting}'")
        return cls(setting, mode or None, backend)

    def targets(self, device: torch.device) -> tuple[str, ...]:
        """Which parts to compile on ``device``."""
        if self.setting == "auto":
            missing = missing_for_inductor() if self.backend == "inductor" else None
            if device.type == "cuda" and missing:
                logger.warning("compile auto: training eagerly, %s (model.params.compile=unet forces compiling)", missing)
            return ("unet",) if device.type == "cuda" and not missing else ()
        return {"off": (), "unet": ("unet",), "all": ("unet", "text")}[self.setting]


def missing_for_inductor() -> str | None:
    """What inductor's GPU code generation lacks here (Triton, or the C compiler Triton builds its launcher with)."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if not any(shutil.which(cc) for cc in (os.environ.get("CC", "gcc"), "gcc", "cc", "clang")):
        return "no C compiler (gcc, cc or clang) on the PATH"
    return None


def compile_training_step(model: Any, options: CompileOptions) -> tuple[str, ...]:
    """Compile the parts ``options`` name for ``model``'s device (an earlier compiled denoiser is dropped); returns
    what was compiled.

    The denoiser is compiled as a separate callable that only the training step uses (see
    :func:`training_denoiser`): module paths and state-dict keys stay as they are, and samplers and validation,
    whose batch sizes differ, keep running eagerly instead of recompiling. The text encoder's transformer is
    compiled in place (``nn.Module.compile``), so every use of it goes through the compiled code.
    """
    targets = options.targets(model.device)
    kwargs: dict[str, Any] = {"backend": options.backend, "dynamic": False, "fullgraph": False}
    if options.mode is not None:
        kwargs["mode"] = options.mode
    model.__dict__.pop("_compiled_denoiser", None)
    if "unet" in targets:
        model.__dict__["_compiled_denoiser"] = torch.compile(model.model, **kwargs)
    if "text" in targets:
        text = getattr(model.cond_stage_model, "transformer", None)
        if text is None:
            logger.warning("compile 'all': the text encoder %s has no transformer to compile; only the UNet is compiled",
                           type(model.cond_stage_model).__name__)
        else:
            text.compile(**kwargs)
    if targets:
        logger.info("torch.compile (%s%s) on %s: %s", options.backend, f", mode {options.mode}" if options.mode else "", model.device, ", ".join(targets))
    return targets


def training_denoiser(model: Any) -> Callable[..., Any]:
    """The compiled denoiser while training (with gradients), the plain module otherwise."""
    compiled = model.__dict__.get("_compiled_denoiser")
    if compiled is not None and model.training and torch.is_grad_enabled():
        return compiled
    return model.model


def make_adamw(params: list, **kwargs: Any) -> torch.optim.AdamW:
    """AdamW as one fused kernel where PyTorch has it for the parameters' device (CUDA, CPU).

    Fused AdamW keeps its step count on the device (the for-each and single-tensor forms read it on the host every
    step) and takes a GradScaler's inf flag as a tensor, so an fp16 step needs no host synchronisation either.
    """
    flat = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    fusable = bool(flat) and all(p.is_floating_point() and p.device.type in ("cuda", "cpu") for p in flat)
    return torch.optim.AdamW(params, fused=fusable or None, **kwargs)


class HostFlag:
    """A boolean device tensor read on the host without waiting for the device.

    :meth:`publish` starts a non-blocking copy into host memory; :meth:`read` returns the value of the last copy
    if it has finished (on CUDA an event tells) and None otherwise; :meth:`exchange` does both. Looking at it every N
    steps therefore costs no synchronisation; :meth:`read_now` waits, for the end of training.
    """

    def __init__(self) -> None:
        self.host: torch.Tensor | None = None
        self.event: Any = None
        self.published = False

    def publish(self, value: torch.Tensor) -> None:
        if self.host is None:
            self.host = torch.ones((), dtype=torch.bool, pin_memory=value.is_cuda)
        self.host.copy_(value.detach(), non_blocking=value.is_cuda)
        self.event = torch.cuda.Event() if value.is_cuda else None
        if self.event is not None:
            self.event.record()
        self.published = True

    def read(self) -> bool | None:
        if not self.published or (self.event is not None and not self.event.query()):
            return None
        return bool(self.host.numpy())  # host memory: a plain read, not a device synchronisation

    def exchange(self, value: torch.Tensor) -> bool | None:
        """Publish ``value``; return the newest value on the host without waiting (on a CPU, ``value`` itself)."""
        previous = self.read()
        self.publish(value)
        return previous if self.event is not None else self.read()

    def read_now(self, value: torch.Tensor) -> bool:
        self.publish(value)
        if self.event is not None:
            self.event.synchronize()
        return bool(self.read())


class HostSyncDetector(TorchDispatchMode):
    """Records every dispatched op that makes the host wait for the device, with where it came from.

    Flags the scalar and data-dependent reads of :data:`SYNC_OPS` and blocking copies between host and device. On a
    CPU every tensor is host memory, so every scalar read of a tensor counts: the step must read host values
    (dataloader indices, token ids) as Python numbers, which is also what keeps them off the device's queue on a GPU.
    """

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SYNC_OPS or (name in ("_to_copy", "copy_") and _blocking_transfer(name, args, kwargs)):
            self.syncs.append((str(func), "".join(traceback.format_stack(limit=24)[:-2])))
        return func(*args, **kwargs)

    def report(self) -> str:
        return "\n".join(f"{op} at\n{where}" for op, where in self.syncs)


def _blocking_transfer(name: str, args: tuple, kwargs: dict) -> bool:
    """A copy between the host and a device that the host waits for (``non_blocking=False``)."""
    if name == "copy_":
        src_type, dst_type = args[1].device.type, args[0].device.type
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
    else:
        target = kwargs.get("device")
        src_type, dst_type = args[0].device.type, (torch.device(target).type if target is not None else args[0].device.type)
        non_blocking = kwargs.get("non_blocking", False)
    return src_type != dst_type and not non_blocking


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched (on a GPU, roughly the kernels launched), in total and per op.

    A compiled graph dispatches its fused kernels below the dispatcher, so only the ops it runs eagerly (and the
    graph breaks around it) are counted: the difference to the eager count is what compilation removed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())
