"""scripts/export_ema_weights.py: a training checkpoint becomes a small model file with the EMA weights in the UNet."""
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config
from paths import REPO
from scripts.export_ema_weights import main

CONFIG = REPO / "configs" / "shapes" / "shapes-ldm-train.yaml"


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory):
    """A checkpoint as training leaves it: UNet weights, and EMA copies that differ from them."""
    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.load(CONFIG).model)
    with torch.no_grad():
        for name, buffer in model.model_ema.named_buffers():
            if name not in ("decay", "num_updates"):
                buffer.add_(1.0)
    path = tmp_path_factory.mktemp("export") / "last.ckpt"
    torch.save({"state_dict": model.state_dict(), "global_step": 123, "optimizer_states": [{}]}, path)
    return path, model


@pytest.mark.parametrize("float32", [False, True])
def test_the_exported_file_holds_the_ema_weights(training_checkpoint, tmp_path, float32):
    ckpt, model = training_checkpoint
    out = tmp_path / "sub" / "model.ckpt"
    main(["--config", str(CONFIG), "--ckpt", str(ckpt), "--out", str(out)] + (["--float32"] if float32 else []))
    saved = torch.load(out, weights_only=True)
    assert set(saved) == {"state_dict", "global_step"} and saved["global_step"] == 123
    sd = saved["state_dict"]
    assert not [k for k in sd if k.startswith("model_ema.")]
    assert set(sd) == {k for k in model.state_dict() if not k.startswith("model_ema.")}
    name = next(n for n, _ in model.model.named_parameters())
    ema = dict(model.model_ema.named_buffers())[name.replace(".", "")]  # LitEma names its copies without dots
    assert sd[f"model.{name}"].dtype == (torch.float32 if float32 else torch.float16)
    torch.testing.assert_close(sd[f"model.{name}"].float(), ema, rtol=1e-3, atol=1e-3)  # the EMA copy, not the weight
    reloaded = instantiate_from_config(OmegaConf.load(CONFIG).model)
    missing, unexpected = reloaded.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("model_ema.") for k in missing)


@pytest.mark.slow
def test_a_missing_checkpoint_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "export_ema_weights.py"), "--config", str(CONFIG),
                           "--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "m.ckpt")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "nope.ckpt" in proc.stderr
    assert not (tmp_path / "m.ckpt").exists()
