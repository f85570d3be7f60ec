"""Bad input to main.py: one line on stderr naming the file or flag, exit status 2, no traceback.

Most cases call ``main.main`` in this process through ``run_cli``, as the real command does, without the seconds
of a fresh interpreter (the ``main_in_process`` fixture of conftest.py); two run the real command in a subprocess,
to check the exit status and stderr end to end.
"""
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from paths import REPO
from tiny_models import TINY_CONFIGS, make_concept_folder, make_tiny_checkpoint

ENV_KEYS = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    junk = root / "junk.ckpt"
    junk.write_bytes(b"this is not a checkpoint" * 10)
    wide = root / "wide.pt"
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": torch.randn(1, 768)}}, wide)
    empty = root / "empty"
    empty.mkdir()
    broken = root / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (broken / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    mixed = make_concept_folder(root / "mixed", n=2)
    (mixed / "zz_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    tiny = make_concept_folder(root / "tiny", n=2)
    Image.new("RGB", (1, 1), (200, 30, 30)).save(tiny / "pixel.png")
    notes = root / "notes.txt"
    notes.write_text("a photo of a cat toy\n")
    return {
        "root": root, "ldm": make_tiny_checkpoint("ldm", root / "ldm.ckpt"), "sd": make_tiny_checkpoint("sd", root / "sd.ckpt"),
        "data": make_concept_folder(root / "data"), "junk": junk, "wide": wide, "empty": empty, "broken": broken, "mixed": mixed,
        "tiny": tiny, "notes": notes,
    }


def main_args(ws, *args, base=None, ckpt=None, data=None):
    return ["--base", str(base or TINY_CONFIGS["ldm"]), "-t", "--actual_resume", str(ckpt or ws["ldm"]),
            "--data_root", str(data or ws["data"]), "-l", str(ws["root"] / "logs"), "--max_steps", "1", *args]


def main_subprocess(argv):
    cmd = [sys.executable, str(REPO / "main.py"), *argv]
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, **ENV_KEYS}, capture_output=True, text=True, timeout=240)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    for needle in needles:
        assert needle in last, last


def test_missing_data_root(ws, main_in_process):
    assert_one_line_error(main_in_process(main_args(ws, data=ws["root"] / "nope")), str(ws["root"] / "nope"), "--data_root")


def test_empty_data_root(ws, main_in_process):
    assert_one_line_error(main_in_process(main_args(ws, data=ws["empty"])), str(ws["empty"]))


def test_data_root_without_a_readable_image(ws, main_in_process):
    assert_one_line_error(main_in_process(main_args(ws, data=ws["broken"])), str(ws["broken"]))


