"""scripts/benchmark.py: op counting per training step (ours, the original's form, the diffusers peer) and the time
budget that keeps the GPU job within its slot."""
import json
import sys

import pytest

from paths import REPO, load_script

benchmark = load_script("benchmark")


def run_benchmark(monkeypatch, tmp_path, *argv: str) -> dict:
    monkeypatch.chdir(REPO)  # the tiny configs name their CLIP folder relative to the repository
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--out", str(tmp_path / "b.json"), "--markdown", str(tmp_path / "b.md"), *argv])
    benchmark.main()
    return json.loads((tmp_path / "b.json").read_text())


def test_count_ops_reports_every_step_of_a_tiny_config(monkeypatch, tmp_path):
    report = run_benchmark(monkeypatch, tmp_path, "--count-ops", "--config", "tests/configs/sd-tiny-finetune.yaml", "--batch", "1",
                           "--modes", "eager")
    rows = {r["name"]: r for r in report["results"]}
    assert set(rows) == {"original (uncached, eager)", "ours", "peer: diffusers TI step"}
    for row in rows.values():
        assert row["dispatched"] > 100 and row["profiled"] > 100
    assert rows["ours"]["dispatched"] < rows["original (uncached, eager)"]["dispatched"]  # no VAE encoder in our step
    assert "| ours | eager | 1 |" in (tmp_path / "b.md").read_text()


def test_a_spent_budget_skips_the_remaining_settings(monkeypatch, tmp_path):
    report = run_benchmark(monkeypatch, tmp_path, "--config", "tests/configs/ldm-tiny-finetune.yaml", "--batch", "1", "--precision", "fp32",
                           "--steps", "2", "--warmup", "1", "--budget-s", "0")
    assert len(report["results"]) == 1 and report["results"][0]["name"] == "ours"
    assert report["skipped"] and report["lightning_vs_bare_s"] is None


def test_size_sets_the_image_and_latent_sizes():
    config = benchmark.load_config(str(REPO / "configs" / "stable-diffusion" / "v1-finetune.yaml"), 64)
    assert config.data.params.train.params.size == 64 and config.model.params.image_size == 8
    assert config.model.params.unet_config.params.image_size == 8
