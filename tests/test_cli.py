"""main.py's command line: help and argument errors without heavy imports, and bad input caught before the model
is built (a mistyped override, an unknown placeholder or init word, an embedding file given as the model)."""
from __future__ import annotations

import subprocess
import sys

import pytest

import main
from paths import REPO

SHAPES = ["--base", "configs/shapes/shapes-ldm-finetune.yaml", "-t", "--actual_resume", "models/shapes/model.ckpt",
          "--data_root", "models/shapes/concepts/orange_cross", "--init_word", "shape", "--max_steps", "1"]


def test_help_and_parsing_import_no_torch():
    code = ("import sys, main; main.get_parser().parse_known_args(['--base', 'x.yaml']); "
            "heavy = [m for m in ('torch', 'pytorch_lightning', 'transformers') if m in sys.modules]; print(heavy)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr
    result = subprocess.run([sys.executable, "main.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--placeholder_string" in result.stdout


def run_main(argv: list[str], tmp_path, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main.main([*argv, "-l", str(tmp_path / "logs")])
    return int(exit_info.value.code), capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["model.params.personalization_config.params.num_vector_per_token=4"], ["'num_vector_per_token'", "'num_vectors_per_token'"]),
        (["--placeholder_string", "zebra"], ["'zebra' is not in the vocabulary", "'[UNK]'", "--placeholder_string"]),
        (["--init_word", "giraffe"], ["init word 'giraffe'", "--init_word"]),
        (["--actual_resume", "models/shapes/embeddings/orange_cross_4_vectors.pt"],
         ["is an embedding file", "pass it as --embedding_manager_ckpt"]),
    ],
)
def test_bad_input_is_one_line_before_training(extra, needles, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("TI_RUN_DIR", str(tmp_path / "logs" / "run"))  # main sets it for DDP ranks; removed afterwards
    code, err = run_main([*SHAPES, *extra], tmp_path, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and all(n in last for n in needles), err
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").rglob("*.pt"))


def test_expected_lightning_messages_are_silenced_and_others_kept(caplog):
    import logging
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main.silence_expected_warnings()
        warnings.warn("Checkpoint directory /x/checkpoints exists and is not empty.")
        warnings.warn("You defined a `validation_step` but have no `val_dataloader`. Skipping val loop.")
        warnings.warn("something else went wrong")
    assert [str(w.message) for w in caught] == ["something else went wrong"]
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger="pytorch_lightning.utilities.rank_zero"):
        rank_zero.info("💡 Tip: For seamless cloud logging, try installing litlogger")
        rank_zero.info("GPU available: False")
    assert "Tip" not in caplog.text and "GPU available" in caplog.text
