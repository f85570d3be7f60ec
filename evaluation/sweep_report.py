"""A sweep's record and its read-outs: one :class:`RunResult` per inversion (``result.json``), the summary per concept
and trainer, the markdown tables and the plot that ``scripts/robustness.py`` writes.

Kept apart from the sweep itself so that results can be re-tabulated (``--report``) and tested without running
anything. A run succeeds when reconstruction >= 90% and editability >= 85% (the judge's shares, see
:mod:`evaluation.shapes_eval`).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

RECON_MIN, EDIT_MIN = 0.90, 0.85


@dataclass
class RunResult:
    """One inversion and its judgement."""

    concept: str
    picture_set: str
    seed: int
    reconstruction: float
    editability: float
    success: bool
    wall_s: float
    steps: int
    samples: int
    embedding: str
    details: dict
    trainer: str = "ours"  # results written before trainers were compared are ours
    s_per_step: float = 0.0


def run_id(concept: str, picture_set: str, seed: int, trainer: str = "ours", family: str = "ldm") -> str:
    """A run's folder name: ``white-star_1_s2`` (a concept's name in files has no colon), ``..._sd1`` on another
    family, ``..._peer`` for another trainer."""
    suffix = "".join(f"_{part}" for part, plain in ((family, "ldm"), (trainer, "ours")) if part != plain)
    return f"{concept.replace(':', '-')}_{picture_set}_s{seed}{suffix}"


def group_label(r: RunResult) -> str:
    """The summary's group of a run: its concept, and its trainer when that is not ours."""
    return r.concept if r.trainer == "ours" else f"{r.concept} / {r.trainer}"


def summary(results: list[RunResult]) -> dict:
    """Per concept and trainer: success rate, and the medians of wall time, steps and seconds per step."""
    by_group: dict[str, dict] = {}
    for label in dict.fromkeys(group_label(r) for r in results):
        rows = [r for r in results if group_label(r) == label]
        by_group[label] = {
            "trainer": rows[0].trainer, "runs": len(rows), "successes": sum(r.success for r in rows),
            "success_rate": sum(r.success for r in rows) / len(rows),
            "median_wall_s": statistics.median(r.wall_s for r in rows),
            "median_steps": statistics.median(r.steps for r in rows),
            "median_s_per_step": statistics.median(r.s_per_step or r.wall_s / max(r.steps, 1) for r in rows),
            "failed": [run_id(r.concept, r.picture_set, r.seed, r.trainer) for r in rows if not r.success],
        }
    return by_group


def peer_steps(results: list[RunResult]) -> list[int]:
    """The update counts the peer's runs trained for (its recipe record; the README's is 3,000)."""
    return sorted({int(r.details["recipe"]["max_train_steps"]) for r in results if "recipe" in r.details})


def markdown_table(results: list[RunResult], totals: dict) -> str:
    lines = ["| concept | trainer | picture set | seed | reconstruction | editability | success | steps | wall time (s) | s/step |",
             "| --- | --- | --- | ---: | ---: | ---: | :---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r.concept} | {r.trainer} | {r.picture_set} | {r.seed} | {r.reconstruction:.0%} | "
                     f"{r.editability:.0%} | {'yes' if r.success else '**no**'} | {r.steps} | {r.wall_s:.0f} | "
                     f"{r.s_per_step or r.wall_s / max(r.steps, 1):.3f} |")
    lines.append("")
    for name, t in totals.items():
        lines.append(f"- {name}: {t['successes']}/{t['runs']} runs succeed ({t['success_rate']:.0%}); median wall time "
                     f"{t['median_wall_s']:.0f} s, median {t['median_steps']:.0f} steps, "
                     f"median {t.get('median_s_per_step', 0.0):.3f} s/step")
    short = [n for n in peer_steps(results) if n != 3000]
    if short:
        lines.append(f"- the peer ran {', '.join(map(str, short))} updates (--peer-steps), not its README's 3,000: "
                     "a quick look, not the recipe")
    return "\n".join(lines) + "\n"


SIGNALS = ("text_override", "text_contrast", "text_contrast_min", "unet_contrast", "unet_contrast_min")


def start_rows(results: list[RunResult]) -> list[dict]:
    """Every judged start of every run: its deterministic loss (from the log), judgement and override signals."""
    rows = []
    for r in results:
        logged = r.details.get("starts", [])
        for k, start in enumerate(r.details.get("judged_starts", [])):
            rows.append({"run": run_id(r.concept, r.picture_set, r.seed), "start": k + 1, "kept": start["kept"],
                         "loss": logged[k]["loss"] if k < len(logged) else float("nan"),
                         "reconstruction": start["reconstruction"], "editability": start["editability"],
                         "edits": start["edits"], **start["signals"]})
    return rows


def starts_table(rows: list[dict]) -> str:
    """The starts as a markdown table, and for each signal its range over the starts that reconstruct (>= 90%) and
    edit (>= 85%) against those that reconstruct but do not edit: does the signal tell them apart?"""
    lines = ["| run | start | kept | det. loss | reconstruction | editability | " + " | ".join(SIGNALS) + " |",
             "| --- | ---: | :---: | ---: | ---: | ---: |" + " ---: |" * len(SIGNALS)]
    for row in rows:
        lines.append(f"| {row['run']} | {row['start']} | {'yes' if row['kept'] else ''} | {row['loss']:.5f} | "
                     f"{row['reconstruction']:.0%} | {row['editability']:.0%} | "
                     + " | ".join(f"{row[name]:.4f}" for name in SIGNALS) + " |")
    good = [r for r in rows if r["reconstruction"] >= RECON_MIN and r["editability"] >= EDIT_MIN]
    stuck = [r for r in rows if r["reconstruction"] >= RECON_MIN and r["editability"] < EDIT_MIN]
    lines += ["", f"- starts that reconstruct and edit: {len(good)}; reconstruct but fail editability: {len(stuck)}"]
    for name in SIGNALS:
        spans = [f"{label} {min(r[name] for r in group):.4f}–{max(r[name] for r in group):.4f}"
                 for label, group in (("edit", good), ("fail", stuck)) if group]
        lines.append(f"- {name}: " + ", ".join(spans))
    return "\n".join(lines) + "\n"


def plot(results: list[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(group_label(r) for r in results))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for k, name in enumerate(groups):
        rows = [r for r in results if group_label(r) == name]
        rate = sum(r.success for r in rows) / len(rows)
        axes[0].scatter([r.editability for r in rows], [r.reconstruction for r in rows], alpha=0.6,
                        marker="os^D"[k % 4], label=f"{name}: {rate:.0%} of {len(rows)} succeed")
        axes[1].scatter([r.steps for r in rows], [r.wall_s for r in rows], alpha=0.6, marker="os^D"[k % 4], label=name)
    axes[0].axhline(RECON_MIN, color="gray", lw=0.8, ls="--")
    axes[0].axvline(EDIT_MIN, color="gray", lw=0.8, ls="--")
    axes[0].set(xlabel="editability", ylabel="reconstruction", xlim=(-0.05, 1.05), ylim=(-0.05, 1.05),
                title="per run (success: upper right box)")
    axes[0].legend(fontsize=8, loc="lower left")
    axes[1].set(xlabel="steps trained", ylabel="wall time (s, one thread)", title="time per run")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
