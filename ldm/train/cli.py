"""The command line of ``main.py``: the original's flags, the Trainer flags users pass, ``key=value`` config
overrides, and the run folder they lead to.

Lightning 2 has no ``Trainer.add_argparse_args``; the Trainer flags the original's users pass are declared here, and
any other ``--name value`` that names a ``Trainer`` argument is passed through too.
"""
from __future__ import annotations

import argparse
import glob
import inspect
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm.config import ConfigError, load_configs

__all__ = ["ConfigError", "check_accelerator", "count_devices", "get_parser", "load_configs", "parse_devices", "resolve_run", "split_unknown"]


def str2bool(v: str | bool) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError("Boolean value expected.")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Textual inversion: learn a word for a concept from a few images.")
    flag = dict(type=str2bool, nargs="?", const=True)
    parser.add_argument("-n", "--name", type=str, const=True, default="", nargs="?", help="postfix for the run folder")
    parser.add_argument("-r", "--resume", type=str, const=True, default="", nargs="?", help="resume from a run folder or its checkpoint")
    parser.add_argument("-b", "--base", nargs="*", metavar="base_config.yaml", default=[], help="configs, merged left to right")
    parser.add_argument("-t", "--train", default=False, help="train", **flag)
    parser.add_argument("--no-test", default=False, help="skip testing after training", **flag)
    parser.add_argument("-p", "--project", help="unused (kept for the original's command lines)")
    parser.add_argument("-d", "--debug", default=False, help="on an error, open the post-mortem debugger (pdb); move the new run folder to <logdir>/debug_runs", **flag)
    parser.add_argument("-s", "--seed", type=int, default=23, help="seed for seed_everything")
    parser.add_argument("-f", "--postfix", type=str, default="", help="postfix for the default name")
    parser.add_argument("-l", "--logdir", type=str, default="logs", help="folder of runs")
    parser.add_argument("--scale_lr", default=True, help="scale base-lr by ngpu * batch_size * n_accumulate", **flag)
    parser.add_argument("--datadir_in_name", default=True, help="prefix the run name with the data folder's name", **flag)
    parser.add_argument("--actual_resume", type=str, default="", help="pretrained model checkpoint (.ckpt or .safetensors)")
    parser.add_argument("--data_root", type=str, default="", help="folder of the concept's images")
    parser.add_argument("--embedding_manager_ckpt", type=str, default="", help="start from this embedding file")
    parser.add_argument("--placeholder_string", type=str, help="placeholder word (one token), '*' by default")
    parser.add_argument("--init_word", type=str, help="word whose embedding starts the optimisation")
    trainer = parser.add_argument_group("Trainer")
    trainer.add_argument("--gpus", type=str, default=None, help='GPU list "0," / "0,1" or a count "2"')
    trainer.add_argument("--accelerator", type=str, default=None, help="cpu, gpu, auto, ...")
    trainer.add_argument("--devices", type=str, default=None, help="devices for the accelerator: a count or a list")
    trainer.add_argument("--strategy", type=str, default=None, help="e.g. ddp")
    trainer.add_argument("--num_nodes", type=int, default=None)
    trainer.add_argument("--max_steps", type=int, default=None)
    trainer.add_argument("--max_epochs", type=int, default=None)
    trainer.add_argument("--accumulate_grad_batches", type=int, default=None)
    trainer.add_argument("--precision", type=str, default=None, help="32, bf16-mixed, 16-mixed, ...")
    trainer.add_argument("--check_val_every_n_epoch", type=int, default=None)
    trainer.add_argument("--limit_val_batches", type=float, default=None)
    trainer.add_argument("--log_every_n_steps", type=int, default=None)
    trainer.add_argument("--resume_from_checkpoint", type=str, default=None, help="a Lightning checkpoint to resume")
    return parser


def trainer_parameters() -> set[str]:
    """The keyword arguments of ``pytorch_lightning.Trainer`` (imported only here, when an extra option needs it)."""
    import pytorch_lightning as pl

    return set(inspect.signature(pl.Trainer.__init__).parameters)


