"""The whole LatentDiffusion against outputs of the ORIGINAL code (tests/fixtures/equiv, ldm-tiny, float32, CPU)."""
import pytest
import torch
from omegaconf import OmegaConf

from paths import FIXTURES
from ldm.checkpoint import load_state_dict
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.schedule import SCHEDULE_BUFFERS
from ldm.util import instantiate_from_config


@pytest.fixture(scope="module")
def model():
    config = OmegaConf.load(FIXTURES / "ldm-tiny.yaml")
    m = instantiate_from_config(config.model)
    missing, unexpected = m.load_state_dict(load_state_dict(FIXTURES / "ldm-tiny.ckpt"), strict=False)
    assert not missing and not unexpected
    return m.eval()


@pytest.fixture(scope="module")
def F():
    return torch.load(FIXTURES / "ldm-tiny.fixtures.pt", weights_only=True)


def close(out, ref, rtol=1e-4):
    atol = rtol * max(1.0, ref.abs().max().item())
    assert out.shape == ref.shape
    assert torch.allclose(out.float(), ref.float(), rtol=rtol, atol=atol), (out - ref).abs().max().item()


class PlaceholderSwap(torch.nn.Module):
    """The minimal embedding-manager contract: replace the token-embedding rows of one id by a vector."""

    def __init__(self, token, vec):
        super().__init__()
        self.token, self.vec = token, vec

    def forward(self, ids, emb):
        return torch.where((ids == self.token)[..., None], self.vec.to(emb.dtype), emb)


def test_schedule_buffers(model, F):
    for name in SCHEDULE_BUFFERS + ("lvlb_weights",):
        close(getattr(model, name), F[f"schedule.{name}"], rtol=1e-6)
    assert torch.equal(model.logvar, torch.zeros(1000))


def test_conditioning_and_apply_model(model, F):
    with torch.no_grad():
        c = model.get_learned_conditioning(F["inputs.tokens"])
        uc = model.get_learned_conditioning(F["inputs.uc_tokens"])
        close(c, F["cond.c"])
        close(uc, F["cond.uc"])
        x_noisy = model.q_sample(F["inputs.x_start"], F["inputs.t"], F["inputs.noise"])
        close(x_noisy, F["q_sample.x_noisy"])
        close(model.apply_model(x_noisy, F["inputs.t"], c), F["apply_model.eps_c"])
        close(model.apply_model(x_noisy, F["inputs.t"], uc), F["apply_model.eps_uc"])
        close(model.apply_model(F["inputs.x_start"], torch.tensor([0, 999]), c), F["apply_model.eps_c_xstart_t0"])


def test_first_stage(model, F):
    with torch.no_grad():
        post = model.encode_first_stage(F["inputs.image"])
        close(post.mean, F["first_stage.posterior_mean"])
        close(post.logvar, F["first_stage.posterior_logvar"])
        close(model.scale_factor * post.mode(), F["first_stage.z_mode_scaled"])
        torch.manual_seed(77)
        close(model.get_first_stage_encoding(post), F["first_stage.z_sample_scaled_seed77"])
        close(model.decode_first_stage(F["inputs.z_dec"]), F["first_stage.decode_first_stage_z_dec"])


def test_p_losses_and_placeholder_gradient(model, F):
    with torch.no_grad():
        loss, loss_dict = model.p_losses(F["inputs.x_start"], F["cond.c"], F["inputs.t"], noise=F["inputs.noise"])
    close(loss, F["p_losses.loss"])
    for key in ("val/loss_simple", "val/loss_vlb", "val/loss"):
        close(loss_dict[key], F[f"p_losses.dict.{key}"])
    vec = F["inputs.placeholder_vec"].clone().requires_grad_(True)
    swap = PlaceholderSwap(int(F["inputs.placeholder_id"]), vec)
    c_ph = model.cond_stage_model.encode(F["inputs.tokens"], embedding_manager=swap)
    close(c_ph.detach(), F["cond.c_placeholder"])
    loss_ph, _ = model.p_losses(F["inputs.x_start"], c_ph, F["inputs.t"], noise=F["inputs.noise"])
    close(loss_ph.detach(), F["p_losses.loss_placeholder"])
    (grad,) = torch.autograd.grad(loss_ph, vec)
    close(grad, F["p_losses.grad_placeholder_vec"])


def test_forward_draws_in_the_original_order(model, F):
    torch.manual_seed(4242)
    with torch.no_grad():
        loss, _ = model(F["inputs.x_start"], F["inputs.tokens"])
    close(loss, F["forward_seed4242.loss"])


