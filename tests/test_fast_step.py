"""The fast training step (ldm/models/diffusion/fast_step.py): the compiled step computes what the eager one does,
one real Lightning step makes the host wait for the device nowhere, and the flag's settings are checked.

The compiled-step test uses the ``aot_eager`` backend on CPU: it runs TorchDynamo's capture and AOTAutograd's
joint forward/backward graph (where a compiled step can go wrong: graph breaks, functionalisation, the gradient
path to the placeholder) but not inductor's code generation, which takes about four minutes for the tiny UNet's
forward and backward on this project's 2-core CI machine. Inductor itself is compared on CUDA (``gpu`` marker).
"""
import os
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch._dynamo.utils import counters

from ldm.models.diffusion.fast_step import CompileOptions, HostFlag, HostSyncDetector, compile_training_step, training_denoiser
from ldm.train.callbacks import ProgressBar
from ldm.util import instantiate_from_config
from paths import REPO
from tiny_models import TINY_CONFIGS, make_concept_folder, make_tiny_checkpoint


def tiny_model(family: str, **params):
    """The tiny config's inversion model with random weights whose UNet output is not zero (so gradients flow)."""
    config = OmegaConf.load(TINY_CONFIGS[family])
    config.model.params.update(params)
    torch.manual_seed(0)
    model = instantiate_from_config(config.model)
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def tiny_batch(n: int = 2, size: int = 16) -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "image": torch.rand(n, size, size, 3, generator=g) * 2 - 1,
        "caption": ["a photo of a *", "a rendering of a *"][:n],
        "index": torch.arange(n),
        "flip": torch.tensor([False, True][:n]),
    }


def loss_and_grad(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    model.train()
    (param,) = model.embedding_manager.embedding_parameters()
    param.grad = None
    torch.manual_seed(3)
    loss, _ = model.shared_step(batch)
    loss.backward()
    return loss.detach(), param.grad.clone()


@pytest.mark.parametrize("family,setting", [("ldm", "all"), ("sd", "unet")])
def test_compiled_step_gives_the_eager_loss_and_gradient(family, setting):
    model = tiny_model(family, compile=setting, compile_backend="aot_eager")
    batch = tiny_batch()
    eager_loss, eager_grad = loss_and_grad(model, batch)
    assert eager_grad.abs().sum() > 0
    assert compile_training_step(model, model.compile_options) == (("unet", "text") if setting == "all" else ("unet",))
    assert training_denoiser(model) is not model.model
    torch._dynamo.reset()  # a graph cached by an earlier test of the same architecture would be reused
    counters.clear()
    compiled_loss, compiled_grad = loss_and_grad(model, batch)
    assert counters["stats"]["unique_graphs"] >= (2 if setting == "all" else 1)  # the step ran through dynamo
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-7)
    model.eval()
    assert training_denoiser(model) is model.model  # sampling and validation stay eager


def test_lightning_fit_trains_through_the_compiled_denoiser():
    model = tiny_model("sd", compile="unet", compile_backend="aot_eager")
    model.learning_rate = 5e-3
    batch = tiny_batch()
    before = next(model.embedding_manager.embedding_parameters()).detach().clone()
    used: list[bool] = []

    class Check(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            used.append(training_denoiser(pl_module) is pl_module.__dict__.get("_compiled_denoiser"))

    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=[Check()])
    trainer.fit(model, torch.utils.data.DataLoader([{k: v[i] for k, v in batch.items()} for i in range(2)] * 2, batch_size=2))
    assert used == [True, True]  # on_fit_start compiled it and the training steps run it
    assert not torch.equal(next(model.embedding_manager.embedding_parameters()).detach(), before)


class SyncWatch(pl.Callback):
    """Watches each training step (after the batch reached the device, through the optimizer step) for host syncs."""

    def __init__(self) -> None:
        self.detectors: list[HostSyncDetector] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.detectors.append(HostSyncDetector())
        self.detectors[-1].__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.detectors[-1].__exit__(None, None, None)


@pytest.mark.parametrize("family", ["ldm", "sd"])
def test_a_lightning_training_step_never_waits_for_the_device(family):
    model = tiny_model(family)
    model.learning_rate = 5e-3
    batch = tiny_batch()
    samples = [{k: v[i] for k, v in batch.items()} for i in range(2)] * 3
    watch = SyncWatch()
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[watch], limit_val_batches=0)
    before = next(model.embedding_manager.embedding_parameters()).detach().clone()
    trainer.fit(model, torch.utils.data.DataLoader(samples, batch_size=2))
    assert len(watch.detectors) == 3
    assert not torch.equal(next(model.embedding_manager.embedding_parameters()).detach(), before)  # it did train
    for step, detector in enumerate(watch.detectors):
        assert not detector.syncs, f"step {step} synchronised:\n{detector.report()}"


