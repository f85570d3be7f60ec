"""Export a Stable Diffusion checkpoint (v1, 2.x or SDXL) and its inference config to a diffusers pipeline folder.

``python scripts/convert_to_diffusers.py --config configs/stable-diffusion/v1-inference.yaml --ckpt model.ckpt
--out models/sd1-diffusers [--dtype float16]``

The folder opens offline with ``StableDiffusionPipeline.from_pretrained(out)`` (``StableDiffusionXLPipeline`` for
SDXL) and computes what our scripts compute from the same weights (see :mod:`ldm.diffusers_export`). A word learned
here loads into it with ``pipe.load_textual_inversion(".../checkpoints/learned_embeds.safetensors")``.

Needs diffusers (the ``peer`` extra: ``pip install -e .[peer]``); nothing else in the project does.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.checkpoint import CheckpointError, load_state_dict  # noqa: E402
from ldm.errors import ConfigError, run_cli  # noqa: E402
from ldm.inference import load_config  # noqa: E402

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Export a Stable Diffusion checkpoint to a diffusers pipeline folder.")
    p.add_argument("--config", required=True, help="the model's inference config (.yaml)")
    p.add_argument("--ckpt", "--ckpt_path", dest="ckpt", required=True, help="the model checkpoint (.ckpt or .safetensors)")
    p.add_argument("--out", required=True, help="the pipeline folder to write (must not exist yet)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weight dtype of the written files")
    return p.parse_args(argv)


def convert(opt: argparse.Namespace) -> Path:
    try:
        from ldm import diffusers_export
    except ImportError as err:
        raise ConfigError(f"exporting needs diffusers ({err.name} is missing): pip install -e .[peer]") from err
    config = load_config(opt.config)
    diffusers_export.model_family(config)
    if Path(opt.out).exists() and (not Path(opt.out).is_dir() or any(Path(opt.out).iterdir())):
        raise ConfigError(f"--out '{opt.out}' already exists; name a new folder")
    state = load_state_dict(opt.ckpt, what="--ckpt")
    try:
        pipeline = diffusers_export.diffusers_pipeline(config, state)
    except (KeyError, RuntimeError) as err:  # a missing key, or weights of other shapes than the config's
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint '{opt.ckpt}' does not fit config '{opt.config}' ({first}); pass the checkpoint's own --config") from err
    pipeline.to(dtype=DTYPES[opt.dtype])
    out = diffusers_export.export_pipeline(pipeline, opt.out)
    logger.info("wrote %s (%s, %s)", out, type(pipeline).__name__, opt.dtype)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    opt = parse_args(argv)
    run_cli(lambda: convert(opt))


if __name__ == "__main__":
    main()
