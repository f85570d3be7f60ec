"""Everything a GPU machine is needed for, in one job that fits in eight minutes (``scripts/gpu_check.sh OUTDIR``).

1. the ``gpu``-marked tests (CUDA numbers, compiled steps against eager, a CUDA step without host syncs);
2. the benchmark table for SD v1 (512 px) and LDM-1.4B (256 px): ours eager / compiled / CUDA graphs, with and
   without the latent cache, bf16 / fp16 / fp32, batch 1 / 4 / 8, and the diffusers peer; random weights;
3. the ops and kernel launches of one SD v1 step, ours eager / compiled / graphs and the peer;
4. the host syncs Lightning adds per step in a real ``main.py`` run (progress bar, logging), counted;
5. the paper's recipe end to end: ``main.py`` on LDM-1.4B, 5,000 steps at batch 4, from a random-weight checkpoint.

Each part has a time budget and the whole a deadline; what does not fit is recorded as skipped, never silently
dropped. Results go to ``OUTDIR/gpu_check.json`` and ``OUTDIR/gpu_check.md`` (plus each part's own files).

``--dry-run`` runs every part on the CPU with the tiny test configs, a few steps and the ``aot_eager`` compile
backend, so that the job is known to work before a GPU ever sees it.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

logger = logging.getLogger("gpu_check")

REAL = {"sd": "configs/stable-diffusion/v1-finetune.yaml", "ldm": "configs/latent-diffusion/txt2img-1p4B-finetune.yaml"}
TINY = {"sd": "tests/configs/sd-tiny-finetune.yaml", "ldm": "tests/configs/ldm-tiny-finetune.yaml"}
PARTS = ("tests", "bench_sd", "recipe", "bench_ldm", "ops", "lightning")  # the order they run in: most wanted first


class Plan:
    """Sizes, budgets (seconds) and the device of the run, real or dry."""

    def __init__(self, dry: bool, total_s: float) -> None:
        self.dry = dry
        self.configs = TINY if dry else REAL
        self.device = "cpu" if dry else "cuda"
        self.batches = ["1"] if dry else ["4", "1", "8"]  # the settings that matter most come first
        self.precisions = ["fp32"] if dry else ["bf16", "fp16", "fp32"]
        self.modes = ["eager", "compiled"] if dry else ["eager", "compiled", "graphs"]  # graphs: inductor only
        # a dry run compiles once (compiling is slow on a CPU and the same code path each time)
        self.other_modes = ["eager"] if dry else self.modes
        self.peer_modes = ["eager"] if dry else ["eager", "compiled"]
        self.sync_steps = 6 if dry else 20
        self.steps = ["--steps", "2", "--warmup", "1"] if dry else ["--steps", "10", "--warmup", "3"]
        self.backend = ["--compile-backend", "aot_eager"] if dry else []
        self.recipe_steps = 6 if dry else 5000
        self.budget = dict(zip(PARTS, (120, 140, 100, 50, 40, 20)))
        self.deadline = time.monotonic() + total_s

    def seconds(self, part: str) -> float:
        """This part's budget, cut to what is left before the deadline."""
        return max(0.0, min(self.budget[part], self.deadline - time.monotonic()))


def run(cmd: list[str], timeout: float, log: Path, env: dict | None = None) -> dict[str, Any]:
    """Run a command with a timeout, output to ``log``; returns its exit code and wall time."""
    t0 = time.monotonic()
    with open(log, "w") as fh:
        try:
            code = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    return {"cmd": " ".join(cmd), "returncode": code, "wall_s": round(time.monotonic() - t0, 1), "log": log.name}


def gpu_tests(plan: Plan, out: Path) -> dict[str, Any]:
    result = run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/"], plan.seconds("tests"), out / "gpu_tests.log")
    result["summary"] = (out / "gpu_tests.log").read_text().strip().splitlines()[-1:] or [""]
    return result


