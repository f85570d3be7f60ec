"""Judge-mode evaluation in the shapes world: the paper's reconstruction and editability, counted exactly.

For a learned word (``*``) and for word baselines, prompts are sampled with DDIM (eta 0, classifier-free guidance)
from a fixed seed, and every sample is read by :mod:`ldm.data.shapes_judge`:

* reconstruction: share of ``"a photo of a {word}"`` judged an orange cross;
* editability: share of ``"a photo of a {word} on a {blue|green} background"`` judged an orange cross on the asked
  background (the mean over the two backgrounds);
* two concepts: share of ``"a photo of a * on a & background"`` judged an orange cross on pink;
* the background concept alone: share of ``"a photo of a {colour} {shape} on a & background"`` drawn on pink,
  against the same prompts with the background left unmentioned (no word names pink);
* base model: for random named combinations ``"a photo of a {colour} {shape} on a {background} background"``, the
  share of samples whose three attributes all agree with the prompt (and each attribute alone).

Every prompt starts from the same noise (the seed), so words are compared on equal terms.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ldm.data.shapes import BACKGROUNDS, COLOURS, SHAPES, UNNAMED_BACKGROUND, allowed, describe
from ldm.data.images import save_image
from ldm.data.shapes_judge import Judgement, judge_batch, to_uint8
from ldm.inference import latent_factor, sample_images
from ldm.io import atomic_write

logger = logging.getLogger(__name__)

CONCEPT_SHAPE, CONCEPT_COLOUR = "cross", "orange"
EDIT_BACKGROUNDS = ("blue", "green")
TEMPLATE = "a photo of a {}"
SINGLE_WORDS = ("cross", "orange", "shape", "star", "square")


@dataclass
class SampleSettings:
    """How every prompt is sampled."""

    n_samples: int = 64
    steps: int = 20
    scale: float = 3.0
    seed: int = 0
    batch_size: int = 64


@dataclass
class WordScores:
    """Reconstruction and editability of one word (the learned placeholder or a baseline)."""

    name: str
    text: str
    reconstruction: float
    editability: float
    edits: dict[str, float] = field(default_factory=dict)


def edit_prompt(text: str, background: str) -> str:
    return f"{TEMPLATE.format(text)} on a {background} background"


class ShapesJudgeEvaluator:
    """Samples prompts from a loaded LatentDiffusion-family model (the LDM shapes model, SD v1/2.x, SDXL) and scores
    them with the judge."""

    def __init__(self, model: Any, settings: SampleSettings | None = None, progress: Callable[[int], None] | None = None) -> None:
        self.model = model
        self.settings = settings or SampleSettings()
        self.progress = progress
        # the first stage's downsampling: the LDM shapes model states it (space-to-depth), an autoencoder (the SD
        # family's) halves per level; reading only the stated one made SD models sample 8-pixel pictures
        self.factor = latent_factor(model)
        self.side = int(model.image_size) * self.factor

    def images(self, prompts: Sequence[str]) -> np.ndarray:
        """uint8 ``[len(prompts), H, W, 3]``; sample ``k`` of every call starts from the same noise."""
        s = self.settings
        out = []
        for start in range(0, len(prompts), s.batch_size):
            chunk = list(prompts[start : start + s.batch_size])
            generator = torch.Generator().manual_seed(s.seed * 1_000_003 + start)
            with torch.no_grad(), self.model.ema_scope():
                pictures = sample_images(self.model, chunk, steps=s.steps, eta=0.0, scale=s.scale, H=self.side,
                                         W=self.side, f=self.factor, generator=generator, verbose=False)
            out.append(to_uint8(pictures * 2.0 - 1.0))
            if self.progress is not None:
                self.progress(len(chunk))
        return np.concatenate(out)

    def judged(self, prompt: str, n: int | None = None) -> list[Judgement]:
        return judge_batch(self.images([prompt] * (n or self.settings.n_samples)))

    def share(self, prompt: str, background: str | None = None, n: int | None = None) -> float:
        """Share of samples of ``prompt`` judged an orange cross (on ``background`` when given)."""
        got = self.judged(prompt, n)
        return float(np.mean([j.matches(CONCEPT_SHAPE, CONCEPT_COLOUR, background) for j in got]))

    def word_scores(self, name: str, text: str) -> WordScores:
        """Reconstruction and editability of ``text`` standing for the concept."""
        edits = {b: self.share(edit_prompt(text, b), background=b) for b in EDIT_BACKGROUNDS}
        return WordScores(name, text, self.share(TEMPLATE.format(text)), float(np.mean(list(edits.values()))), edits)

    def best_single_word(self, words: Sequence[str] = SINGLE_WORDS, n: int | None = None) -> tuple[str, float]:
        """The word whose ``"a photo of a {word}"`` is most often an orange cross (a quick screen of ``n`` samples)."""
        scores = {w: self.share(TEMPLATE.format(w), n=n) for w in words}
        best = max(scores, key=scores.get)
        logger.info("single-word screen: %s", ", ".join(f"{w} {v:.2f}" for w, v in scores.items()))
        return best, scores[best]

    def two_concepts(self, second: str = "&") -> float:
        """Share of ``"a photo of a * on a & background"`` judged an orange cross on the pink background."""
        return self.share(f"{TEMPLATE.format('*')} on a {second} background", background=UNNAMED_BACKGROUND)

    def background_share(self, phrase: str, n: int | None = None, seed: int = 1) -> float:
        """Share of ``"a photo of a {colour} {shape}{phrase}"`` (random named objects) drawn on the pink background.

        ``phrase`` is e.g. ``" on a & background"`` for a learned background word, or ``""`` for the best words can
        do (no word names pink; an unmentioned background is pink only part of the time).
        """
        rng = np.random.default_rng(seed)
        objects = [(sh, c) for sh in SHAPES for c in COLOURS if allowed(sh, c, UNNAMED_BACKGROUND)]
        picks = [objects[k] for k in rng.integers(len(objects), size=n or self.settings.n_samples)]
        got = judge_batch(self.images([TEMPLATE.format(describe(sh, c, UNNAMED_BACKGROUND)) + phrase for sh, c in picks]))
        return float(np.mean([j.background == UNNAMED_BACKGROUND for j in got]))

    def base_accuracy(self, n: int, seed: int = 0) -> dict[str, Any]:
        """Prompt accuracy on ``n`` random named combinations (one sample each; held-out pairs excluded)."""
        rng = np.random.default_rng(seed)
        named = [b for b in BACKGROUNDS if b != UNNAMED_BACKGROUND]
        combos = [(s, c, b) for s in SHAPES for c in COLOURS for b in named if allowed(s, c, b)]
        picks = [combos[k] for k in rng.integers(len(combos), size=n)]
        got = judge_batch(self.images([TEMPLATE.format(describe(*p)) for p in picks]))
        result = {
            "all": float(np.mean([j.matches(*p) for j, p in zip(got, picks)])),
            "shape": float(np.mean([j.shape == p[0] for j, p in zip(got, picks)])),
            "colour": float(np.mean([j.colour == p[1] for j, p in zip(got, picks)])),
            "background": float(np.mean([j.background == p[2] for j, p in zip(got, picks)])),
            "n": n,
        }
        return result


def baseline_scores(evaluator: ShapesJudgeEvaluator, init_word: str = "shape", screen_samples: int = 16) -> list[WordScores]:
    """The word baselines: the init word, "orange cross", "orange shape", and the best single word."""
    baselines = [(f"init word '{init_word}'", init_word), ("words 'orange cross'", "orange cross"),
                 ("two words 'orange shape'", "orange shape")]
    best, _ = evaluator.best_single_word(n=screen_samples)
    baselines.append((f"best single word '{best}'", best))
    return [evaluator.word_scores(name, text) for name, text in baselines]


def save_grid(evaluator: ShapesJudgeEvaluator, prompts: Sequence[str], path: str | Path, n: int = 8,
              concept_images: Sequence[np.ndarray] = (), zoom: int = 3) -> Path:
    """One row of ``n`` samples per prompt (the concept images, if given, as a first row), upscaled ``zoom`` x."""
    from PIL import Image

    side = evaluator.side
    rows = []
    if len(concept_images):
        first = list(concept_images)[:n] + [np.zeros((side, side, 3), np.uint8)] * max(0, n - len(concept_images))
        rows.append(np.concatenate(first, axis=1))
    samples = evaluator.images([p for p in prompts for _ in range(n)])
    rows.extend(np.concatenate(list(samples[k * n : (k + 1) * n]), axis=1) for k in range(len(prompts)))
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    return save_image(grid.resize((grid.width * zoom, grid.height * zoom), Image.Resampling.NEAREST), path)


def save_plot(points: dict[str, WordScores], path: str | Path) -> Path:
    """Reconstruction against editability, one labelled point per word (the paper's Figure 9 layout)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    places: dict[tuple[float, float], list[str]] = {}
    for label, row in points.items():  # words at (nearly) the same place share one point and one legend entry
        places.setdefault((round(row.editability, 2), round(row.reconstruction, 2)), []).append(label)
    markers = "osD^vP*Xh<>"
    for k, ((x, y), labels) in enumerate(places.items()):
        ax.scatter(x, y, s=45, marker=markers[k % len(markers)], label=f"{', '.join(labels)} ({y:.0%}, {x:.0%})")
    ax.legend(title="word (reconstruction, editability)", fontsize=7, title_fontsize=7, loc="center right")
    ax.set_xlabel("editability (orange cross on the asked background)")
    ax.set_ylabel("reconstruction (orange cross)")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title("shapes world: learned word vs word baselines")
    fig.tight_layout()
    written = atomic_write(path, lambda temp: fig.savefig(temp, dpi=120, format="png"))
    plt.close(fig)
    return written


def as_dict(rows: Sequence[WordScores]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
