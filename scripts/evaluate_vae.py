"""How well a shapes autoencoder keeps what the judge reads, and the ``scale_factor`` its latents call for.

    python scripts/evaluate_vae.py --config configs/shapes/shapes-vae-train.yaml --ckpt models/shapes-vae/vae.ckpt

Renders fresh shapes pictures (a seed the training data never used), passes them through the autoencoder
(``decode(encode(x).mode())``, as inversion and generation use it) and reports, as JSON: the mean absolute pixel
error (0-255 units) and the judge's accuracy per attribute on the originals and on the reconstructions, for all
pictures and for the held-out orange cross alone (the diffusion models' data never show it; the autoencoder's
data neither), and the standard deviation of the latents with ``1 / std``: Stable Diffusion's ``scale_factor``
(0.18215) was chosen this way, so that the diffusion model sees latents of unit variance.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ldm.checkpoint import load_state_dict  # noqa: E402
from ldm.config import load_model_config  # noqa: E402
from ldm.data.shapes import random_scene, render, to_model_range  # noqa: E402
from ldm.data.shapes_judge import judge_batch, to_uint8  # noqa: E402
from ldm.errors import run_cli  # noqa: E402
from ldm.io import atomic_write_text  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

logger = logging.getLogger("evaluate_vae")
ATTRIBUTES = ("shape", "colour", "background")


def load_autoencoder(config_path: str, ckpt_path: str) -> torch.nn.Module:
    """The autoencoder of a training config with the weights of a training checkpoint or an exported file."""
    config = load_model_config(config_path, "--config")
    model = instantiate_from_config(config.model)
    state = load_state_dict(ckpt_path, what="--ckpt")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


def accuracy(pixels: np.ndarray, scenes: list) -> dict[str, float]:
    """Share of ``pixels`` (uint8 NHWC) in which the judge reads each attribute of its scene, and all three."""
    got = judge_batch(pixels)
    hits = {a: float(np.mean([getattr(g, a) == getattr(s, a) for g, s in zip(got, scenes)])) for a in ATTRIBUTES}
    hits["all"] = float(np.mean([all(getattr(g, a) == getattr(s, a) for a in ATTRIBUTES) for g, s in zip(got, scenes)]))
    return hits


@torch.no_grad()
def evaluate(model: torch.nn.Module, scenes: list, batch: int = 64) -> dict:
    """Pixel error and judge accuracy of ``scenes`` before and after the autoencoder, and the latents' std."""
    originals = np.stack([render(s) for s in scenes])
    recs, latents = [], []
    for start in range(0, len(scenes), batch):
        x = torch.tensor(np.stack([to_model_range(p) for p in originals[start:start + batch]])).permute(0, 3, 1, 2)
        z = model.encode(x).mode()
        latents.append(z)
        recs.append(to_uint8(model.decode(z)))
    rec = np.concatenate(recs)
    z = torch.cat(latents)
    return {
        "n": len(scenes),
        "mean_abs_error_0_255": float(np.abs(rec.astype(np.float32) - originals.astype(np.float32)).mean()),
        "judge_on_originals": accuracy(originals, scenes),
        "judge_on_reconstructions": accuracy(rec, scenes),
        "latent_shape": list(z.shape[1:]),
        "latent_std": float(z.std()),
        "latent_mean": float(z.mean()),
    }


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the autoencoder's training config")
    parser.add_argument("--ckpt", required=True, help="a training checkpoint (last.ckpt) or the exported file")
    parser.add_argument("--n", type=int, default=512, help="pictures of the whole world (default 512)")
    parser.add_argument("--n_held_out", type=int, default=128, help="orange-cross pictures (default 128)")
    parser.add_argument("--seed", type=int, default=2024, help="seed of the pictures (training used 0 and 100)")
    parser.add_argument("--out", help="also write the JSON here")
    opt = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = load_autoencoder(opt.config, opt.ckpt)
    rng = np.random.default_rng(opt.seed)
    world = [random_scene(rng, holdout=frozenset()) for _ in range(opt.n)]
    held_out = [random_scene(rng, "cross", "orange", holdout=frozenset()) for _ in range(opt.n_held_out)]
    result = {"ckpt": opt.ckpt, "seed": opt.seed, "all": evaluate(model, world), "orange_cross": evaluate(model, held_out)}
    result["scale_factor"] = 1.0 / result["all"]["latent_std"]
    text = json.dumps(result, indent=2)
    logger.info("%s", text)
    if opt.out:
        atomic_write_text(opt.out, text + "\n")


if __name__ == "__main__":
    run_cli(main)