def split_unknown(unknown: list[str]) -> tuple[list[str], dict[str, Any]]:
    """``key=value`` config overrides, and ``--name value`` pairs that name a Trainer argument."""
    dotlist, extra = [], {}
    i = 0
    while i < len(unknown):
        token = unknown[i]
        if token.startswith("--"):
            name, _, value = token[2:].partition("=")
            if name not in trainer_parameters():
                raise ConfigError(f"unknown option '--{name}'; see python main.py --help")
            if not value:
                i += 1
                if i >= len(unknown):
                    raise ConfigError(f"option '--{name}' needs a value")
                value = unknown[i]
            extra[name] = _parse_value(value)
        elif "=" in token:
            dotlist.append(token)
        else:
            raise ConfigError(f"unexpected argument '{token}'; config overrides are written key=value")
        i += 1
    return dotlist, extra


def _parse_value(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return str2bool(value) if value.lower() in ("true", "false") else value


@dataclass
class RunPaths:
    name: str
    now: str
    logdir: Path
    ckptdir: Path
    cfgdir: Path
    resume_ckpt: Path | None
    resumed_configs: list[str]


def resolve_run(opt: argparse.Namespace) -> RunPaths:
    """The run folder: ``<logdir>/<data folder><now>_<name><postfix>``, or the one being resumed."""
    now = time.strftime("%Y-%m-%dT%H-%M-%S")
    if opt.name and opt.resume:
        raise ConfigError("-n/--name cannot be combined with -r/--resume; resume keeps the run's name")
    if opt.resume:
        target = Path(opt.resume)
        if not target.exists():
            raise ConfigError(f"-r/--resume: '{target}' does not exist; pass a run folder (logs/<run>) or its checkpoint")
        if target.is_file():
            logdir, ckpt = target.parent.parent, target
        else:
            logdir, ckpt = target, target / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise ConfigError(f"-r/--resume: no checkpoint at '{ckpt}'; the run saved none yet (use --embedding_manager_ckpt)")
        configs = sorted(glob.glob(str(logdir / "configs" / "*.yaml")))
        return RunPaths(logdir.name, now, logdir, logdir / "checkpoints", logdir / "configs", ckpt, configs)
    if opt.name:
        name = "_" + opt.name
    elif opt.base:
        name = "_" + Path(opt.base[0]).stem
    else:
        name = ""
    prefix = Path(os.path.normpath(opt.data_root)).name if (opt.datadir_in_name and opt.data_root) else ""
    nowname = prefix + now + name + opt.postfix
    inherited = os.environ.get("TI_RUN_DIR")  # DDP ranks started by rank 0 reuse its folder
    logdir = Path(inherited) if inherited else Path(opt.logdir) / nowname
    return RunPaths(logdir.name, now, logdir, logdir / "checkpoints", logdir / "configs", None, [])


def parse_devices(value: str | int) -> Any:
    """A Trainer ``devices`` value from the command line: "0," / "0,3" -> [0] / [0, 3], "2" -> 2, "auto"."""
    text = str(value).strip()
    if "," in text:
        return [int(v) for v in text.split(",") if v.strip()]
    return "auto" if text == "auto" else int(text)


def count_devices(devices: Any) -> int:
    """How many devices a Trainer ``devices`` value means (for the learning-rate scaling)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    return devices if isinstance(devices, int) and devices > 0 else 1


def gpu_backends() -> dict[str, bool]:
    """Which of Lightning's GPU accelerators this machine has: ``cuda`` (NVIDIA/ROCm) and ``mps`` (Apple)."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    return {"cuda": torch.cuda.is_available(), "mps": bool(mps is not None and mps.is_available())}


def check_accelerator(settings: dict[str, Any], gpus: str | None) -> None:
    """Refuse a GPU accelerator on a machine without one, naming the flag and ``--accelerator cpu``, before the
    Trainer (and the model) is built: Lightning would only say "No supported gpu backend found!" in a traceback."""
    accelerator = str(settings.get("accelerator") or "").lower()
    if accelerator not in ("gpu", "cuda", "mps"):
        return
    backends = gpu_backends()
    if (backends["cuda"] or backends["mps"]) if accelerator == "gpu" else backends[accelerator]:
        return
    source = f"--gpus {gpus}" if gpus is not None and str(gpus).strip() else f"accelerator '{accelerator}' (--accelerator or the config)"
    kind = "Apple MPS" if accelerator == "mps" else "CUDA" if accelerator == "cuda" else "GPU (CUDA or Apple MPS)"
    raise ConfigError(f"{source}: this machine has no {kind} device; pass --accelerator cpu instead (and no --gpus) to train on the CPU")
