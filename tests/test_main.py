"""The real ``main.py`` on tiny random-weight LDM and SD models (CPU, a few steps): in subprocesses where the process
matters (files of a whole run, kill and resume, SIGTERM, DDP), else in this process (``main_in_process``)."""
import csv
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from paths import REPO
from tiny_models import TINY_CONFIGS, make_concept_folder, make_tiny_checkpoint, train_briefly

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
STEPS_DONE = re.compile(r"step ([2-9]|\d\d+)/\d+: ")  # the progress line (stdout is no terminal) after two steps


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("main")
    return {
        "root": root,
        "ldm": make_tiny_checkpoint("ldm", root / "ldm.ckpt"),
        "sd": make_tiny_checkpoint("sd", root / "sd.ckpt"),
        "data": make_concept_folder(root / "cat_toy"),
    }


def run_main(ws, *args, family="ldm", check=True, timeout=240):
    cmd = [sys.executable, str(REPO / "main.py"), *main_args(ws, *args, family=family)]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def newest_run(ws):
    return max((ws["root"] / "logs").iterdir(), key=lambda p: p.stat().st_mtime)


def read_embedding(path):
    emb = torch.load(path, weights_only=True)
    assert set(emb) >= {"string_to_token", "string_to_param"}
    return emb


@pytest.mark.slow
@pytest.mark.parametrize("family,width", [("ldm", 32), ("sd", 32)])
def test_inversion_writes_the_original_files(workspace, family, width):
    proc = run_main(workspace, "--init_word", "dog", "lightning.trainer.log_every_n_steps=1", family=family)
    assert "Setting learning rate to 1.00e-02 = 1 (accumulate_grad_batches) * 1 (num_gpus) * 2 (batchsize) * 5.00e-03 (base_lr)" in proc.stderr + proc.stdout
    run = newest_run(workspace)
    assert run.name.startswith("cat_toy") and run.name.endswith("_run")
    ckpt = run / "checkpoints"
    names = {p.name for p in ckpt.iterdir()}
    # every 4 steps and at the end of 6 steps, numbered as the original (step index of the last batch)
    assert {"embeddings.pt", "embeddings_gs-3.pt", "embeddings_gs-5.pt", "last.ckpt"} <= names
    assert not any(name.startswith("last-v") for name in names)  # one last.ckpt, replaced in place
    assert not [n for n in names if n.startswith(".")], "a temporary file was left behind"
    emb = read_embedding(ckpt / "embeddings.pt")
    assert list(emb["string_to_param"]) == ["*"] and emb["string_to_param"]["*"].shape == (1, width)
    assert emb["step"] == 5 and emb["seed"] == 23 and emb["base_model_sha256"] and len(emb["data_sha256"]) == 3
    assert len(list((run / "configs").glob("*-project.yaml"))) == 1 and len(list((run / "configs").glob("*-lightning.yaml"))) == 1
    keys = {p.name.split("_gs-")[0] for p in (run / "images" / "train").glob("*.jpg")}
    assert keys == {"inputs", "reconstruction", "conditioning", "samples", "samples_scaled"}
    rows = list(csv.DictReader(open(next(run.glob("csv/version_*/metrics.csv")))))
    losses = [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    last = torch.load(ckpt / "last.ckpt", weights_only=True)
    assert set(last["state_dict"]) <= {"embedding_manager.string_to_param_dict.*", "embedding_manager.initial_embeddings.*"}
    assert (ckpt / "last.ckpt").stat().st_size < 100_000
    assert (run / "loss.png").exists()


def main_args(ws, *args, family="ldm"):
    return ["--base", str(TINY_CONFIGS[family]), "-t", "--actual_resume", str(ws[family]), "-n", "run", "--data_root", str(ws["data"]),
            "-l", str(ws["root"] / "logs"), *args]


def test_placeholder_string_reaches_the_captions(workspace, main_in_process):
    proc = main_in_process(main_args(workspace, "--placeholder_string", "@", "--init_word", "dog", "--max_steps", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = newest_run(workspace)
    emb = read_embedding(run / "checkpoints" / "embeddings.pt")
    assert list(emb["string_to_param"]) == ["@"]
    project = next((run / "configs").glob("*-project.yaml")).read_text()
    assert "placeholder_token: '@'" in project


@pytest.mark.slow
def test_resume_after_kill_continues_the_run(workspace):
    cmd = [sys.executable, str(REPO / "main.py"), "--base", str(TINY_CONFIGS["ldm"]), "-t", "--actual_resume", str(workspace["ldm"]),
           "-n", "resume", "--data_root", str(workspace["data"]), "-l", str(workspace["root"] / "logs_resume"), "--max_steps", "400",
           "lightning.callbacks.image_logger.params.batch_frequency=1000"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    last = None
    while time.time() < deadline and last is None:
        for candidate in (workspace["root"] / "logs_resume").glob("*/checkpoints/last.ckpt"):
            if torch.load(candidate, weights_only=True)["global_step"] >= 8:  # written atomically: never half a file
                last = candidate
        time.sleep(0.2)
    proc.kill()  # SIGKILL: no chance to save anything more
    proc.wait()
    assert last is not None and last.exists()
    before = torch.load(last, weights_only=True)  # may be newer than the one seen: the run went on until killed
    target = before["global_step"] + 4
    run = last.parent.parent
    done = subprocess.run([sys.executable, str(REPO / "main.py"), "-r", str(run), "-t", "--actual_resume", str(workspace["ldm"]),
                           "--data_root", str(workspace["data"]), "--max_steps", str(target)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    after = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert before["global_step"] >= 8 and after["global_step"] == target
    assert "exp_avg" in str(after["optimizer_states"][0]["state"][0].keys())
    assert (run / "checkpoints" / f"embeddings_gs-{target - 1}.pt").exists()
    assert not list(run.glob("checkpoints/.*"))


@pytest.mark.slow
def test_sigterm_saves_the_embedding(workspace):
    logs = workspace["root"] / "logs_term"
    cmd = [sys.executable, str(REPO / "main.py"), "--base", str(TINY_CONFIGS["ldm"]), "-t", "--actual_resume", str(workspace["ldm"]),
           "-n", "term", "--data_root", str(workspace["data"]), "-l", str(logs), "--max_steps", "100000", "--log_every_n_steps", "1",
           "lightning.modelcheckpoint.params.every_n_train_steps=100000", "lightning.callbacks.image_logger.params.batch_frequency=100000"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(iter(lambda: proc.stdout.read(64), "")), daemon=True)
    reader.start()
    deadline = time.time() + 120
    while time.time() < deadline and not STEPS_DONE.search("".join(output)) and proc.poll() is None:
        time.sleep(0.1)  # until the progress lines show two training steps done
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    out = "".join(output)
    assert STEPS_DONE.search(out), out[-2000:]  # the signal came during training
    assert proc.returncode != 0
    emb = list(logs.glob("*/checkpoints/embeddings.pt"))
    assert emb, out[-2000:]
    read_embedding(emb[0])
    # the step in progress finished, and the checkpoint to resume from is the one of the step reached
    step = int(re.search(r"interrupted at step (\d+)", out).group(1))
    assert torch.load(emb[0].parent / "last.ckpt", weights_only=True)["global_step"] == step >= 2


def test_only_the_embedding_changes(workspace, tmp_path):
    """In process: train a few steps with the real Trainer and compare every weight before and after."""
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    config = OmegaConf.load(TINY_CONFIGS["ldm"])
    config.model.params.ckpt_path = str(workspace["ldm"])
    for split in ("train", "validation"):
        config.data.params[split].params.data_root = str(workspace["data"])
    model = instantiate_from_config(config.model)
    changed = train_briefly(model, instantiate_from_config(config.data))
    assert changed == ["embedding_manager.string_to_param_dict.*"]
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("embedding_manager"))


@pytest.mark.slow
def test_ddp_two_processes_write_one_run(workspace):
    logs = workspace["root"] / "logs_ddp"
    proc = subprocess.run(
        [sys.executable, str(REPO / "main.py"), "--base", str(TINY_CONFIGS["ldm"]), "-t", "--actual_resume", str(workspace["ldm"]),
         "-n", "ddp", "--data_root", str(workspace["data"]), "-l", str(logs), "--max_steps", "4", "--accelerator", "cpu",
         "--devices", "2", "--strategy", "ddp"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list(logs.iterdir())
    assert len(runs) == 1
    assert "ranks hold the same embedding" in proc.stderr + proc.stdout
    assert "2 (num_gpus)" in proc.stderr + proc.stdout
    read_embedding(runs[0] / "checkpoints" / "embeddings.pt")


def test_bf16_mixed_precision_on_cpu(workspace, main_in_process):
    proc = main_in_process(main_args(workspace, "--precision", "bf16-mixed", "--max_steps", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    emb = read_embedding(newest_run(workspace) / "checkpoints" / "embeddings.pt")
    assert emb["string_to_param"]["*"].dtype == torch.float32
    assert torch.isfinite(emb["string_to_param"]["*"]).all()


def test_console_without_a_terminal_gets_progress_lines_and_no_config_dump(workspace, main_in_process, caplog):
    """Under pytest stdout is no terminal, as in a redirected log: a line every log_every_n_steps steps and at the
    last, no bar redrawn at every step, and the merged config only in the run folder, with one line saying where."""
    caplog.set_level(logging.INFO, logger="ldm")  # another test's in-process command may have quietened "ldm"
    proc = main_in_process(main_args(workspace, "--max_steps", "5", "--log_every_n_steps", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = re.findall(r"\bstep (\d+)/5: loss_simple [\d.e+-]+, loss_vlb [\d.e+-]+, loss [\d.e+-]+, [\d.]+ it/s$", proc.stderr, re.MULTILINE)
    assert lines == ["2", "4", "5"], proc.stderr[-3000:]
    assert "Epoch 0" not in proc.stderr and "\r" not in proc.stderr
    run = newest_run(workspace)
    (project,) = (run / "configs").glob("*-project.yaml")
    assert f"merged config: {project} (and {project.name.removesuffix('-project.yaml')}-lightning.yaml)" in proc.stderr
    assert "base_learning_rate" in project.read_text() and "base_learning_rate" not in proc.stderr


@pytest.mark.parametrize("value,devices,count", [("0,", [0], 1), ("0,3,7,8", [0, 3, 7, 8], 4), ("2", 2, 2), (" 1 ", 1, 1)])
def test_gpus_accepts_lists_and_counts(value, devices, count):
    from ldm.train.cli import count_devices, parse_devices

    assert parse_devices(value) == devices and count_devices(parse_devices(value)) == count


SHAPES_SHORT = [  # the quickstart on the shipped shapes model, shortened: DVAR stops start 1 at step 20, start 2 at 60
    "--base", "configs/shapes/shapes-ldm-finetune.yaml", "-t", "--actual_resume", "models/shapes/model.ckpt",
    "--data_root", "models/shapes/concepts/orange_cross", "--init_word", "shape", "--accelerator", "cpu", "--max_steps", "120",
    "data.params.train.params.repeats=10",  # 50 items: epochs of 13 batches (the last one of 2)
    "lightning.modelcheckpoint.params.every_n_train_steps=20", "lightning.callbacks.early_stopping.params.window=20",
    "lightning.callbacks.early_stopping.params.threshold=0.11", "lightning.callbacks.image_logger.params.batch_frequency=50",
    "lightning.callbacks.interrupter.target=tests.interrupter.SignalAtStep",
]


def shapes_run(args, step=0, signal_name="SIGINT"):
    cmd = [sys.executable, str(REPO / "main.py"), *args, f"lightning.callbacks.interrupter.params.step={step}",
           f"lightning.callbacks.interrupter.params.signal_name={signal_name}"]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def final_state(run):
    vectors = read_embedding(run / "checkpoints" / "embeddings.pt")["string_to_param"]["*"]
    return vectors, torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]


@pytest.mark.slow
def test_interrupted_shapes_inversion_resumes_to_the_same_embedding(tmp_path):
    """Ctrl-C in start 1 (at the end of an epoch), SIGTERM at start 1's DVAR stop, Ctrl-C in start 2 (mid-epoch),
    kill -9 in start 2 (resumed from the checkpoint before it), each resumed with -r: the embedding and the step
    count of the run never interrupted, bit for bit."""
    whole = shapes_run([*SHAPES_SHORT, "-l", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "DVAR early stopping at step 20" in whole.stderr and "keeping start 2 of 2" in whole.stderr
    expected, steps = final_state(next((tmp_path / "whole").iterdir()))
    assert steps == 60

    first = shapes_run([*SHAPES_SHORT, "-l", str(tmp_path / "cut")], step=13)
    run = next((tmp_path / "cut").iterdir())
    assert first.returncode == 1 and "interrupted at step 13 (start 1 of 2, begun at step 0)" in first.stderr, first.stderr[-3000:]
    resume = ["-r", str(run), "-t", "--actual_resume", "models/shapes/model.ckpt", "--data_root", "models/shapes/concepts/orange_cross"]
    assert f"python main.py -r {run} -t" in first.stderr
    # at step 20 DVAR has ended start 1: the checkpoint holds it among the starts done, and start 2 begins there
    for step, signal_name, saved_at in [(20, "SIGTERM", 20), (33, "SIGINT", 33), (47, "SIGKILL", 40)]:
        cut = shapes_run(resume, step=step, signal_name=signal_name)
        assert cut.returncode != 0, cut.stderr[-3000:]
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == saved_at
        if signal_name != "SIGKILL":
            assert f"interrupted at step {step} (start 2 of 2, begun at step 20)" in cut.stderr, cut.stderr[-3000:]
    done = shapes_run(resume)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming the epoch at batch 1 of 13" in done.stderr  # step 40 = 3 epochs of 13 + 1 batch
    vectors, steps = final_state(run)
    assert steps == 60 and torch.equal(vectors, expected)
