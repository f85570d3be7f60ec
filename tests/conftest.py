"""Test-wide settings: offline hub, one CPU thread (tiny models run far faster that way), ``gpu`` tests skipped
without CUDA (the markers are declared in pytest.ini)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import logging
import signal
import sys
from types import SimpleNamespace

import pytest
import torch

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def main_in_process(monkeypatch, capsys, caplog):
    """``main.py ARGS`` in this process: returns (returncode, stderr with the log records first); restores what
    ``main`` changes process-wide (environment, SIGTERM handler, matmul precision, sys.path)."""
    import main as main_module
    from ldm.errors import run_cli

    environ, sigterm, precision = dict(os.environ), signal.getsignal(signal.SIGTERM), torch.get_float32_matmul_precision()
    monkeypatch.setattr(sys, "path", list(sys.path))
    os.environ.pop("TI_RUN_DIR", None)  # set by a run for its DDP ranks: each call is a new run

    def run(argv):
        monkeypatch.setattr(sys, "argv", ["main.py", *argv])
        caplog.clear()
        code = 0
        with caplog.at_level(logging.INFO):
            try:
                run_cli(main_module.main)
            except SystemExit as exit_:
                code = exit_.code
        return SimpleNamespace(returncode=code, stderr=caplog.text + capsys.readouterr().err)

    yield run
    os.environ.clear()
    os.environ.update(environ)
    signal.signal(signal.SIGTERM, sigterm)
    torch.set_float32_matmul_precision(precision)
