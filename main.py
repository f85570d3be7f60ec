"""Textual inversion (and plain LDM training) with PyTorch Lightning: the original's command line, on Lightning 2.

    python main.py --base configs/latent-diffusion/txt2img-1p4B-finetune.yaml -t --actual_resume MODEL.ckpt \
        -n RUN --gpus 0, --data_root DIR --init_word WORD

This file only wires things together: command line -> merged config -> model, data, Trainer and callbacks. The
pieces live under ``ldm/train/``; the config-facing names ``main.DataModuleFromConfig`` and ``main.ImageLogger``
are re-exported here (imported on first use). Lightning, torch and the models are imported only once the command
line has been parsed, so ``--help`` and argument errors answer at once.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import pdb
import shlex
import signal
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from ldm.config import check_target_params
from ldm.errors import ConfigError, run_cli
from ldm.train.cli import check_accelerator, count_devices, get_parser, load_configs, parse_devices, resolve_run, split_unknown

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from ldm.train.cli import RunPaths

__all__ = ["DataModuleFromConfig", "ImageLogger", "main"]

logger = logging.getLogger("main")

# Lightning messages that every run would print, each answered by design (see silence_expected_warnings).
EXPECTED_WARNINGS = (
    r".*module\(s\) in eval mode.*",  # the frozen parts stay in eval mode on purpose
    r".*isinstance\(treespec, LeafSpec\).*",
    r".*Checkpoint directory .* exists and is not empty.*",  # -r resumes into the run's own checkpoint folder
    r".*`validation_step` but have no `val_dataloader`.*",  # inversion configs have no validation set
)


class _DropLightningTips(logging.Filter):
    """Lightning's "💡 Tip" advertisements (litlogger, litmodels) on every run: not about this run, so dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip")


_DROP_TIPS = _DropLightningTips()


def __getattr__(name: str) -> Any:
    """``main.DataModuleFromConfig`` and ``main.ImageLogger``, the names the original configs use as targets."""
    if name == "DataModuleFromConfig":
        from ldm.train.data import DataModuleFromConfig

        return DataModuleFromConfig
    if name == "ImageLogger":
        from ldm.train.callbacks import ImageLogger

        return ImageLogger
    raise AttributeError(f"module 'main' has no attribute '{name}'")


def trainer_settings(opt: Any, extra: dict[str, Any], lightning_config: Any) -> tuple[dict[str, Any], int]:
    """Trainer keyword arguments (config, then command line) and the number of devices for the learning rate."""
    settings = dict(OmegaConf.to_container(lightning_config.get("trainer", OmegaConf.create()), resolve=True))
    if opt.gpus is not None and str(opt.gpus).strip():
        devices = parse_devices(opt.gpus)
        settings.update(accelerator="gpu", devices=devices)
        if count_devices(devices) > 1:
            settings.setdefault("strategy", "ddp")
    for key in ("accelerator", "devices", "strategy", "num_nodes", "max_steps", "max_epochs", "accumulate_grad_batches", "precision",
                "check_val_every_n_epoch", "limit_val_batches", "log_every_n_steps"):
        value = getattr(opt, key)
        if value is not None:
            settings[key] = parse_devices(value) if key == "devices" else value
    settings.update(extra)
    check_accelerator(settings, opt.gpus)
    settings.setdefault("max_steps", -1)
    if settings["max_steps"] in (-1, None) and settings.get("max_epochs") is None:
        raise ConfigError("the config sets no max_steps (the style configs do not); pass --max_steps N, e.g. --max_steps 5000")
    return settings, count_devices(settings.get("devices", 1))


def personalize(config: Any, opt: Any) -> None:
    """Apply --actual_resume, --embedding_manager_ckpt, --placeholder_string, --init_word and --data_root."""
    params = config.model.params
    if opt.actual_resume:
        params.ckpt_path = opt.actual_resume
    if "personalization_config" in params:
        pers = params.personalization_config.setdefault("params", {})
        pers.embedding_manager_ckpt = opt.embedding_manager_ckpt
        if opt.placeholder_string:
            pers.placeholder_strings = [opt.placeholder_string]
        if opt.init_word:
            words = list(pers.get("initializer_words", None) or [])
            pers.initializer_words = [opt.init_word] + words[1:]
    data = config.get("data", None)
    if data is None:
        return
    for split in ("train", "validation", "test"):
        node = data.params.get(split, None)
        if node is None:
            continue
        node.setdefault("params", {})
        if opt.data_root:
            node.params.data_root = opt.data_root
        if opt.placeholder_string:
            node.params.placeholder_token = opt.placeholder_string  # the original kept "*" in the captions


def resume_command(run: RunPaths, opt: Any) -> str:
    """The command that resumes ``run`` (for the messages of an interrupted run)."""
    words = ["python", "main.py", "-r", str(run.logdir), "-t"]
    if opt.actual_resume:
        words += ["--actual_resume", opt.actual_resume]
    if opt.data_root:
        words += ["--data_root", opt.data_root]
    if opt.seed != get_parser().get_default("seed"):
        words += ["-s", str(opt.seed)]
    return shlex.join(words)


