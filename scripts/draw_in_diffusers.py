"""Learn here, draw there: a word learned by ``main.py`` drawn by diffusers' own ``StableDiffusionPipeline`` and by our
generation code from the same starting noise, both judged in the shapes world.

    python scripts/draw_in_diffusers.py --config configs/shapes/shapes-sd1-inference.yaml \
        --ckpt models/shapes-sd1/model.ckpt --embedding logs/<run>/checkpoints/learned_embeds.safetensors \
        --outdir outputs/draw_sd1 [--diffusers models/shapes-sd1-diffusers] [--samples 32] [--seed 0]

The word enters diffusers the way a user loads it, ``pipe.load_textual_inversion(<learned_embeds.safetensors>)``, into
a pipeline opened with ``from_pretrained`` from the diffusers folder of the same checkpoint (``--diffusers``; without
it the checkpoint is exported into ``<outdir>/diffusers`` first, as ``scripts/convert_to_diffusers.py`` does). Our side
reads the same file. The judge's prompts, "a photo of a *" and "a photo of a * on a blue/green background" (``*`` is
the file's token, ``<*>``, in diffusers' prompts), are sampled with DDIM (20 steps, eta 0, guidance 3) from one latent
noise tensor per sample, drawn from ``--seed`` and given to both stacks, so that any difference is the stacks' and not
the noise's.

Written into ``--outdir``: ``draw.json`` (per prompt and stack the share judged the concept, the largest difference of
the two stacks' prompt encodings and of their pictures, the settings) and ``grid.png`` (per prompt a row: our samples
on the left, diffusers' on the right). SD v1 and 2.x models; SDXL is not done here. Needs diffusers (``.[peer]``).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.errors import ConfigError, run_cli  # noqa: E402
from ldm.io import atomic_write_text  # noqa: E402

logger = logging.getLogger("draw_in_diffusers")

STEPS, SCALE = 20, 3.0  # the judge's sampling settings (evaluation.shapes_eval.SampleSettings)
EDIT_BACKGROUNDS = ("blue", "green")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Draw a word learned by main.py in diffusers' StableDiffusionPipeline and "
                                            "in our stack from the same noise; judge both.")
    p.add_argument("--config", required=True, help="the model's inference config (.yaml)")
    p.add_argument("--ckpt", required=True, help="the model checkpoint the word was learned on")
    p.add_argument("--embedding", required=True, help="the run's learned_embeds.safetensors")
    p.add_argument("--diffusers", default=None, help="the checkpoint's diffusers folder (default: exported into --outdir)")
    p.add_argument("--outdir", required=True)
    p.add_argument("--concept", default="orange:cross", metavar="COLOUR:SHAPE", help="what the word should draw")
    p.add_argument("--samples", type=int, default=32, help="samples per prompt and stack")
    p.add_argument("--grid", type=int, default=8, help="samples per prompt and stack in grid.png")
    p.add_argument("--seed", type=int, default=0)
    opt = p.parse_args(argv)
    if opt.samples < 1 or opt.grid < 1:
        p.error("--samples and --grid must be at least 1")
    return opt


def open_pipeline(opt: argparse.Namespace, config: Any) -> Any:
    """diffusers' pipeline from the folder (exported first when not given), with the word loaded its own way."""
    from diffusers import StableDiffusionPipeline

    from ldm.checkpoint import load_state_dict
    from ldm.diffusers_export import SDXL, diffusers_pipeline, export_pipeline, model_family

    if model_family(config) == SDXL:
        raise ConfigError(f"--config '{opt.config}' is an SDXL model; drawing there is done for SD v1/2.x only")
    folder = Path(opt.diffusers) if opt.diffusers else Path(opt.outdir) / "diffusers"
    if not (folder / "model_index.json").is_file():
        if opt.diffusers:
            raise ConfigError(f"--diffusers '{folder}' is not a diffusers pipeline folder; make one with scripts/convert_to_diffusers.py")
        export_pipeline(diffusers_pipeline(config, load_state_dict(opt.ckpt, what="--ckpt")), folder)
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.load_textual_inversion(str(opt.embedding))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def file_token(path: str) -> str:
    """The token the diffusers file stores its word under (what a diffusers prompt writes)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())
    if len(keys) != 1:
        raise ConfigError(f"--embedding '{path}' holds {len(keys)} tensors; pass one word's learned_embeds.safetensors")
    return keys[0]


def prompts(word: str) -> dict[str, str]:
    """The judge's prompts for ``word``: ``{"reconstruction": ..., "<background>": ...}``."""
    from evaluation.shapes_eval import TEMPLATE, edit_prompt

    return {"reconstruction": TEMPLATE.format(word), **{b: edit_prompt(word, b) for b in EDIT_BACKGROUNDS}}


