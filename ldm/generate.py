"""The text-to-image command behind ``scripts/txt2img.py`` (LDM-1.4B) and ``scripts/stable_txt2img.py`` (SD v1, SD 2.x
and SDXL: pass their config with ``--config``; v or eps prediction as the config says, SDXL's size conditioning
(H, W), (0, 0), (H, W), an SDXL embedding file of any layout with ``--embedding_path``).

Both take the original flags; only their defaults differ (:data:`LDM_DEFAULTS`, :data:`SD_DEFAULTS`). Output as the
original: ``<outdir>/samples/NNNNN.png`` (counter continuing from the files already there) and, per prompt, a grid
``<outdir>/<prompt-with-dashes>-NNNN.png`` of all its rounds (characters other than letters, digits and ``-_.,+``, such as
the placeholders ``*`` and ``@``, become ``_``: the name needs no quoting) (one row per round unless ``--n_rows``). Every PNG
carries its generation record (:mod:`ldm.provenance`).

Differences from the original, all deliberate: PNG instead of JPEG; ``--from-file`` works (one grid per prompt, each
prompt sampled ``n_samples`` at a time); rounds are seeded ``seed, seed+1, ...`` with a generator of their own, so any
picture can be made again from the seed in its metadata (``--fixed_code`` reuses ``seed`` for every round); ``--C``
and ``--f`` default to the model's latent channels and downsampling; ``--H``/``--W`` to the model's own size (SD v1
and 2.x-base 512, 768-v 768, SDXL 1024, LDM-1.4B 256); ``--device`` picks CUDA when there is one.
Bad input (missing or wrong-family checkpoint, wrong-width embedding, unwritable ``--outdir``) ends with one line
and exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from ldm.data.images import make_grid
from ldm.inference import (
    LDM_CONFIG,
    SD_CONFIG,
    default_device,
    inference_scope,
    latent_factor,
    latent_shape,
    load_model_from_config,
    prompt_warnings,
    sample_images,
)
from ldm.provenance import GenerationRecord, save_png, short_hash
from ldm.errors import ConfigError, run_cli

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "a painting of a virus monster playing guitar"


@dataclass(frozen=True)
class ScriptDefaults:
    """What differs between the two original scripts."""

    ddim_steps: int
    n_iter: int
    size: int
    n_samples: int
    scale: float
    ckpt: str
    config: str
    precision: str | None  # None: autocast on CUDA, full elsewhere (see resolve_precision)
    ckpt_flags: tuple[str, ...]


LDM_DEFAULTS = ScriptDefaults(200, 1, 256, 4, 5.0, "/data/pretrained_models/ldm/text2img-large/model.ckpt", LDM_CONFIG, "full", ("--ckpt_path", "--ckpt"))
SD_DEFAULTS = ScriptDefaults(50, 2, 512, 3, 7.5, "models/ldm/stable-diffusion-v1/model.ckpt", SD_CONFIG, None, ("--ckpt", "--ckpt_path"))


def build_parser(defaults: ScriptDefaults, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--prompt", type=str, nargs="?", default=DEFAULT_PROMPT, help="the prompt; use the placeholder, e.g. 'a photo of *'")
    p.add_argument("--from-file", dest="from_file", type=str, help="read prompts from this file, one per line")
    p.add_argument("--outdir", type=str, nargs="?", default="outputs/txt2img-samples", help="output folder")
    p.add_argument("--skip_grid", action="store_true", help="do not save the grid of each prompt")
    p.add_argument("--skip_save", action="store_true", help="do not save the individual samples")
    p.add_argument("--ddim_steps", type=int, default=defaults.ddim_steps, help="number of sampling steps")
    p.add_argument("--plms", action="store_true", help="use the PLMS sampler instead of DDIM")
    p.add_argument("--fixed_code", action="store_true", help="the same start noise (seed) for every round")
    p.add_argument("--ddim_eta", type=float, default=0.0, help="DDIM eta (0.0: deterministic)")
    p.add_argument("--n_iter", type=int, default=defaults.n_iter, help="sampling rounds per prompt")
    p.add_argument("--H", type=int, default=None, help=f"image height in pixels (default: the model's size, e.g. {defaults.size})")
    p.add_argument("--W", type=int, default=None, help=f"image width in pixels (default: the model's size, e.g. {defaults.size})")
    p.add_argument("--C", type=int, default=None, help="latent channels (default: the model's)")
    p.add_argument("--f", type=int, default=None, help="downsampling factor (default: the model's autoencoder)")
    p.add_argument("--n_samples", type=int, default=defaults.n_samples, help="images per round (batch size)")
    p.add_argument("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")
    p.add_argument("--scale", type=float, default=defaults.scale, help="classifier-free guidance scale")
    p.add_argument("--config", type=str, default=defaults.config, help="model config")
    p.add_argument(*defaults.ckpt_flags, dest="ckpt", type=str, default=defaults.ckpt, help="model checkpoint")
    p.set_defaults(ckpt_flag=defaults.ckpt_flags[0])  # how error messages name the checkpoint option
    p.add_argument("--embedding_path", type=str, default=None, help="embedding file (original, A1111, diffusers or kohya)")
    p.add_argument("--seed", type=int, default=42, help="seed of the first round (round r uses seed + r)")
    p.add_argument("--precision", choices=["full", "autocast"], default=defaults.precision,
                   help="autocast: bf16 on the CPU, fp16 on CUDA (default: " + (defaults.precision or "autocast on CUDA, full on the CPU, "
                   "where bf16 autocast is slower") + ")")
    p.add_argument("--device", type=str, default=None, help="torch device (default: cuda if available, else cpu)")
    return p


def check_options(opt: argparse.Namespace) -> None:
    for name in ("n_samples", "n_iter", "ddim_steps", "H", "W"):
        if getattr(opt, name) is not None and getattr(opt, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(opt, name)}")
    if opt.plms and opt.ddim_eta != 0.0:
        raise ConfigError("--plms is deterministic: --ddim_eta must be 0")
    if opt.n_rows < 0:
        raise ConfigError("--n_rows must be 0 (one row per round) or more")


def read_prompts(opt: argparse.Namespace) -> list[str]:
    if not opt.from_file:
        return [opt.prompt]
    path = Path(opt.from_file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--from-file: cannot read '{path}' ({err.__class__.__name__}); pass a text file with one prompt per line") from err
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"--from-file: '{path}' holds no prompt; write one prompt per line")
    return prompts


def prepare_outdir(outdir: str) -> tuple[Path, Path, list[Path]]:
    """``outdir`` and its ``samples`` folder, created and checked to be writable before any model is loaded; and the
    folders this created (deepest first), which :func:`remove_if_empty` takes back when the run fails."""
    root = Path(outdir)
    samples = root / "samples"
    created = [d for d in (samples, *samples.parents) if not d.exists()]
    try:
        samples.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=samples):
            pass
    except OSError as err:
        remove_if_empty(created)
        raise ConfigError(f"--outdir: cannot write to '{root}' ({err.strerror or err.__class__.__name__}); choose a writable folder") from err
    return root, samples, created


def remove_if_empty(folders: Sequence[Path]) -> None:
    """Remove ``folders`` (deepest first) as long as each is empty: a failed run leaves no empty output folders."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def resolve_precision(precision: str | None, device: str) -> str:
    """``--precision`` as given, else ``autocast`` on CUDA (fp16 pays there) and ``full`` elsewhere: bf16 autocast on
    a CPU made SDXL generation several times slower than float32 (issue 20)."""
    if precision is not None:
        return precision
    return "autocast" if torch.device(device).type == "cuda" else "full"