def benchmark(plan: Plan, out: Path, family: str, part: str, extra: list[str]) -> dict[str, Any]:
    """One benchmark run with its own budget (it skips what does not fit; the timeout is the backstop)."""
    budget = plan.seconds(part)
    cmd = [sys.executable, "scripts/benchmark.py", "--config", plan.configs[family], "--device", plan.device, "--out", str(out / f"{part}.json"),
           "--markdown", str(out / f"{part}.md"), *plan.backend, *extra]
    if not plan.dry:  # a dry run checks every setting runs; the real one stops starting new ones near its budget
        cmd += ["--budget-s", str(max(1.0, budget - 40))]
    result = run(cmd, budget + 15 if not plan.dry else 600, out / f"{part}.log")  # killed: the results so far are saved
    if (out / f"{part}.json").exists():
        result["report"] = json.loads((out / f"{part}.json").read_text())
    return result


def random_checkpoint(config_path: str, path: Path) -> Path:
    """A random-weight checkpoint of the config's model (no personalization), in half precision to keep it small."""
    from omegaconf import OmegaConf

    from ldm.checkpoint import atomic_torch_save
    from ldm.util import instantiate_from_config

    config = OmegaConf.load(REPO / config_path)
    config.model.params.pop("personalization_config", None)
    config.model.params.pop("ckpt_path", None)
    torch.manual_seed(0)
    model = instantiate_from_config(config.model)
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    atomic_torch_save({"state_dict": state, "global_step": 0}, path)
    return path


def concept_folder(folder: Path, n: int = 5, size: int = 256) -> Path:
    """``n`` pictures of a coloured square on a plain background (the recipe's data: its images, not their content)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = np.full((size, size, 3), rng.integers(0, 255, 3), dtype=np.uint8)
        a, b = sorted(rng.integers(size // 8, size - size // 8, 2))
        img[a : b + 1, a : b + 1] = (230, 120, 20)
        Image.fromarray(img).save(folder / f"img{i}.png")
    return folder


def main_command(plan: Plan, ckpt: Path, data: Path, logs: Path, steps: int, name: str) -> list[str]:
    device = ["--gpus", "0,"] if plan.device == "cuda" else []
    return [sys.executable, "main.py", "--base", plan.configs["ldm"], "-t", "--actual_resume", str(ckpt), "-n", name, *device,
            "--data_root", str(data), "-l", str(logs), "--max_steps", str(steps)]


def recipe(plan: Plan, out: Path, work: Path) -> dict[str, Any]:
    """The paper's recipe in ``main.py``: wall time to 5,000 steps, or the step reached when the budget ran out."""
    t0 = time.monotonic()
    ckpt = random_checkpoint(plan.configs["ldm"], work / "ldm-random.ckpt")
    data = concept_folder(work / "concept", size=32 if plan.dry else 256)
    setup_s = time.monotonic() - t0
    budget = plan.seconds("recipe")
    cmd = main_command(plan, ckpt, data, work / "logs", plan.recipe_steps, "recipe")
    result = run(cmd + ["--max_time", f"00:00:{int(budget // 60):02d}:{int(budget % 60):02d}"], budget + 60, out / "recipe.log")
    reached = [int(p.stem.split("-")[-1]) + 1 for p in (work / "logs").glob("*/checkpoints/embeddings_gs-*.pt")]
    result.update({"setup_s": round(setup_s, 1), "target_steps": plan.recipe_steps, "steps_reached": max(reached, default=0)})
    finished = result["returncode"] == 0 and result["steps_reached"] >= plan.recipe_steps
    result["finished"] = finished
    if not finished and result["steps_reached"]:
        result["projected_s_upper_bound"] = round(result["wall_s"] * plan.recipe_steps / result["steps_reached"], 1)
    return result


