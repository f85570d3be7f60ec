"""Turn a training checkpoint of main.py into a small model file: EMA weights applied, plain ``{"state_dict": ...}``.

    python scripts/export_ema_weights.py --config configs/shapes/shapes-ldm-train.yaml \
        --ckpt logs/<run>/checkpoints/last.ckpt --out models/shapes/model.ckpt

The model is built from the training config and loaded through the real code path; with ``use_ema`` its EMA
weights are copied into the UNet (a model without EMA, e.g. the shapes autoencoder, is exported as trained). The
EMA copies, optimizer and loop state are dropped, and floating-point tensors are stored as float16 unless
``--float32`` (the model loads either into float32 parameters).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from ldm.checkpoint import atomic_torch_save, load_checkpoint  # noqa: E402
from ldm.config import load_model_config  # noqa: E402
from ldm.errors import run_cli  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

logger = logging.getLogger("export_ema_weights")


def ema_state_dict(config_path: str, ckpt_path: str, half: bool = True) -> tuple[dict[str, torch.Tensor], int]:
    """The model's state dict with the EMA weights in place (no ``model_ema.*``), and the checkpoint's global step."""
    checkpoint = load_checkpoint(ckpt_path, what="--ckpt")  # first: a bad file is reported before the model is built
    config = load_model_config(config_path, "--config")
    model = instantiate_from_config(config.model)
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    if getattr(model, "use_ema", False):  # an autoencoder (configs/shapes/shapes-vae-train.yaml) keeps no EMA
        model.model_ema.copy_to(model.model)
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("model_ema."):
            continue
        out[key] = value.half() if half and value.is_floating_point() else value.clone()
    return out, int(checkpoint.get("global_step", -1))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the training config of the run")
    parser.add_argument("--ckpt", required=True, help="the run's checkpoint (e.g. logs/<run>/checkpoints/last.ckpt)")
    parser.add_argument("--out", required=True, help="where to write the model file")
    parser.add_argument("--float32", action="store_true", help="keep float32 (default: float16, half the size)")
    opt = parser.parse_args(argv)
    state_dict, step = ema_state_dict(opt.config, opt.ckpt, half=not opt.float32)
    Path(opt.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"state_dict": state_dict, "global_step": step}, opt.out)
    size = Path(opt.out).stat().st_size / 2**20
    logger.info("wrote %s: %d tensors, global step %d, %.1f MiB", opt.out, len(state_dict), step, size)


if __name__ == "__main__":
    run_cli(main)