@torch.no_grad()
def ours_draw(model: Any, prompt: str, noise: torch.Tensor, side: int, factor: int) -> np.ndarray:
    from ldm.data.shapes_judge import to_uint8
    from ldm.inference import sample_images

    with model.ema_scope():
        pictures = sample_images(model, [prompt] * len(noise), steps=STEPS, eta=0.0, scale=SCALE, H=side, W=side,
                                 f=factor, x_T=noise, verbose=False)
    return to_uint8(pictures * 2.0 - 1.0)


@torch.no_grad()
def theirs_draw(pipe: Any, prompt: str, noise: torch.Tensor, side: int) -> np.ndarray:
    out = pipe([prompt] * len(noise), height=side, width=side, num_inference_steps=STEPS, guidance_scale=SCALE, eta=0.0,
               latents=noise, output_type="np")  # the pipeline scales it by init_noise_sigma itself
    return np.clip(np.asarray(out.images) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def share(images: np.ndarray, shape: str, colour: str, background: str | None) -> float:
    from ldm.data.shapes_judge import judge_batch

    return float(np.mean([j.matches(shape, colour, background) for j in judge_batch(images)]))


def save_grid(rows: list[tuple[np.ndarray, np.ndarray]], path: Path, zoom: int = 3) -> Path:
    """Per prompt one row: ours, a gap, diffusers'."""
    from PIL import Image

    from ldm.data.images import save_image

    lines = []
    for ours, theirs in rows:
        gap = np.full((ours.shape[1], max(2, ours.shape[2] // 4), 3), 255, np.uint8)
        lines.append(np.concatenate([*ours, gap, *theirs], axis=1))
    grid = Image.fromarray(np.concatenate(lines, axis=0))
    return save_image(grid.resize((grid.width * zoom, grid.height * zoom), Image.Resampling.NEAREST), path)


def draw(opt: argparse.Namespace) -> dict:
    from ldm.data.shapes import COLOURS, SHAPES
    from ldm.inference import latent_factor, load_config, load_model_from_config

    colour, _, shape = opt.concept.partition(":")
    if colour not in COLOURS or shape not in SHAPES:
        raise ConfigError(f"--concept '{opt.concept}' is not COLOUR:SHAPE of the shapes world (e.g. orange:cross)")
    if not Path(opt.embedding).is_file() or Path(opt.embedding).suffix != ".safetensors":
        raise ConfigError(f"--embedding '{opt.embedding}' is not a .safetensors file; pass the run's checkpoints/learned_embeds.safetensors")
    config = load_config(opt.config)
    token = file_token(opt.embedding)
    pipe = open_pipeline(opt, config)
    model = load_model_from_config(config, opt.ckpt, "cpu", embedding_path=opt.embedding)
    placeholder = next(iter(model.embedding_manager.string_to_param_dict))
    factor = latent_factor(model)
    side = int(model.image_size) * factor
    noise = torch.randn((opt.samples, int(model.channels), side // factor, side // factor),
                        generator=torch.Generator().manual_seed(opt.seed))
    ours_prompts, their_prompts = prompts(placeholder), prompts(token)
    with torch.no_grad():
        mine = model.get_learned_conditioning(list(ours_prompts.values()))
        theirs = pipe.encode_prompt(list(their_prompts.values()), "cpu", 1, False)[0]
    result: dict[str, Any] = {
        "ckpt": str(opt.ckpt), "embedding": str(opt.embedding), "concept": opt.concept, "placeholder": placeholder,
        "diffusers_token": token, "samples": opt.samples, "seed": opt.seed, "steps": STEPS, "guidance": SCALE,
        "encoding_max_abs_diff": float((mine - theirs).abs().max()), "prompts": {},
    }
    rows = []
    for key in ours_prompts:
        background = None if key == "reconstruction" else key
        ours_pics = ours_draw(model, ours_prompts[key], noise, side, factor)
        their_pics = theirs_draw(pipe, their_prompts[key], noise, side)
        result["prompts"][key] = {
            "ours": {"prompt": ours_prompts[key], "share": share(ours_pics, shape, colour, background)},
            "diffusers": {"prompt": their_prompts[key], "share": share(their_pics, shape, colour, background)},
            "pixels_max_abs_diff": int(np.abs(ours_pics.astype(int) - their_pics.astype(int)).max()),
        }
        rows.append((ours_pics[: opt.grid], their_pics[: opt.grid]))
        logger.info("%s: ours %.0f%%, diffusers %.0f%%", their_prompts[key],
                    100 * result["prompts"][key]["ours"]["share"], 100 * result["prompts"][key]["diffusers"]["share"])
    for stack in ("ours", "diffusers"):
        got = result["prompts"]
        result[stack] = {"reconstruction": got["reconstruction"][stack]["share"],
                         "editability": float(np.mean([got[b][stack]["share"] for b in EDIT_BACKGROUNDS]))}
    out = Path(opt.outdir)
    save_grid(rows, out / "grid.png")
    atomic_write_text(out / "draw.json", json.dumps(result, indent=2) + "\n")
    logger.info("wrote %s and %s", out / "draw.json", out / "grid.png")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    opt = parse_args(argv)
    run_cli(lambda: draw(opt))


if __name__ == "__main__":
    main()
