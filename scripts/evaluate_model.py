"""Evaluate a learned embedding: exactly, with the shapes judge (``--mode judge``), or with CLIP (``--mode clip``).

Judge mode (default; the shipped shapes model and its inversion of the orange cross)::

    python scripts/evaluate_model.py --embedding_path logs/<run>/checkpoints/embeddings.pt

prints reconstruction and editability of ``*`` and of the word baselines (the init word, "orange cross",
"orange shape", the best single word), optionally the base model's prompt accuracy (``--base_samples N``), and writes
``judge_results.json`` and ``reconstruction_vs_editability.png`` to ``--outdir``. Several embeddings (e.g. 1, 2 and
4 vectors per token) can be given as ``LABEL=PATH``; each becomes a point of the plot.

CLIP mode (``evaluation.clip_eval``, loaded only in that mode): image similarity of samples of ``--prompt`` to the
images in ``--data_root``, and their text similarity to the prompt.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ldm.io import atomic_write_text  # noqa: E402

logger = logging.getLogger("evaluate_model")

SHAPES_CONFIG = "configs/shapes/shapes-ldm-inference.yaml"
SHAPES_CKPT = "models/shapes/model.ckpt"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("judge", "clip"), default="judge", help="exact shapes judge, or CLIP similarities")
    p.add_argument("--config", default=SHAPES_CONFIG, help="model config (inference, with personalization_config)")
    p.add_argument("--ckpt", default=SHAPES_CKPT, help="model checkpoint")
    p.add_argument("--embedding_path", nargs="*", default=[], help="embedding file(s), each PATH or LABEL=PATH")
    p.add_argument("--init_word", default="shape", help="the init word of the inversion (a baseline)")
    p.add_argument("--n_samples", type=int, default=64, help="samples per prompt")
    p.add_argument("--ddim_steps", type=int, default=20)
    p.add_argument("--scale", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--base_samples", type=int, default=0, help="judge mode: samples of named combinations (0: skip)")
    p.add_argument("--screen_samples", type=int, default=16, help="judge mode: samples per word when picking the best single word")
    p.add_argument("--no_baselines", action="store_true", help="judge mode: score only the learned word(s)")
    p.add_argument("--grid", help="judge mode: also write a picture grid (concept images from this folder, then "
                   "'a photo of a *' and its edits) as grid.png")
    p.add_argument("--outdir", default="outputs/evaluation")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data_root", help="clip mode: folder of the concept's images")
    p.add_argument("--prompt", default="a photo of *", help="clip mode: prompt to sample")
    p.add_argument("--clip_model", default="ViT-B/32", help="clip mode: CLIP model for the similarities")
    return p


def parse_embeddings(specs: list[str]) -> list[tuple[str, str]]:
    """``PATH`` or ``LABEL=PATH`` -> (label, path); a bare path is labelled by its parent run folder."""
    out = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep:
            label, path = Path(spec).parent.parent.name or Path(spec).stem, spec
        out.append((label, path))
    return out


def run_judge(opt: argparse.Namespace) -> dict:
    from tqdm import tqdm

    from evaluation.shapes_eval import SampleSettings, ShapesJudgeEvaluator, as_dict, baseline_scores, save_plot
    from ldm.inference import load_model_from_config

    outdir = Path(opt.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    embeddings = parse_embeddings(opt.embedding_path)
    first = embeddings[0][1] if embeddings else None
    model = load_model_from_config(opt.config, opt.ckpt, opt.device, embedding_path=first)
    settings = SampleSettings(opt.n_samples, opt.ddim_steps, opt.scale, opt.seed, opt.batch_size)
    results: dict = {"settings": vars(settings), "config": opt.config, "ckpt": opt.ckpt}
    with tqdm(unit="img", desc="sampling") as bar:
        evaluator = ShapesJudgeEvaluator(model, settings, progress=bar.update)
        if opt.base_samples:
            results["base_model"] = evaluator.base_accuracy(opt.base_samples, seed=opt.seed)
        points = {}
        learned = []
        for k, (label, path) in enumerate(embeddings):
            if k:
                model.embedding_manager.load(path)
            scores = evaluator.word_scores(f"learned '*' ({label})", "*")
            entry = {"label": label, "path": path, **as_dict([scores])[0]}
            if "&" in model.embedding_manager.string_to_token_dict:
                entry["two_concepts"] = evaluator.two_concepts("&")
                entry["pink_background"] = {"learned '&'": evaluator.background_share(" on a & background"),
                                            "background unmentioned": evaluator.background_share("")}
            learned.append(entry)
            points[label] = scores
            if opt.grid and not k:
                results["grid"] = str(write_grid(evaluator, opt.grid, outdir / "grid.png"))
        results["learned"] = learned
        if embeddings and not opt.no_baselines:
            rows = baseline_scores(evaluator, opt.init_word, opt.screen_samples)
            results["baselines"] = as_dict(rows)
            points.update({row.text: row for row in rows})
    if points:
        results["plot"] = str(save_plot(points, outdir / "reconstruction_vs_editability.png"))
    atomic_write_text(outdir / "judge_results.json", json.dumps(results, indent=2))
    print_table(results)
    print(f"results: {outdir / 'judge_results.json'}" + (f"  plot: {results['plot']}" if "plot" in results else ""))
    return results


def write_grid(evaluator, concept_dir: str, path: Path) -> Path:
    """Concept images, then rows of "a photo of a *", "... on a blue background", "... on a green background", and
    "... on a & background" when the embedding also defines "&"."""
    import numpy as np

    from evaluation.shapes_eval import EDIT_BACKGROUNDS, TEMPLATE, edit_prompt, save_grid
    from ldm.data.images import iter_readable_images

    concept = [np.asarray(img.resize((evaluator.side, evaluator.side))) for _, img in iter_readable_images(concept_dir)]
    backgrounds = list(EDIT_BACKGROUNDS)
    if "&" in evaluator.model.embedding_manager.string_to_token_dict:
        backgrounds.append("&")
    prompts = [TEMPLATE.format("*")] + [edit_prompt("*", b) for b in backgrounds]
    return save_grid(evaluator, prompts, path, concept_images=concept)


def print_table(results: dict) -> None:
    base = results.get("base_model")
    if base:
        print(f"base model, {base['n']} named combinations: all three attributes {base['all']:.1%} "
              f"(shape {base['shape']:.1%}, colour {base['colour']:.1%}, background {base['background']:.1%})")
    rows = results.get("learned", []) + results.get("baselines", [])
    if not rows:
        return
    print(f"{'word':<40} {'reconstruction':>15} {'editability':>12}  edits")
    for row in rows:
        edits = " ".join(f"{b} {v:.0%}" for b, v in row["edits"].items())
        print(f"{row['name']:<40} {row['reconstruction']:>15.1%} {row['editability']:>12.1%}  {edits}")
    for row in results.get("learned", []):
        if "two_concepts" in row:
            print(f"two concepts 'a photo of a * on a & background' ({row['label']}): {row['two_concepts']:.1%}")
        if "pink_background" in row:
            shares = ", ".join(f"{k} {v:.1%}" for k, v in row["pink_background"].items())
            print(f"pink background for 'a photo of a <colour> <shape> on a & background': {shares}")


def run_clip(opt: argparse.Namespace) -> dict:
    import numpy as np

    from evaluation.clip_eval import LDMCLIPEvaluator
    from ldm.data.images import iter_readable_images
    from ldm.inference import load_model_from_config

    if not opt.data_root or not opt.embedding_path:
        raise SystemExit("--mode clip needs --data_root (the concept's images) and --embedding_path")
    path = parse_embeddings(opt.embedding_path)[0][1]
    model = load_model_from_config(opt.config, opt.ckpt, opt.device, embedding_path=path)
    factor = int(getattr(model.first_stage_model, "factor", 2 ** int(getattr(model, "num_downs", 3))))
    side = int(model.image_size) * factor
    pictures = [np.asarray(img.resize((side, side)), dtype=np.float32) / 127.5 - 1.0 for _, img in iter_readable_images(opt.data_root)]
    src = torch.tensor(np.stack(pictures)).permute(0, 3, 1, 2).to(opt.device)
    evaluator = LDMCLIPEvaluator(opt.device, clip_model=opt.clip_model)
    image_sim, text_sim = evaluator.evaluate(model, src, opt.prompt, n_samples=opt.n_samples, n_steps=opt.ddim_steps)
    results = {"image_similarity": float(image_sim), "text_similarity": float(text_sim), "prompt": opt.prompt, "embedding": path}
    outdir = Path(opt.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(outdir / "clip_results.json", json.dumps(results, indent=2))
    print(f"image similarity {image_sim:.4f}  text similarity {text_sim:.4f}  ({outdir / 'clip_results.json'})")
    return results


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # tiny models run far faster on one CPU thread
    opt = build_parser().parse_args(argv)
    return run_clip(opt) if opt.mode == "clip" else run_judge(opt)


if __name__ == "__main__":
    main()
