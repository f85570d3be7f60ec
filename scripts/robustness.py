"""How often does an inversion succeed? Runs ``main.py`` over seeds x picture sets, judges every learned word in the
shapes world, and writes the JSON, a markdown table and a plot.

    python scripts/robustness.py --concept orange_cross pink_background --seeds 1 2 3 4 5 \
        --sets shipped 1 103 104 --outdir outputs/robustness
    python scripts/robustness.py --concepts white:star yellow:square --sets 1 2 --seeds 1 2 3 \
        --outdir outputs/concepts
    python scripts/robustness.py --family sd1 --trainer ours peer peer-k --concept orange_cross \
        --seeds 1 2 3 4 5 --sets shipped 1 --outdir outputs/against_diffusers_sd1

* picture sets: ``shipped`` is the concept folder under ``models/shapes/concepts``; a number ``S`` is a new set of
  five pictures drawn by :func:`ldm.data.shapes.concept_scenes` with generator seed ``S`` (the shipped folders'
  parameters: size, offsets, backgrounds, caption files), written by this tool into ``<outdir>/sets`` (the same
  pictures on every machine);
* any concept of the world, ``--concepts COLOUR:SHAPE``: picture set ``S`` is drawn by
  :func:`ldm.data.shapes.concept_set` (each set its own size, offset direction and one to three named backgrounds,
  caption files naming them) and inverted with the orange cross's command (``*`` from "shape");
* runs: the shipped command of each concept (``configs/shapes/shapes-ldm-finetune.yaml``; the pink background adds
  ``background-templates.yaml`` and learns ``&`` from "white"), ``--seed`` per run, ``--jobs`` at a time, one torch
  thread each; extra ``key=value`` overrides after ``--`` are passed to every run, and ``--extra-config FILE`` is
  merged after each concept's configs (to compare remedies);
* judging (:mod:`evaluation.shapes_eval`, DDIM 20 steps, guidance 3, ``--samples`` per prompt):
  - orange cross ``*``: reconstruction = share of "a photo of a *" judged an orange cross; editability = share of
    "a photo of a * on a blue/green background" judged an orange cross on that background (mean of the two);
  - pink background ``&``: reconstruction = share of "a photo of a shape on a & background" drawn on pink;
    editability = share of "a photo of a <colour> <shape> on a & background" (random named objects) drawn on pink;
  - ``COLOUR:SHAPE`` ``*``: the same as the orange cross with its colour and shape, edited onto the two backgrounds
    of :func:`ldm.data.shapes.edit_backgrounds` (blue and green unless the shape or the pictures have them);
  - a run succeeds when reconstruction >= 90% and editability >= 85%.
* every start of a run (``BestOfRestarts`` saves them) is judged too, and scored by the override signals of
  :mod:`ldm.train.override` ("a photo of a * on a <background> background" over all named backgrounds), so that a
  rule choosing among starts can be measured afterwards (``details.starts`` in the JSON).

* models, ``--family ldm|sd1|sd2|sdxl`` (default ``ldm``, the shipped shapes LDM): the family's model
  ``models/shapes-<family>/model.ckpt`` (``--ckpt PATH`` for another file; the LDM's is ``models/shapes/model.ckpt``),
  judged with ``configs/shapes/shapes-<family>-inference.yaml`` and inverted with ``shapes-<family>-finetune.yaml``
  (the orange cross and ``--concepts``; the pink background is LDM-only). Runs of a family other than ``ldm`` are
  named ``..._<family>``;
* trainers, ``--trainer ours|peer|peer-k`` (one or more; default ``ours``): ``peer`` is diffusers' textual-inversion
  recipe as its README runs it (``scripts/peer_invert.py``: one vector from the init word, 3,000 updates of batch 1 x
  accumulation 4, lr 5e-4 scaled, AdamW, its templates and flips) on a diffusers folder exported once per family into
  ``<outdir>/diffusers-<family>``; ``peer-k`` is the same recipe with the finetune config's number of vectors.
  SD v1/2.x only (the peer's SDXL recipe is not re-created here). Its word is rewritten under ``*`` and judged
  exactly as ours; ``--peer-steps N`` shortens the peer for a quick look (the JSON and table say so). Each run
  records the wall time to its final word (the trainer's process, start to end), its steps (ours: batches of 4;
  the peer's: updates of 4 pictures) and seconds per step (wall / steps); runs are named ``..._<trainer>``
  (``..._<trainer>_steps<N>`` when ``--peer-steps`` shortens the peer).

A run whose ``result.json`` exists is not run again, so the command can be resumed and re-tabulated.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.sweep_report import (  # noqa: E402  (the tables and plot of a sweep; RunResult is its record)
    EDIT_MIN, RECON_MIN, SIGNALS, RunResult, markdown_table, peer_steps, plot, run_id, start_rows, starts_table, summary,
)

logger = logging.getLogger("robustness")

CKPT = "models/shapes/model.ckpt"
INFERENCE_CONFIG = "configs/shapes/shapes-ldm-inference.yaml"
FAMILIES = ("ldm", "sd1", "sd2", "sdxl")
TRAINERS = ("ours", "peer", "peer-k")


@dataclass(frozen=True)
class ModelFiles:
    """What a sweep needs of one model family: the weights, the config to judge with and the one to invert with."""

    family: str
    ckpt: str
    inference: str
    finetune: str


def model_files(family: str, ckpt: str | None = None) -> ModelFiles:
    """``models/shapes-<family>/model.ckpt`` (the LDM's ``models/shapes/model.ckpt``) unless ``ckpt`` is given, and
    the family's configs under ``configs/shapes``."""
    default = CKPT if family == "ldm" else f"models/shapes-{family}/model.ckpt"
    return ModelFiles(family, ckpt or default, f"configs/shapes/shapes-{family}-inference.yaml",
                      f"configs/shapes/shapes-{family}-finetune.yaml")


@dataclass(frozen=True)
class Sweep:
    """The settings every run of one command shares."""

    model: ModelFiles
    outdir: Path
    samples: int
    overrides: tuple[str, ...] = ()
    peer_steps: int = 3000


@dataclass(frozen=True)
class Concept:
    """How one shipped concept is inverted and judged."""

    name: str
    configs: tuple[str, ...]
    placeholder: str
    init_word: str
    colour: str | None = None  # set for a drawn concept (--concepts COLOUR:SHAPE)
    shape: str | None = None

    @property
    def key(self) -> str:
        """The concept in file names (``white-star``; a drawn orange cross does not share the shipped one's runs)."""
        return self.name.replace(":", "-")


CONCEPTS = {
    "orange_cross": Concept("orange_cross", ("configs/shapes/shapes-ldm-finetune.yaml",), "*", "shape"),
    "pink_background": Concept("pink_background", ("configs/shapes/shapes-ldm-finetune.yaml",
                                                   "configs/shapes/background-templates.yaml"), "&", "white"),
}


def drawn_concept(text: str) -> Concept:
    """``"white:star"`` as a concept inverted with the shipped command; ValueError naming the choices otherwise."""
    from ldm.data.shapes import COLOURS, SHAPES

    colour, _, shape = text.partition(":")
    if colour not in COLOURS or shape not in SHAPES:
        raise ValueError(f"'{text}' is not COLOUR:SHAPE with a colour of {', '.join(COLOURS)} and a shape of "
                         f"{', '.join(SHAPES)}")
    return Concept(f"{colour}:{shape}", CONCEPTS["orange_cross"].configs, "*", "shape", colour, shape)


def picture_folder(concept: Concept, picture_set: str, outdir: Path) -> Path:
    """The shipped folder, or a new set drawn with generator seed ``picture_set`` (written once, deterministic)."""
    if picture_set == "shipped":
        if concept.colour is not None:
            raise ValueError(f"{concept.name} has no shipped pictures; give --sets as generator seeds")
        return ROOT / "models/shapes/concepts" / concept.name
    from ldm.data.shapes import concept_filewords, concept_scenes, concept_set, write_concept

    folder = outdir / "sets" / f"{concept.key}_{picture_set}"
    if not (folder / "04.png").exists():
        if concept.colour is not None:
            scenes = concept_set(concept.colour, concept.shape, int(picture_set))
            words = [scene.background for scene in scenes]
        else:
            scenes = concept_scenes(concept.name, 5, seed=int(picture_set))
            words = [concept_filewords(concept.name, scene) for scene in scenes]
        write_concept(folder, scenes, 32, filewords=words)
    return folder


def seen_backgrounds(folder: Path) -> list[str]:
    """The backgrounds the caption files of a drawn concept's pictures name (in order, each once)."""
    return list(dict.fromkeys(p.read_text().strip() for p in sorted(folder.glob("*.txt"))))


def for_family(concept: Concept, model: ModelFiles) -> Concept:
    """``concept`` inverted with ``model``'s finetune config in place of the LDM's (the other configs kept)."""
    if model.family == "ldm":
        return concept
    return replace(concept, configs=(model.finetune, *concept.configs[1:]))


def invert(concept: Concept, folder: Path, seed: int, rundir: Path, overrides: list[str],
           ckpt: str = CKPT) -> tuple[float, Path, int]:
    """Run ``main.py`` (one torch thread); returns its wall time, the embedding file and the step it stopped at."""
    cmd = [sys.executable, str(ROOT / "main.py"), "--base", *concept.configs, "-t", "--actual_resume", ckpt,
           "-n", rundir.name, "--data_root", str(folder), "--init_word", concept.init_word, "--seed", str(seed),
           "-l", str(rundir / "logs"), "--placeholder_string", concept.placeholder, "--no-test", "true",
           "lightning.callbacks.restarts.params.save_starts=true", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    shutil.rmtree(rundir / "logs", ignore_errors=True)  # what an interrupted earlier try left (it has no result.json)
    rundir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(rundir / "main.log", "w") as log:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"main.py failed (exit {done.returncode}); see {rundir / 'main.log'}")
    embedding = max((rundir / "logs").glob("*/checkpoints/embeddings.pt"), key=lambda p: p.stat().st_mtime)
    import torch

    steps = int(torch.load(embedding, weights_only=True).get("step", -1)) + 1  # files number the last batch's index
    return wall, embedding, steps


START_LINE = re.compile(r"start (\d+) of \d+: deterministic loss ([0-9.]+) after (\d+) steps")
KEPT_LINE = re.compile(r"keeping start (\d+) of")


def starts_from_log(log: str) -> dict:
    """Each start's final deterministic loss and length, and which start was kept, as ``BestOfRestarts`` logged them
    (empty for a run without restarts)."""
    starts = [{"loss": float(loss), "steps": int(steps)} for _, loss, steps in START_LINE.findall(log)]
    kept = KEPT_LINE.search(log)
    return {"starts": starts, "kept": int(kept.group(1)) if kept else None} if starts else {}


def concept_of(name: str) -> Concept:
    return CONCEPTS[name] if name in CONCEPTS else drawn_concept(name)


def concept_scores(evaluator, concept: Concept, edit_backs: list[str]) -> dict:
    """Reconstruction and editability of ``*`` as ``concept`` (see the module docstring)."""
    import numpy as np

    from evaluation.shapes_eval import TEMPLATE, edit_prompt

    if concept.colour is None:
        scores = evaluator.word_scores("learned", "*")
        return {"reconstruction": scores.reconstruction, "editability": scores.editability, "edits": scores.edits}

    def share(prompt: str, background: str | None) -> float:
        return float(np.mean([j.matches(concept.shape, concept.colour, background) for j in evaluator.judged(prompt)]))

    edits = {b: share(edit_prompt("*", b), b) for b in edit_backs}
    return {"reconstruction": share(TEMPLATE.format("*"), None), "editability": float(np.mean(list(edits.values()))),
            "edits": edits}


def signal_prompts() -> list[str]:
    """The word next to every named background: what the override signals read (the same for every concept)."""
    from ldm.data.shapes import NAMED_BACKGROUNDS

    return [f"a photo of a * on a {b} background" for b in NAMED_BACKGROUNDS]


def judge(name: str, embedding: Path, samples: int, edit_backs: list[str], files: ModelFiles | None = None) -> dict:
    """Reconstruction and editability of the learned word (see the module docstring); for ``*`` words also the
    override signals, and the same for every start saved next to the embedding (``starts``). SDXL words are judged
    without the signals and starts (:mod:`ldm.train.override` reads a single text encoder)."""
    import numpy as np
    import torch

    from evaluation.shapes_eval import SampleSettings, ShapesJudgeEvaluator, TEMPLATE
    from ldm.data.shapes import UNNAMED_BACKGROUND
    from ldm.inference import load_model_from_config
    from ldm.train.override import override_signals, set_reference

    torch.set_num_threads(1)
    concept = concept_of(name)
    files = files or model_files("ldm")
    model = load_model_from_config(ROOT / files.inference, ROOT / files.ckpt, "cpu", embedding_path=embedding)
    evaluator = ShapesJudgeEvaluator(model, SampleSettings(n_samples=samples, batch_size=samples))
    if concept.placeholder != "*":
        got = evaluator.judged(f"{TEMPLATE.format('shape')} on a & background")
        recon = float(np.mean([j.background == UNNAMED_BACKGROUND for j in got]))
        return {"reconstruction": recon, "editability": evaluator.background_share(" on a & background", n=samples)}
    if getattr(model, "cond_stage_model", None) is None:  # SDXL: two text encoders behind a conditioner
        return concept_scores(evaluator, concept, edit_backs)
    set_reference(model, concept.init_word)
    scores = concept_scores(evaluator, concept, edit_backs) | {"signals": override_signals(model, signal_prompts())}
    kept = model.embedding_manager.string_to_param_dict["*"].detach().clone()
    starts = []
    for path in sorted(embedding.parent.glob("start*.pt")):
        model.embedding_manager.load(path)
        if torch.equal(model.embedding_manager.string_to_param_dict["*"].detach(), kept):  # judged above already
            starts.append({"file": path.name, "kept": True, **scores})
        else:
            starts.append({"file": path.name, "kept": False, **concept_scores(evaluator, concept, edit_backs),
                           "signals": override_signals(model, signal_prompts())})
    scores["judged_starts"] = starts
    return scores


def train_word(concept: Concept, picture_set: str, seed: int, trainer: str, sweep: Sweep, rundir: Path,
               folder: Path) -> tuple[float, Path, int, dict]:
    """One trainer's word for the run: wall time to it, the file our loader reads, its steps, what else to record."""
    if trainer == "ours":
        wall, embedding, steps = invert(concept, folder, seed, rundir, list(sweep.overrides), sweep.model.ckpt)
        return wall, embedding, steps, starts_from_log((rundir / "main.log").read_text(errors="replace"))
    from evaluation.peer_runs import export_once, run_peer

    diffusers = export_once(ROOT / sweep.model.inference, ROOT / sweep.model.ckpt,
                            sweep.outdir / f"diffusers-{sweep.model.family}")
    vectors = 1 if trainer == "peer" else finetune_vectors(sweep.model)
    got = run_peer(diffusers, folder, seed, rundir, concept.init_word, vectors, sweep.peer_steps)
    recipe = {"num_vectors": vectors, "max_train_steps": sweep.peer_steps, "readme_steps": sweep.peer_steps == 3000}
    return got.wall_s, got.word, got.updates, {"peer_run": got.record, "recipe": recipe}


def finetune_vectors(model: ModelFiles) -> int:
    """Vectors per word in the family's finetune config (what ``peer-k`` gives the peer)."""
    from omegaconf import OmegaConf

    config = OmegaConf.load(ROOT / model.finetune)
    return int(OmegaConf.select(config, "model.params.personalization_config.params.num_vectors_per_token", default=1))


def run_name(concept: Concept, picture_set: str, seed: int, trainer: str, sweep: Sweep) -> str:
    """The run's folder: :func:`run_id`, and for a peer cut short its updates (``..._peer_steps50``), so that a quick
    look is never taken, on resuming, for a run of the recipe."""
    name = run_id(concept.name, picture_set, seed, trainer, sweep.model.family)
    return name if trainer == "ours" or sweep.peer_steps == 3000 else f"{name}_steps{sweep.peer_steps}"


def one_run(concept: Concept, picture_set: str, seed: int, trainer: str, sweep: Sweep) -> RunResult:
    rundir = sweep.outdir / "runs" / run_name(concept, picture_set, seed, trainer, sweep)
    saved = rundir / "result.json"
    if saved.exists():
        return RunResult(**json.loads(saved.read_text()))
    folder = picture_folder(concept, picture_set, sweep.outdir)
    wall, embedding, steps, details = train_word(concept, picture_set, seed, trainer, sweep, rundir, folder)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--judge", concept.name, str(embedding), "--samples",
           str(sweep.samples), "--family", sweep.model.family, "--ckpt", sweep.model.ckpt]
    if concept.colour is not None:
        from ldm.data.shapes import edit_backgrounds

        cmd += ["--edit-backgrounds", *edit_backgrounds(concept.colour, seen_backgrounds(folder))]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    scores = json.loads(subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    recon, edit = scores.pop("reconstruction"), scores.pop("editability")
    scores.update(details, ckpt=sweep.model.ckpt)
    result = RunResult(concept.name, picture_set, seed, recon, edit, recon >= RECON_MIN and edit >= EDIT_MIN, round(wall, 1),
                       steps, sweep.samples, str(embedding.relative_to(sweep.outdir)), scores, trainer,
                       round(wall / max(steps, 1), 4))
    tmp = saved.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(result), indent=2))
    os.replace(tmp, saved)
    logger.info("%s: reconstruction %.0f%%, editability %.0f%%, %s, %.0f s, %d steps", rundir.name, 100 * recon,
                100 * edit, "success" if result.success else "FAILED", wall, steps)
    return result