def default_callbacks(run: Any, opt: Any, config: Any, lightning_config: Any, resume: bool, stops: Any) -> list[pl.Callback]:
    import pytorch_lightning as pl

    from ldm.train.callbacks import EmbeddingRescue, ImageLogger, LossCurve, SetupCallback, progress_display
    from ldm.train.monitoring import EmbeddingMonitor
    from ldm.train.resume import StopAtStepEnd
    from ldm.util import instantiate_from_config

    callbacks: list[pl.Callback] = [
        SetupCallback(resume, run.now, str(run.logdir), str(run.ckptdir), str(run.cfgdir), config, lightning_config),
        pl.callbacks.LearningRateMonitor(logging_interval="step"),
        progress_display(on_gpu=lightning_config.trainer.get("accelerator") in ("gpu", "cuda")),
        EmbeddingRescue(str(run.ckptdir), resume_command(run, opt)),
        LossCurve(),
    ]
    # one last.ckpt, replaced in place (EmbeddingRescue writes it too at the end; a counter would add last-v1.ckpt, ...)
    ckpt_params = {"dirpath": str(run.ckptdir), "filename": "{epoch:06}", "verbose": True, "save_last": True, "enable_version_counter": False}
    ckpt_params.update(OmegaConf.to_container(lightning_config.get("modelcheckpoint", {}).get("params", {}), resolve=True))
    callbacks.append(pl.callbacks.ModelCheckpoint(**ckpt_params))
    configured = lightning_config.get("callbacks", {})
    for name, cfg in configured.items():
        callbacks.append(instantiate_from_config(cfg))
    if "image_logger" not in configured:
        callbacks.append(ImageLogger(batch_frequency=750, max_images=4, clamp=True))
    if "personalization_config" in config.model.params and not any(isinstance(cb, EmbeddingMonitor) for cb in callbacks):
        callbacks.append(EmbeddingMonitor())  # norms, nearest words, and the function-word warning
    # last (ModelCheckpoint aside, which Lightning puts after it): a stop saves once every callback has seen the step
    callbacks.append(StopAtStepEnd(stops, str(run.ckptdir), resume_command(run, opt)))
    return callbacks


@contextlib.contextmanager
def signal_handlers(stops: Any) -> Iterator[None]:
    """Ctrl-C and SIGTERM through ``stops`` (:class:`ldm.train.resume.StopRequests`: during training, a stop at the
    end of the step with a checkpoint; otherwise at once, saving the embedding); the previous handlers afterwards."""
    previous = stops.install()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def check_actual_resume(opt: Any, config: Any) -> None:
    needs_weights = "personalization_config" in config.model.params
    if needs_weights and not config.model.params.get("ckpt_path"):
        raise ConfigError("--actual_resume is required: the pretrained model checkpoint to invert against")


def build_model(config: Any, opt: Any) -> Any:
    """The model of ``config.model``; a textual-inversion model is also given what its embedding files record."""
    from ldm.data.images import list_image_files
    from ldm.util import instantiate_from_config

    if "personalization_config" not in config.model.params:
        return instantiate_from_config(config.model)
    provenance = {
        "seed": opt.seed, "config": config, "base_model": config.model.params.get("ckpt_path") or None,
        "data_files": list_image_files(opt.data_root) if opt.data_root else [],
    }
    return instantiate_from_config(config.model, embedding_provenance=provenance)


@contextlib.contextmanager
def debugging(opt: Any, run: RunPaths) -> Iterator[None]:
    """``-d/--debug``, as the original: an error opens the post-mortem debugger (pdb) at the failing frame, and a new
    run's folder is moved to ``<logdir>/debug_runs/`` at the end, so trial runs stay apart from real ones."""
    if not opt.debug:
        yield
        return
    try:
        yield
    except Exception:
        pdb.post_mortem()
        raise
    finally:
        from pytorch_lightning.utilities import rank_zero_only

        if not opt.resume and rank_zero_only.rank == 0 and run.logdir.exists():
            target = run.logdir.parent / "debug_runs" / run.logdir.name
            target.parent.mkdir(parents=True, exist_ok=True)
            run.logdir.rename(target)
            logger.info("debug run moved to %s", target)


def check_placeholder_words(config: Any) -> None:
    """Refuse a placeholder or init word the config's tokenizer does not know before the model is built (minutes
    for the real models); the EmbeddingManager checks the same again."""
    from ldm.modules.placeholders import check_personalization

    encoder = OmegaConf.select(config, "model.params.cond_stage_config")
    pers = OmegaConf.select(config, "model.params.personalization_config.params")
    # SDXL: the text encoders among the conditioner's embedders
    embedders = OmegaConf.select(config, "model.params.conditioner_config.params.emb_models") or []
    encoders = [encoder] + [e for e in embedders if isinstance(e, DictConfig) and e.get("input_key") == "txt"]
    for each in encoders:
        if isinstance(each, DictConfig) and isinstance(pers, DictConfig):
            check_personalization(each, pers)


