"""The peer trainer inside a sweep: diffusers' textual-inversion recipe (``scripts/peer_invert.py``) run on the same
weights and pictures as ``main.py``, its word then judged through our own generation code.

Why through ours: the side-by-side compares trainers, so everything after the word (sampler, guidance, noise, judge)
must be the same for both. The peer's file ``{"<*>": [K, D]}`` is rewritten under our placeholder ``*`` (the rows
unchanged), which our loader reads like any learned word.

The diffusers folder is exported once per model (``scripts/convert_to_diffusers.py`` in a subprocess, into a
temporary folder that is renamed when complete), so a sweep that is cut short and resumed never trains on half a
folder.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER_TOKEN = "<*>"
README_STEPS = 3000  # the peer README's --max_train_steps
_export_lock = threading.Lock()


@dataclass(frozen=True)
class PeerOutcome:
    """One peer run: wall time from process start to the final word, the word rewritten for our loader, updates."""

    wall_s: float
    word: Path
    updates: int
    record: dict


def one_thread_env() -> dict[str, str]:
    """The environment of every subprocess of a sweep: one torch thread, offline, this checkout first on the path."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))


def export_once(inference_config: str | Path, ckpt: str | Path, folder: Path) -> Path:
    """``folder`` as a diffusers pipeline folder of ``ckpt``: exported on the first call, reused afterwards (threads of
    one sweep wait for the first export instead of each starting one)."""
    with _export_lock:
        if (folder / "model_index.json").is_file():
            return folder
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        cmd = [sys.executable, str(ROOT / "scripts" / "convert_to_diffusers.py"), "--config", str(inference_config),
               "--ckpt", str(ckpt), "--out", str(partial)]
        done = subprocess.run(cmd, cwd=ROOT, env=one_thread_env(), capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"exporting {ckpt} to a diffusers folder failed: {last}")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
        return folder


def word_for_us(peer_file: Path, out: Path, placeholder: str = "*") -> Path:
    """The peer's ``{token: [K, D]}`` rewritten as our ``placeholder``'s word (same rows, diffusers layout with our
    placeholder in the metadata, which our loader reads)."""
    from safetensors.torch import load_file

    from ldm.modules.embedding_formats import save_diffusers

    tensors = load_file(str(peer_file))
    if len(tensors) != 1:
        raise RuntimeError(f"{peer_file} holds {len(tensors)} tokens; the peer writes one")
    (token, rows), = tensors.items()
    return save_diffusers(out, token, rows.reshape(-1, rows.shape[-1]), placeholder=placeholder)


def run_peer(diffusers_folder: Path, pictures: Path, seed: int, rundir: Path, init_word: str, num_vectors: int,
             steps: int = README_STEPS) -> PeerOutcome:
    """``scripts/peer_invert.py`` with the README's settings (``num_vectors`` and ``steps`` aside), one thread, on the
    CPU; the wall time is the subprocess's, start to final word, measured as ``main.py``'s is."""
    out = rundir / "peer"
    shutil.rmtree(out, ignore_errors=True)  # what an interrupted earlier try left
    rundir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "scripts" / "peer_invert.py"), "--pretrained_model_name_or_path",
           str(diffusers_folder), "--train_data_dir", str(pictures), "--placeholder_token", PEER_TOKEN,
           "--initializer_token", init_word, "--output_dir", str(out), "--num_vectors", str(num_vectors),
           "--max_train_steps", str(steps), "--save_steps", "0", "--seed", str(seed), "--device", "cpu"]
    start = time.perf_counter()
    with open(rundir / "peer.log", "w") as log:
        done = subprocess.run(cmd, cwd=ROOT, env=one_thread_env(), stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"peer_invert.py failed (exit {done.returncode}); see {rundir / 'peer.log'}")
    record = json.loads((out / "peer_run.json").read_text())
    word = word_for_us(out / "learned_embeds.safetensors", rundir / "peer_word.safetensors")
    return PeerOutcome(wall, word, int(record["updates"]), record)
