"""ldm/models/diffusion/sampling.py: the pure DDIM/PLMS functions on hand-made noise predictors (the adapters and the
original's numerics are checked against fixtures in test_equivalence.py)."""
import numpy as np
import pytest
import torch

from ldm.models.diffusion.sampling import cfg_eps, ddim_schedule, ddim_sigmas, sample_ddim, sample_plms
from ldm.models.diffusion.schedule import schedule_arrays

ALPHAS_CUMPROD = torch.tensor(schedule_arrays(timesteps=1000)["alphas_cumprod"], dtype=torch.float32)


@pytest.fixture
def schedule():
    return ddim_schedule(ALPHAS_CUMPROD, 10)


def test_schedule_steps_and_sigmas(schedule):
    assert list(schedule.timesteps) == list(range(1, 1000, 100))
    assert schedule.alphas_prev[0].item() == pytest.approx(ALPHAS_CUMPROD[0].item())  # the original's, not 1
    assert torch.equal(ddim_sigmas(schedule, 0.0), torch.zeros(10, dtype=torch.float64))
    assert (ddim_sigmas(schedule, 1.0) > 0).all()
    first = schedule.first(4)
    assert len(first) == 4 and list(first.timesteps) == [1, 101, 201, 301] and torch.equal(first.alphas, schedule.alphas[:4])


def test_ddim_without_predicted_noise_only_rescales(schedule):
    """eps = 0: every deterministic step multiplies x by sqrt(a_prev / a_t); the product telescopes."""
    x = torch.randn(2, 3, 4, 4)
    out = sample_ddim(lambda x, t: torch.zeros_like(x), x, schedule, verbose=False)
    expected = x * (schedule.alphas_prev[0] / schedule.alphas[-1]).sqrt().float()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_callback_sees_every_step_from_the_noisiest(schedule):
    seen = []
    sample_ddim(lambda x, t: 0.1 * x, torch.ones(1, 1, 2, 2), schedule, callback=seen.append, verbose=False)
    assert [s["i"] for s in seen] == list(range(10)) and [s["index"] for s in seen] == list(range(9, -1, -1))
    assert [int(s["t"][0]) for s in seen] == list(np.flip(schedule.timesteps))
    assert all(s["pred_x0"].shape == (1, 1, 2, 2) for s in seen)


def test_plms_equals_ddim_for_a_constant_noise_prediction(schedule):
    """The Adams-Bashforth weights sum to one: a constant eps makes every PLMS step a DDIM step."""
    x = torch.randn(2, 3, 4, 4)
    const = torch.full_like(x, 0.3)
    ddim = sample_ddim(lambda x, t: const, x, schedule, verbose=False)
    plms = sample_plms(lambda x, t: const, x, schedule, verbose=False)
    torch.testing.assert_close(plms, ddim, rtol=1e-5, atol=1e-5)


def test_stochastic_ddim_is_seeded_by_its_generator(schedule):
    eps = lambda x, t: 0.5 * x  # noqa: E731
    x = torch.randn(1, 1, 4, 4)
    runs = [sample_ddim(eps, x, schedule, eta=1.0, generator=torch.Generator().manual_seed(s), verbose=False) for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert not torch.equal(runs[0], sample_ddim(eps, x, schedule, eta=0.0, verbose=False))


def test_classifier_free_guidance_extrapolates_from_the_unconditional():
    def model_eps(x, t, c):
        return x * 0 + c[:, None, None, None]

    x, t = torch.zeros(2, 1, 1, 1), torch.zeros(2, dtype=torch.long)
    cond, uncond = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])
    assert cfg_eps(model_eps, cond)(x, t).flatten().tolist() == [1.0, 2.0]
    assert cfg_eps(model_eps, cond, uncond, 3.0)(x, t).flatten().tolist() == [3.0, 4.0]


class ZeroNoiseModel(torch.nn.Module):
    """The part of LatentDiffusion the sampler adapters use, predicting no noise at all."""

    def __init__(self):
        super().__init__()
        self.register_buffer("alphas_cumprod", ALPHAS_CUMPROD)
        self.register_buffer("betas", torch.zeros(1000))

    def apply_model(self, x, t, c):
        return torch.zeros_like(x)

    def eps_from_output(self, x, t, output):
        return output


def test_adapters_keep_the_original_api():
    from ldm.models.diffusion.ddim import DDIMSampler
    from ldm.models.diffusion.plms import PLMSSampler

    model = ZeroNoiseModel()
    sampler = DDIMSampler(model)
    with pytest.raises(RuntimeError, match="make_schedule"):
        sampler.p_sample_ddim(torch.zeros(1, 1, 2, 2), None, torch.zeros(1, dtype=torch.long), 0)
    steps = []
    x_T = torch.ones(1, 1, 2, 2)
    samples, inter = sampler.sample(S=10, batch_size=1, shape=(1, 2, 2), x_T=x_T, log_every_t=4, verbose=False, callback=steps.append)
    assert steps == list(range(10)) and len(inter["x_inter"]) == len(inter["pred_x0"]) == 1 + 4  # x_T, indices 9, 8, 4, 0
    torch.testing.assert_close(samples, sample_ddim(lambda x, t: torch.zeros_like(x), x_T, sampler.ddim_schedule, verbose=False))
    assert sampler.ddim_alphas_prev.dtype == np.float64 and torch.equal(sampler.ddim_sigmas, torch.zeros(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="eta must be 0"):
        PLMSSampler(model).sample(S=10, batch_size=1, shape=(1, 2, 2), eta=0.5, verbose=False)
    plms, _ = PLMSSampler(model).sample(S=10, batch_size=1, shape=(1, 2, 2), x_T=x_T, verbose=False)
    torch.testing.assert_close(plms, samples)