def test_corrupt_image_is_skipped_with_one_warning(ws, main_in_process):
    """main.py checks the folder before building the model and the dataset reads it again: warned about once."""
    proc = main_in_process(main_args(ws, data=ws["mixed"]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("zz_bad.png") == 1, proc.stderr[-2000:]


def test_a_one_pixel_image_is_refused_naming_the_file_and_the_minimum(ws, main_in_process):
    """1x1 would train the word on one flat colour: refused before the model is built."""
    proc = main_in_process(main_args(ws, data=ws["tiny"]))
    assert_one_line_error(proc, f"image '{ws['tiny'] / 'pixel.png'}' is 1x1 pixels", "at least 8 pixels per side", "remove it")
    assert "Restored from" not in proc.stderr  # refused before the model was built


def test_a_text_file_as_the_starting_embedding(ws, main_in_process):
    proc = main_in_process(main_args(ws, "--embedding_manager_ckpt", str(ws["notes"])))
    assert_one_line_error(proc, f"'{ws['notes']}' is a text file (first line: 'a photo of a cat toy'), not an embedding file")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check is for machines without a GPU")
def test_gpus_without_a_gpu_names_accelerator_cpu(ws, main_in_process):
    proc = main_in_process(main_args(ws, "--gpus", "0,"))
    assert_one_line_error(proc, "--gpus 0,: this machine has no GPU", "--accelerator cpu")
    assert "Restored from" not in proc.stderr  # before the model and the Trainer are built
    proc = main_in_process(main_args(ws, "lightning.trainer.accelerator=cuda"))
    assert_one_line_error(proc, "accelerator 'cuda'", "no CUDA device", "--accelerator cpu")


def test_filewords_template_without_caption_files(ws, main_in_process):
    proc = main_in_process(main_args(ws, 'data.params.train.params.templates=["a photo of a [filewords] {}"]'))
    assert_one_line_error(proc, "caption file", ".txt' is missing", "[filewords]")


def test_override_that_is_not_yaml(ws, main_in_process):
    proc = main_in_process(main_args(ws, "data.params.train.params.templates=[a photo of a [filewords] {}]"))
    assert_one_line_error(proc, "config override failed", "not valid YAML", "quote")


def test_missing_checkpoint(ws, main_in_process):
    assert_one_line_error(main_in_process(main_args(ws, ckpt=ws["root"] / "missing.ckpt")), "missing.ckpt", "does not exist")


def test_checkpoint_that_is_not_one(ws, main_in_process):
    assert_one_line_error(main_in_process(main_args(ws, ckpt=ws["junk"])), "junk.ckpt", "is a text file", "not a model checkpoint")


def test_yaml_given_as_checkpoint(ws, main_in_process):
    assert_one_line_error(main_in_process(main_args(ws, ckpt=TINY_CONFIGS["ldm"])), "config file, not a checkpoint")


@pytest.mark.slow
def test_checkpoint_of_the_wrong_family_real_command(ws):
    """Subprocess smoke test: the real interpreter exits 2 with the one line, after building the model."""
    assert_one_line_error(main_subprocess(main_args(ws, ckpt=ws["sd"])), "sd.ckpt", "SD v1", "LDM")


def test_multi_token_placeholder(ws, main_in_process):
    assert_one_line_error(main_in_process(main_args(ws, "--placeholder_string", "zxqv")), "'zxqv'", "--placeholder_string")


def test_embedding_of_the_wrong_width(ws, main_in_process):
    assert_one_line_error(main_in_process(main_args(ws, "--embedding_manager_ckpt", str(ws["wide"]))), "wide.pt", "768")


def test_config_that_does_not_exist(ws, main_in_process):
    assert_one_line_error(main_in_process(main_args(ws, base=ws["root"] / "nope.yaml")), "nope.yaml", "--base")


def test_style_config_without_max_steps_asks_for_it(ws, main_in_process):
    argv = ["--base", str(REPO / "configs/latent-diffusion/txt2img-1p4B-finetune_style.yaml"), "-t", "--actual_resume", str(ws["ldm"]),
            "--data_root", str(ws["data"]), "-l", str(ws["root"] / "logs")]
    assert_one_line_error(main_in_process(argv), "--max_steps")


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_embedding_real_command(ws):
    """Subprocess smoke test: an error in the middle of training, through Lightning, is still one line and exit 2."""
    proc = main_subprocess(main_args(ws, "model.params.l_simple_weight=.nan", "--max_steps", "3"))
    assert_one_line_error(proc, "loss became NaN or infinite")
    saved = max((ws["root"] / "logs").glob("*/checkpoints/embeddings.pt"), key=lambda p: p.stat().st_mtime)
    assert torch.isfinite(torch.load(saved, weights_only=True)["string_to_param"]["*"]).all()


def test_debug_opens_the_debugger_and_moves_the_run(ws, main_in_process, monkeypatch, tmp_path):
    """-d/--debug, as the original: post-mortem on an error, and the new run folder ends up in <logdir>/debug_runs."""
    import pdb

    opened = []
    monkeypatch.setattr(pdb, "post_mortem", lambda *a: opened.append(sys.exc_info()[0]))
    logs = tmp_path / "logs"
    proc = main_in_process([*main_args(ws, "model.params.l_simple_weight=.nan", "--max_steps", "2"), "-l", str(logs), "-d", "-n", "dbg"])
    assert_one_line_error(proc, "loss became NaN or infinite")
    assert opened and opened[0].__name__ == "NonFiniteLossError"
    (run,) = (logs / "debug_runs").iterdir()
    assert run.name.endswith("_dbg") and (run / "checkpoints" / "embeddings.pt").exists()
    assert [p.name for p in logs.iterdir()] == ["debug_runs"]
    proc = main_in_process([*main_args(ws), "-l", str(tmp_path / "plain")])
    assert proc.returncode == 0 and not opened[1:] and not (tmp_path / "plain" / "debug_runs").exists()