def lightning_syncs(plan: Plan, out: Path, work: Path) -> dict[str, Any]:
    """Host syncs per step of a real ``main.py`` run on the tiny LDM config, by where they come from.

    ``main.py`` runs in this process under :class:`HostSyncDetector` from the first training batch to the end of
    training (so model building and checkpoint loading are not counted); data loading runs in worker processes in
    the real configs and is left out here too.
    """
    import pytorch_lightning as pl

    import main as main_module
    from ldm.models.diffusion.fast_step import HostSyncDetector
    from tests.tiny_models import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint("ldm", work / "tiny-ldm.ckpt")
    data = concept_folder(work / "tiny-concept", n=3, size=24)
    detector = HostSyncDetector()
    counted = {"steps": 0}

    class Watch(pl.Callback):
        def on_train_batch_start(self, *a: Any) -> None:
            if not counted["steps"]:
                detector.__enter__()
            counted["steps"] += 1

        def on_train_end(self, *a: Any) -> None:
            detector.__exit__(None, None, None)

    plan_tiny = Plan(dry=True, total_s=0)
    plan_tiny.device = plan.device
    argv = main_command(plan_tiny, ckpt, data, work / "sync-logs", plan.sync_steps, "syncs")[1:]
    original_callbacks = main_module.default_callbacks
    main_module.default_callbacks = lambda *a, **k: original_callbacks(*a, **k) + [Watch()]
    saved_argv, sys.argv = sys.argv, argv
    saved_env, cwd = dict(os.environ), os.getcwd()
    try:
        os.chdir(REPO)
        main_module.main()
    finally:
        os.chdir(cwd)
        sys.argv = saved_argv
        main_module.default_callbacks = original_callbacks
        os.environ.clear()  # main.py notes its run folder there for DDP ranks; later runs must not inherit it
        os.environ.update(saved_env)
    sources: collections.Counter = collections.Counter(source_of(where) for _, where in detector.syncs)
    (out / "lightning_syncs.txt").write_text(detector.report())
    return {"steps": counted["steps"], "syncs": len(detector.syncs), "per_step": round(len(detector.syncs) / max(counted["steps"], 1), 2),
            "by_source": dict(sources)}


SOURCES = (  # the first that a sync's stack mentions names it
    ("tqdm_progress", "Lightning progress bar refresh"),
    ("logger_connector", "Lightning logging (metrics read for the logger or the bar)"),
    ("model_checkpoint", "Lightning checkpointing"),
    ("ldm/data/", "data loading (worker processes in the real configs)"),
    ("sampling.py", "image logging (sampling)"),
    ("ldm/train/callbacks.py", "image logging"),
    ("/ldm/", "this project's model code"),
)


def source_of(stack: str) -> str:
    """Who asked for a sync, by the first of :data:`SOURCES` its stack mentions."""
    return next((label for key, label in SOURCES if key in stack), "other")


def benchmark_table(out: Path, part: str, result: dict[str, Any]) -> str:
    """A benchmark part's table: its own markdown, or (killed at its timeout) the rows it saved so far."""
    md, js = out / f"{part}.md", out / f"{part}.json"
    if md.exists():
        return md.read_text()
    if not js.exists():
        return f"(no results: {result.get('returncode', 'skipped')})"
    sys.path.insert(0, str(REPO / "scripts"))
    import benchmark as bench

    saved = json.loads(js.read_text())
    rows = saved["results"]
    table = bench.count_table([bench.OpCount(**r) for r in rows]) if saved["count_ops"] else bench.timing_table([bench.Result(**r) for r in rows])
    return "\n".join([f"(stopped at its time limit: {result.get('returncode')}; the rows saved before)", "", *table])