def resolve_device(requested: str | None) -> str:
    device = requested or default_device()
    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise ConfigError(f"--device: '{device}' is not a torch device (e.g. cpu, cuda, cuda:1)") from err
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return device


_SLUG_KEEP = frozenset("-_.,+")


def prompt_slug(prompt: str) -> str:
    """The grid's file-name stem: spaces become dashes (as the original); every other character but letters, digits
    and ``-_.,+`` (the placeholders ``*``, ``@``, quotes, path separators, ...) an underscore, so the name needs no
    quoting in a shell; no leading dash or dot (an option, a hidden file)."""
    slug = "".join(c if c.isalnum() or c in _SLUG_KEEP else "_" for c in prompt.replace(" ", "-"))
    return slug.lstrip("-.")[:150] or "prompt"


def native_size(model: object) -> int:
    """The picture size a model was trained at: its latent size times the autoencoder's downsampling (SDXL: ``size``)."""
    size = getattr(model, "size", None)
    if size:
        return int(size)
    return int(model.image_size) * latent_factor(model)


def to_pil(image: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` in [0, 1] -> 8-bit RGB."""
    array = image.mul(255.0).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def generate(opt: argparse.Namespace) -> list[Path]:
    """Run the command for parsed options; returns the files written. A run that fails takes back the output folders
    it created while they are still empty."""
    check_options(opt)
    prompts = read_prompts(opt)
    outdir, sample_dir, created = prepare_outdir(opt.outdir)
    try:
        written = _generate(opt, prompts, outdir, sample_dir)
    except BaseException:
        remove_if_empty(created)
        raise
    print(f"Your samples are ready and waiting for you here:\n{outdir}\nEnjoy.")
    return written


def _generate(opt: argparse.Namespace, prompts: list[str], outdir: Path, sample_dir: Path) -> list[Path]:
    device = resolve_device(opt.device)
    opt.precision = resolve_precision(opt.precision, device)
    model = load_model_from_config(opt.config, opt.ckpt, device, opt.embedding_path, ckpt_flag=opt.ckpt_flag)
    opt.H, opt.W = opt.H or native_size(model), opt.W or native_size(model)
    latent_shape(model, opt.H, opt.W, opt.C, opt.f)  # a size that does not fit fails here, before any progress bar
    for prompt in prompts:
        for warning in prompt_warnings(model, prompt):
            logger.warning(warning)
    record_base = dict(
        sampler="plms" if opt.plms else "ddim", steps=opt.ddim_steps, scale=opt.scale, eta=opt.ddim_eta,
        width=opt.W, height=opt.H, model=str(opt.ckpt), model_hash=short_hash(opt.ckpt), config=str(opt.config),
        embedding=opt.embedding_path, embedding_hash=short_hash(opt.embedding_path), precision=opt.precision,
    )
    base_count = len(os.listdir(sample_dir))
    grid_count = len(os.listdir(outdir)) - 1
    written: list[Path] = []
    bars = sys.stderr.isatty()  # in a redirected log, a line per round instead of bars redrawn at every step
    with inference_scope(model, opt.precision, device):
        for p, prompt in enumerate(tqdm(prompts, desc="prompts", disable=len(prompts) == 1 or not bars)):
            rounds = []
            for r in tqdm(range(opt.n_iter), desc="Sampling", disable=not bars):
                seed = opt.seed if opt.fixed_code else opt.seed + r
                generator = torch.Generator(device=device).manual_seed(seed)
                started = time.perf_counter()
                images = sample_images(
                    model, opt.n_samples * [prompt], steps=opt.ddim_steps, eta=opt.ddim_eta, scale=opt.scale, H=opt.H,
                    W=opt.W, sampler=record_base["sampler"], generator=generator, C=opt.C, f=opt.f, verbose=bars,
                )
                if not bars:
                    logger.info("prompt %d/%d, round %d/%d: %d images in %.1f s", p + 1, len(prompts), r + 1, opt.n_iter,
                                len(images), time.perf_counter() - started)
                rounds.append(images.cpu())
                if opt.skip_save:
                    continue
                for i, image in enumerate(images):
                    record = GenerationRecord(prompt=prompt, seed=seed, batch_index=i, **record_base)
                    written.append(save_png(to_pil(image), sample_dir / f"{base_count:05}.png", record))
                    base_count += 1
            if not opt.skip_grid:
                grid = make_grid(torch.cat(rounds), nrow=opt.n_rows or opt.n_samples)
                record = GenerationRecord(prompt=prompt, seed=opt.seed, **record_base)
                written.append(save_png(to_pil(grid), outdir / f"{prompt_slug(prompt)}-{grid_count:04}.png", record))
                grid_count += 1
    return written


def main(defaults: ScriptDefaults, description: str, argv: Sequence[str] | None = None) -> None:
    """Entry point of both scripts: parse, generate, report bad input as one line (exit 2)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logger.setLevel(logging.INFO)  # this module's progress lines (without a terminal); other modules stay at warnings
    opt = build_parser(defaults, description).parse_args(argv)
    run_cli(lambda: generate(opt))