def guarded_run(concept: Concept, picture_set: str, seed: int, trainer: str, sweep: Sweep) -> RunResult:
    """:func:`one_run`; a run that crashes counts as a failed run (not saved, so the next call tries it again)."""
    try:
        return one_run(concept, picture_set, seed, trainer, sweep)
    except (RuntimeError, subprocess.CalledProcessError, ValueError) as exc:
        logger.error("%s: %s", run_name(concept, picture_set, seed, trainer, sweep), exc)
        return RunResult(concept.name, picture_set, seed, 0.0, 0.0, False, 0.0, 0, sweep.samples, "", {"error": str(exc)},
                         trainer)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))  # the first paragraph, whole
    p.add_argument("--concept", nargs="+", choices=sorted(CONCEPTS), default=None,
                   help="shipped concepts (default: both, unless --concepts is given)")
    p.add_argument("--concepts", nargs="+", default=[], metavar="COLOUR:SHAPE",
                   help="any concept of the world, e.g. white:star yellow:square (new picture sets only)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5], help="inversion seeds (main.py --seed)")
    p.add_argument("--sets", nargs="+", default=["shipped", "1", "103", "104"],
                   help="picture sets: 'shipped' or a generator seed for a new set of five pictures")
    p.add_argument("--samples", type=int, default=32, help="samples per judged prompt")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--outdir", default="outputs/robustness")
    p.add_argument("--extra-config", nargs="+", default=[], metavar="FILE",
                   help="config files merged after each concept's own (a remedy to compare)")
    p.add_argument("--family", choices=FAMILIES, default="ldm",
                   help="the shapes model: models/shapes-<family>/model.ckpt with configs/shapes/shapes-<family>-"
                        "{inference,finetune}.yaml (default: the shipped LDM)")
    p.add_argument("--ckpt", default=None, metavar="PATH", help="another model file of the family")
    p.add_argument("--trainer", nargs="+", choices=TRAINERS, default=["ours"],
                   help="ours (main.py), peer (diffusers' recipe, one vector, 3,000 updates), peer-k (the same with "
                        "our number of vectors); peer and peer-k need --family sd1 or sd2")
    p.add_argument("--peer-steps", type=int, default=3000, metavar="N",
                   help="the peer's updates (default: its README's 3,000; fewer is a quick look, reported as such)")
    p.add_argument("--report", action="store_true", help="only tabulate the runs already done (their result.json)")
    p.add_argument("--judge", nargs=2, metavar=("CONCEPT", "EMBEDDING"), help=argparse.SUPPRESS)
    p.add_argument("--edit-backgrounds", nargs="*", default=[], help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every run (after --)")
    opt = p.parse_args(argv)
    for s in opt.sets:
        if s != "shipped" and not s.isdigit():
            p.error(f"--sets: '{s}' is neither 'shipped' nor a generator seed (a whole number)")
    for path in opt.extra_config:
        if not Path(path).is_file():
            p.error(f"--extra-config: no file '{path}'")
    for text in opt.concepts:
        try:
            drawn_concept(text)
        except ValueError as exc:
            p.error(f"--concepts: {exc}")
    if opt.concepts and "shipped" in opt.sets:
        p.error("--sets: drawn concepts (--concepts) have no 'shipped' pictures; give generator seeds only")
    if opt.concept is None:
        shipped = ["orange_cross", "pink_background"] if opt.family == "ldm" else ["orange_cross"]
        opt.concept = [] if opt.concepts else shipped
    check_family(p, opt)
    return opt


def check_family(p: argparse.ArgumentParser, opt: argparse.Namespace) -> None:
    """One line for a family, trainer or model file that cannot run (before any run starts)."""
    if opt.family != "ldm" and "pink_background" in opt.concept:
        p.error(f"--concept pink_background is LDM-only (its templates and 'white' start are the shapes LDM's); "
                f"drop it or use --family ldm")
    peers = [t for t in opt.trainer if t != "ours"]
    if peers and opt.family == "ldm":
        p.error("--trainer peer: the peer's recipe needs a CLIP model, --family sd1 or sd2 (the shapes LDM's BERT "
                "encoder does not open in diffusers)")
    if peers and opt.family == "sdxl":
        p.error("--trainer peer: diffusers' SDXL textual-inversion recipe is not re-created here "
                "(scripts/peer_invert.py is SD v1/2.x); use --family sd1 or sd2, or --trainer ours")
    if opt.peer_steps < 1:
        p.error("--peer-steps must be at least 1")
    if opt.report:
        return
    files = model_files(opt.family, opt.ckpt)
    needed = [("--family", files.inference)] + ([("--family", files.finetune)] if not opt.judge else [])
    for flag, path in needed:
        if not (ROOT / path).is_file():
            p.error(f"{flag} {opt.family}: no config '{path}'; that family's shapes model is not set up yet")
    if opt.ckpt is not None:
        if not Path(opt.ckpt).is_file():
            p.error(f"--ckpt: no model file '{opt.ckpt}'")
        opt.ckpt = str(Path(opt.ckpt).resolve())  # the runs work in the repository, not where the command was given
    elif not (ROOT / files.ckpt).is_file():
        p.error(f"--family {opt.family}: no model file '{files.ckpt}'; train it (docs/shapes-sd.md) or pass --ckpt PATH")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    opt = parse_args(argv)
    model = model_files(opt.family, opt.ckpt)
    if opt.judge:
        logging.disable(logging.WARNING)
        print(json.dumps(judge(opt.judge[0], Path(opt.judge[1]), opt.samples, opt.edit_backgrounds, model)))
        return
    outdir = Path(opt.outdir).resolve()
    sweep = Sweep(model, outdir, opt.samples, tuple(opt.overrides), opt.peer_steps)
    names = [*opt.concept, *opt.concepts]
    # seed by seed, so that a sweep cut short has covered every concept, picture set and trainer equally
    concepts = {c: for_family(concept_of(c), model) for c in names}
    concepts = {c: replace(k, configs=(*k.configs, *opt.extra_config)) for c, k in concepts.items()}
    jobs = [(concepts[c], s, seed, t) for seed in opt.seeds for s in opt.sets for c in names for t in opt.trainer]
    if opt.report:
        saved = [outdir / "runs" / run_name(c, s, seed, t, sweep) / "result.json" for c, s, seed, t in jobs]
        results = [RunResult(**json.loads(path.read_text())) for path in saved if path.exists()]
        if not results:
            raise SystemExit(f"--report: no finished runs under {outdir / 'runs'}")
    else:
        with ThreadPoolExecutor(max_workers=max(1, opt.jobs)) as pool:
            results = list(pool.map(lambda job: guarded_run(*job, sweep), jobs))
    results.sort(key=lambda r: (names.index(r.concept), opt.trainer.index(r.trainer), opt.sets.index(r.picture_set), r.seed))
    totals = summary(results)
    payload = {"command": sys.argv, "family": opt.family, "ckpt": model.ckpt, "trainers": opt.trainer,
               "peer_steps": peer_steps(results), "overrides": opt.overrides,
               "extra_config": opt.extra_config, "samples": opt.samples, "summary": totals,
               "runs": [asdict(r) for r in results]}
    (outdir / "results.json").write_text(json.dumps(payload, indent=2))
    table = markdown_table(results, totals)
    (outdir / "table.md").write_text(table)
    starts = start_rows(results)
    if starts:
        (outdir / "starts.md").write_text(starts_table(starts))
    plot(results, outdir / "robustness.png")
    print(table)
    print(f"results: {outdir / 'results.json'}  table: {outdir / 'table.md'}  plot: {outdir / 'robustness.png'}")


if __name__ == "__main__":
    main()
