"""CUDA checks (skipped where there is no GPU): the same numbers as on CPU, bf16 autocast, and main.py on --gpus 0,."""
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from paths import FIXTURES, REPO
from ldm.checkpoint import load_state_dict
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.util import instantiate_from_config
from tiny_models import TINY_CONFIGS, make_concept_folder, make_tiny_checkpoint

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_model():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    m = instantiate_from_config(OmegaConf.load(FIXTURES / "ldm-tiny.yaml").model)
    m.load_state_dict(load_state_dict(FIXTURES / "ldm-tiny.ckpt"), strict=False)
    return m.eval().cuda()


@pytest.fixture(scope="module")
def F():
    return {k: v.cuda() for k, v in torch.load(FIXTURES / "ldm-tiny.fixtures.pt", weights_only=True).items()}


def test_cuda_matches_the_reference(cuda_model, F):
    with torch.no_grad():
        c = cuda_model.get_learned_conditioning(F["inputs.tokens"])
        torch.testing.assert_close(c, F["cond.c"], rtol=1e-3, atol=1e-3)
        eps = cuda_model.apply_model(F["q_sample.x_noisy"], F["inputs.t"], c)
        torch.testing.assert_close(eps, F["apply_model.eps_c"], rtol=1e-3, atol=1e-3)
    samples, _ = DDIMSampler(cuda_model).sample(S=5, batch_size=2, shape=[4, 8, 8], conditioning=F["cond.c"], verbose=False, x_T=F["inputs.x_T"],
                                                unconditional_guidance_scale=3.0, unconditional_conditioning=F["cond.uc"])
    torch.testing.assert_close(samples, F["ddim.S5.eta0.scale3.samples"], rtol=1e-2, atol=1e-2)


def test_bf16_autocast_on_cuda(cuda_model, F):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = cuda_model.p_losses(F["inputs.x_start"], F["cond.c"], F["inputs.t"], noise=F["inputs.noise"])
    assert torch.isfinite(loss)
    assert abs(loss.item() - F["p_losses.loss"].item()) < 0.05 * F["p_losses.loss"].item()


@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "16-mixed"])
def test_main_on_one_gpu(tmp_path, precision):
    ckpt = make_tiny_checkpoint("ldm", tmp_path / "ldm.ckpt")
    data = make_concept_folder(tmp_path / "data")
    proc = subprocess.run(
        [sys.executable, str(REPO / "main.py"), "--base", str(TINY_CONFIGS["ldm"]), "-t", "--actual_resume", str(ckpt), "-n", "gpu",
         "--gpus", "0,", "--data_root", str(data), "-l", str(tmp_path / "logs"), "--max_steps", "4", "--precision", precision,
         # compile auto (on for CUDA) runs in fp32; the mixed precisions train eagerly, sparing two compilations
         *(["model.params.compile=off"] if precision != "32" else [])],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "logs").glob("*/checkpoints/embeddings_gs-3.pt"))
