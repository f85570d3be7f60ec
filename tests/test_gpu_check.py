"""scripts/gpu_check.sh: the GPU job's dry run (every part on the CPU with tiny configs) completes and reports every
part, so the job is known to work before a GPU machine runs it."""
import json
import os
import subprocess
import sys

import pytest

from paths import REPO, load_script


@pytest.mark.slow
def test_the_dry_run_runs_every_part(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(tmp_path / "out"), "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    parts = report["parts"]
    assert report["dry_run"] and not report["skipped"]
    assert set(parts) == {"tests", "bench_sd", "bench_ldm", "ops", "lightning", "recipe"}
    assert not any("error" in p for p in parts.values()), parts
    assert parts["tests"]["returncode"] == 0
    sd = parts["bench_sd"]["report"]["results"]
    assert {(r["name"], r["mode"]) for r in sd} >= {("ours", "eager"), ("ours", "compiled"), ("peer: diffusers TI step", "eager"),
                                                      ("original (fp32, uncached, eager)", "eager")}
    assert all(r["sec_per_step"] > 0 for r in sd + parts["bench_ldm"]["report"]["results"])
    assert all(r["dispatched"] > 0 for r in parts["ops"]["report"]["results"])
    assert parts["lightning"]["steps"] == 6 and parts["lightning"]["syncs"] >= 0
    assert parts["recipe"]["finished"] and parts["recipe"]["steps_reached"] == 6
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "DRY RUN" in table and "| ours | compiled | 1 | fp32 |" in table


def test_a_wrong_part_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), str(tmp_path), "--dry-run", "--parts", "benchmark"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--parts benchmark: not a part" in proc.stderr and "Traceback" not in proc.stderr


def test_a_benchmark_killed_at_its_limit_still_reports_its_saved_rows(tmp_path):
    gpu_check = load_script("gpu_check")

    row = {"name": "ours", "batch": 4, "precision": "bf16", "cache": True, "checkpointing": False, "sec_per_step": 0.05, "images_per_s": 80.0,
           "peak_mem_gib": 2.5, "tflop_per_step": 1.2, "matmul_fraction": 0.3, "mode": "graphs"}
    (tmp_path / "bench_sd.json").write_text(json.dumps({"count_ops": False, "results": [row]}))
    table = gpu_check.benchmark_table(tmp_path, "bench_sd", {"returncode": "timeout"})
    assert "stopped at its time limit: timeout" in table
    assert "| ours | graphs | 4 | bf16 | True | False | 50.0 | 80.0 | 2.50 | 1.2000 | 30.0% |" in table
    assert gpu_check.benchmark_table(tmp_path, "ops", {}) == "(no results: skipped)"