def silence_expected_warnings() -> None:
    """Lightning's warnings that every run would show, though each is intended (see :data:`EXPECTED_WARNINGS`), and
    its tips."""
    for pattern in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DROP_TIPS)  # added once however often called


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line (``--help`` answers here, before any heavy import), then train or test."""
    opt, unknown = get_parser().parse_known_args(argv)
    run_cli(lambda: train_or_test(opt, unknown))


def train_or_test(opt: Any, unknown: list[str]) -> None:
    """Everything after parsing: config, checks, model, data, Trainer; fit (with -t) and test (when configured)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    silence_expected_warnings()
    # configs may name classes of the folder the command runs in (as upstream LDM's main.py allowed)
    sys.path.insert(0, os.getcwd())
    dotlist, extra = split_unknown(unknown)
    if opt.resume_from_checkpoint:
        opt.resume = opt.resume_from_checkpoint
    run = resolve_run(opt)
    with debugging(opt, run):
        fit(opt, run, dotlist, extra)


def fit(opt: Any, run: RunPaths, dotlist: list[str], extra: dict[str, Any]) -> None:
    """Build the config, model, data and Trainer of ``run``, then train (``-t``) and test."""
    config = load_configs(run.resumed_configs + list(opt.base), dotlist)
    check_target_params(config)
    lightning_config = config.pop("lightning", OmegaConf.create())
    personalize(config, opt)
    check_actual_resume(opt, config)
    check_placeholder_words(config)
    from ldm.data.images import validate_image_folder

    if opt.data_root:
        validate_image_folder(opt.data_root, OmegaConf.select(config, "data.params.train.params.size"))
    elif "personalization_config" in config.model.params and opt.train:
        raise ConfigError("--data_root is required: the folder of the concept's images")
    os.environ.setdefault("TI_RUN_DIR", str(run.logdir))
    import pytorch_lightning as pl
    import torch

    from ldm.train.callbacks import AtomicCheckpointIO
    from ldm.train.monitoring import run_loggers
    from ldm.util import instantiate_from_config

    torch.set_float32_matmul_precision("high")
    pl.seed_everything(opt.seed, workers=True)

    settings, ngpu = trainer_settings(opt, extra, lightning_config)
    lightning_config.trainer = settings
    model = build_model(config, opt)
    data = instantiate_from_config(config.data) if "data" in config else None
    from ldm.train.resume import StopRequests

    stops = StopRequests()
    callbacks = default_callbacks(run, opt, config, lightning_config, bool(run.resume_ckpt), stops)
    trainer = pl.Trainer(callbacks=callbacks, logger=run_loggers(run.logdir), default_root_dir=str(run.logdir), plugins=[AtomicCheckpointIO()], **settings)
    if data is not None:
        data.setup()
        for name, dataset in data.datasets.items():
            logger.info("%s, %s, %d", name, type(dataset).__name__, len(dataset))

    base_lr = config.model.base_learning_rate
    bs = config.data.params.batch_size if data is not None else 1
    accumulate = settings.get("accumulate_grad_batches", 1) or 1
    nodes = settings.get("num_nodes", 1) or 1
    if opt.scale_lr:
        model.learning_rate = accumulate * ngpu * nodes * bs * base_lr
        logger.info(
            "Setting learning rate to %.2e = %d (accumulate_grad_batches) * %d (num_gpus) * %d (batchsize) * %.2e (base_lr)",
            model.learning_rate, accumulate, ngpu * nodes, bs, base_lr,
        )
    else:
        model.learning_rate = base_lr
        logger.info("++++ NOT USING LR SCALING ++++\nSetting learning rate to %.2e", model.learning_rate)

    from ldm.checkpoint import numpy_scalars_allowed

    with signal_handlers(stops):
        if opt.train:
            safe = {"weights_only": True} if "weights_only" in inspect.signature(trainer.fit).parameters else {}  # Lightning >= 2.6
            with numpy_scalars_allowed():  # checkpoints of scheduled runs written before the scheduler returned floats
                trainer.fit(model, data, ckpt_path=str(run.resume_ckpt) if run.resume_ckpt else None, **safe)
        if not opt.no_test and not trainer.interrupted and data is not None and data.has("test"):
            trainer.test(model, data)
    if trainer.is_global_zero and opt.train:
        if getattr(model, "embedding_manager", None) is not None:
            logger.info("Done. Embedding: %s  Images: %s", run.ckptdir / "embeddings.pt", run.logdir / "images")
        else:  # a model trained from scratch (configs/shapes/shapes-*-train.yaml): no embedding file
            logger.info("Done. Checkpoint: %s  Images: %s", run.ckptdir / "last.ckpt", run.logdir / "images")


if __name__ == "__main__":
    main()