@pytest.mark.parametrize("name,cls", [("ddim", DDIMSampler), ("plms", PLMSSampler)])
@pytest.mark.parametrize("scale", [1, 3])
def test_samplers_every_intermediate(model, F, name, cls, scale):
    sampler = cls(model)
    samples, inter = sampler.sample(
        S=5, batch_size=2, shape=[4, 8, 8], conditioning=F["cond.c"], verbose=False, eta=0.0, x_T=F["inputs.x_T"],
        log_every_t=1, unconditional_guidance_scale=float(scale), unconditional_conditioning=F["cond.uc"],
    )
    prefix = f"{name}.S5.eta0.scale{scale}"
    close(samples, F[f"{prefix}.samples"], rtol=1e-3)
    close(torch.stack(inter["x_inter"]), F[f"{prefix}.x_inter"], rtol=1e-3)
    close(torch.stack(inter["pred_x0"]), F[f"{prefix}.pred_x0"], rtol=1e-3)
    with torch.no_grad():
        close(model.decode_first_stage(samples), F[f"{prefix}.decoded"], rtol=1e-3)
    assert list(sampler.ddim_timesteps) == [1, 201, 401, 601, 801]
    close(sampler.ddim_alphas, F[f"{name}.ddim_alphas"].float(), rtol=1e-6)
    close(torch.as_tensor(sampler.ddim_alphas_prev), F[f"{name}.ddim_alphas_prev"], rtol=1e-6)


def test_ddim_stochastic_seeded(model, F):
    sampler = DDIMSampler(model)
    torch.manual_seed(31337)
    samples, _ = sampler.sample(
        S=5, batch_size=2, shape=[4, 8, 8], conditioning=F["cond.c"], verbose=False, eta=1.0, x_T=F["inputs.x_T"],
        unconditional_guidance_scale=3.0, unconditional_conditioning=F["cond.uc"],
    )
    close(sampler.ddim_sigmas, F["ddim.eta1.ddim_sigmas"], rtol=1e-5)
    close(samples, F["ddim.S5.eta1.scale3.seed31337.samples"], rtol=1e-3)


def test_gradient_checkpointing_switch_keeps_the_placeholder_gradient(F):
    """Checkpointing on (frozen weights) gives the same placeholder gradient as the original's reference."""
    config = OmegaConf.load(FIXTURES / "ldm-tiny.yaml")
    config.model.params.gradient_checkpointing = True
    m = instantiate_from_config(config.model)
    m.load_state_dict(load_state_dict(FIXTURES / "ldm-tiny.ckpt"), strict=False)
    m.eval().requires_grad_(False)
    vec = F["inputs.placeholder_vec"].clone().requires_grad_(True)
    c_ph = m.cond_stage_model.encode(F["inputs.tokens"], embedding_manager=PlaceholderSwap(int(F["inputs.placeholder_id"]), vec))
    loss, _ = m.p_losses(F["inputs.x_start"], c_ph, F["inputs.t"], noise=F["inputs.noise"])
    (grad,) = torch.autograd.grad(loss, vec)
    close(grad, F["p_losses.grad_placeholder_vec"])


def test_bf16_autocast_on_cpu_is_close_to_fp32(model, F):
    vec = F["inputs.placeholder_vec"].clone().requires_grad_(True)
    swap = PlaceholderSwap(int(F["inputs.placeholder_id"]), vec)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c_ph = model.cond_stage_model.encode(F["inputs.tokens"], embedding_manager=swap)
        loss, _ = model.p_losses(F["inputs.x_start"], c_ph, F["inputs.t"], noise=F["inputs.noise"])
    (grad,) = torch.autograd.grad(loss, vec)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert abs(loss.item() - F["p_losses.loss_placeholder"].item()) < 0.05 * F["p_losses.loss_placeholder"].item()
    cos = torch.nn.functional.cosine_similarity(grad.float(), F["p_losses.grad_placeholder_vec"], dim=0)
    assert cos > 0.9


@pytest.mark.parametrize("steps", [3, 7, 9])
def test_ddim_step_counts_that_crashed_the_original(model, F, steps):
    samples, _ = DDIMSampler(model).sample(S=steps, batch_size=2, shape=[4, 8, 8], conditioning=F["cond.c"], verbose=False, x_T=F["inputs.x_T"])
    assert torch.isfinite(samples).all()