class LoopWatch(pl.Callback):
    """Watches whole loop iterations, each from one batch's start to the next's (so the bar and the logger too)."""

    def __init__(self) -> None:
        self.detectors: list[HostSyncDetector] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.detectors:
            self.detectors[-1].__exit__(None, None, None)
        self.detectors.append(HostSyncDetector())
        self.detectors[-1].__enter__()

    def on_train_end(self, trainer, pl_module) -> None:
        self.detectors[-1].__exit__(None, None, None)


def test_lightning_reads_the_losses_only_when_the_bar_refreshes_or_the_log_is_written(tmp_path):
    model = tiny_model("ldm")
    model.learning_rate = 5e-3
    batch = tiny_batch()
    watch = LoopWatch()
    trainer = pl.Trainer(max_steps=10, accelerator="cpu", devices=1, logger=pl.loggers.CSVLogger(str(tmp_path)), log_every_n_steps=5,
                         enable_checkpointing=False, enable_model_summary=False, callbacks=[ProgressBar(refresh_rate=5), watch], limit_val_batches=0)
    trainer.fit(model, torch.utils.data.DataLoader([{k: v[i] for k, v in batch.items()} for i in range(2)] * 10, batch_size=2))
    assert len(watch.detectors) == 10
    quiet = [i for i in range(9) if (i + 1) % 5]
    for i in quiet:
        assert not watch.detectors[i].syncs, f"loop iteration {i} synchronised:\n{watch.detectors[i].report()}"
    assert watch.detectors[4].syncs  # writing the CSV log after step 5 reads the losses


def test_the_detector_sees_a_scalar_read():
    with HostSyncDetector() as detector:
        loss = torch.ones(3).sum()
        if loss > 0:  # bool() of a tensor: the host reads the value
            pass
    assert detector.syncs and "_local_scalar_dense" in detector.syncs[0][0]


def test_host_flag_reports_a_value_without_waiting():
    flag = HostFlag()
    assert flag.read() is None
    assert flag.exchange(torch.tensor(False)) is False  # on a CPU the copy is done at once
    assert flag.read() is False
    assert flag.read_now(torch.tensor(True)) is True


@pytest.mark.gpu
def test_host_flag_on_cuda_gives_the_previous_copy():
    flag = HostFlag()
    assert flag.exchange(torch.tensor(False, device="cuda")) is None  # nothing on the host yet; nobody waits
    torch.cuda.synchronize()
    assert flag.exchange(torch.tensor(True, device="cuda")) is False
    assert flag.read_now(torch.tensor(True, device="cuda")) is True


def test_compile_settings():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert CompileOptions.from_config().targets(cpu) == ()
    assert CompileOptions.from_config(None).targets(cuda) == ("unet",)
    assert CompileOptions.from_config(True).targets(cpu) == ("unet",)
    assert CompileOptions.from_config(False).targets(cuda) == ()
    assert CompileOptions.from_config("all", "reduce-overhead").mode == "reduce-overhead"
    with pytest.raises(ValueError, match="model.params.compile must be one of"):
        CompileOptions.from_config("fast")


def test_auto_trains_eagerly_where_inductor_cannot_build_gpu_code(monkeypatch, caplog):
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert CompileOptions.from_config("auto").targets(torch.device("cuda")) == ()
    assert "no C compiler" in caplog.text
    assert CompileOptions.from_config("unet").targets(torch.device("cuda")) == ("unet",)  # asked for: it is tried


def test_main_names_a_wrong_compile_setting_in_one_line(tmp_path):
    ckpt = make_tiny_checkpoint("ldm", tmp_path / "ldm.ckpt")
    cmd = [sys.executable, str(REPO / "main.py"), "--base", str(TINY_CONFIGS["ldm"]), "-t", "--actual_resume", str(ckpt), "--data_root",
           str(make_concept_folder(tmp_path / "data")), "-l", str(tmp_path / "logs"), "--max_steps", "1", "model.params.compile=fast"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: model.params.compile must be one of auto, off, unet, all (or true/false), not 'fast'"


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_inductor_on_cuda_gives_the_eager_loss_and_gradient(mode):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = tiny_model("sd", compile="unet", compile_mode=mode).cuda()
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in tiny_batch().items()}
    eager_loss, eager_grad = loss_and_grad(model, batch)
    compile_training_step(model, model.compile_options)
    for _ in range(3):  # CUDA graphs record on a later call than the first
        compiled_loss, compiled_grad = loss_and_grad(model, batch)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-3, atol=1e-6)


@pytest.mark.gpu
def test_a_cuda_training_step_never_waits_for_the_device():
    model = tiny_model("sd")
    model.learning_rate = 5e-3
    batch = tiny_batch()
    watch = SyncWatch()
    trainer = pl.Trainer(max_steps=3, accelerator="cuda", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[watch], limit_val_batches=0)
    trainer.fit(model, torch.utils.data.DataLoader([{k: v[i] for k, v in batch.items()} for i in range(2)] * 3, batch_size=2))
    for step, detector in enumerate(watch.detectors):
        assert not detector.syncs, f"step {step} synchronised:\n{detector.report()}"