def markdown(report: dict[str, Any], out: Path) -> str:
    lines = [f"# GPU check ({report['device']}, {report['date']}{', DRY RUN on CPU with tiny configs' if report['dry_run'] else ''})", ""]
    tests = report["parts"].get("tests", {})
    lines += ["## gpu-marked tests", "", f"exit {tests.get('returncode')}: {' '.join(tests.get('summary', []))}", ""]
    for part, title in (("bench_sd", "SD v1"), ("bench_ldm", "LDM-1.4B"), ("ops", "Ops per SD v1 step")):
        lines += [f"## {title}", "", benchmark_table(out, part, report["parts"].get(part, {})), ""]
    syncs = report["parts"].get("lightning", {})
    lines += ["## Host syncs per step in a real main.py run", "", f"`{json.dumps(syncs)}`", ""]
    rec = report["parts"].get("recipe", {})
    lines += ["## The paper's recipe (LDM, 5,000 steps, batch 4, main.py)", "",
              f"finished: {rec.get('finished')}, wall {rec.get('wall_s')} s (+ {rec.get('setup_s')} s writing the random checkpoint), "
              f"steps reached {rec.get('steps_reached')} of {rec.get('target_steps')}"
              + (f", projected at most {rec['projected_s_upper_bound']} s" if "projected_s_upper_bound" in rec else ""), ""]
    if report["skipped"]:
        lines += [f"skipped (deadline): {', '.join(report['skipped'])}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir")
    parser.add_argument("--dry-run", action="store_true", help="every part on the CPU with tiny configs (checks the job, measures nothing)")
    parser.add_argument("--total-s", type=float, default=470, help="deadline for the whole job")
    parser.add_argument("--parts", nargs="+", default=None, help=f"run only these parts, e.g. recipe (all: {', '.join(PARTS)})")
    parser.add_argument("--budget", nargs="+", default=[], metavar="PART=SECONDS", help="a part's time budget, e.g. recipe=400")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; use --dry-run to check the job on a CPU")
    out = Path(args.outdir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)
    plan = Plan(args.dry_run, args.total_s)
    for item in args.budget:
        part, _, seconds = item.partition("=")
        if part not in PARTS or not seconds.replace(".", "", 1).isdigit():
            sys.exit(f"gpu_check: --budget {item}: expected PART=SECONDS with PART one of {', '.join(PARTS)}")
        plan.budget[part] = float(seconds)
    precisions, batches, modes = plan.precisions, plan.batches, plan.modes
    parts = {
        "tests": lambda: gpu_tests(plan, out),
        "bench_sd": lambda: benchmark(plan, out, "sd", "bench_sd", ["--batch", *batches, "--precision", *precisions, "--modes", *modes,
                                                                     "--peer-modes", *plan.peer_modes, "--no-lightning", *plan.steps]),
        "bench_ldm": lambda: benchmark(plan, out, "ldm", "bench_ldm", ["--batch", batches[0], "--precision", *precisions, "--modes", *plan.other_modes, *plan.steps]),
        "ops": lambda: benchmark(plan, out, "sd", "ops", ["--count-ops", "--batch", "1", "--modes", *plan.other_modes]),
        "lightning": lambda: lightning_syncs(plan, out, work),
        "recipe": lambda: recipe(plan, out, work),
    }
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not plan.dry else "CPU",
                              "dry_run": plan.dry, "date": time.strftime("%Y-%m-%d %H:%M"), "parts": {}, "skipped": []}
    unknown = set(args.parts or []) - set(PARTS)
    if unknown:
        sys.exit(f"gpu_check: --parts {' '.join(sorted(unknown))}: not a part; the parts are {', '.join(PARTS)}")
    for name in PARTS:
        part = parts[name]
        if args.parts and name not in args.parts:
            continue
        if plan.seconds(name) < 5:
            report["skipped"].append(name)
            continue
        logger.info("gpu_check: %s (budget %.0f s)", name, plan.seconds(name))
        try:
            report["parts"][name] = part()
        except Exception as err:  # one part failing must not lose the others' results
            logger.exception("gpu_check: %s failed", name)
            report["parts"][name] = {"error": f"{type(err).__name__}: {err}"}
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(report, out))
    logger.info("gpu_check: done; %s", out / "gpu_check.md")


if __name__ == "__main__":
    main()
