"""ldm/lr_scheduler.py: the learning-rate multipliers upstream configs name, at the points that define them."""
import pytest
import torch
from omegaconf import OmegaConf

from ldm.lr_scheduler import LambdaLinearScheduler, LambdaWarmUpCosineScheduler, LambdaWarmUpCosineScheduler2
from ldm.util import instantiate_from_config
from paths import REPO


def test_warm_up_then_cosine_down_to_the_floor():
    s = LambdaWarmUpCosineScheduler(warm_up_steps=10, lr_min=0.1, lr_max=1.0, lr_start=0.0, max_decay_steps=110)
    assert s(0) == 0.0 and s(5) == pytest.approx(0.5) and s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.55)  # half-way down the cosine: the mean of max and min
    assert s(110) == pytest.approx(0.1) and s(10_000) == pytest.approx(0.1)


def test_cycles_restart_their_warm_up():
    s = LambdaWarmUpCosineScheduler2(warm_up_steps=[2, 4], f_min=[0.0, 0.5], f_max=[1.0, 2.0], f_start=[0.0, 0.0], cycle_lengths=[10, 20])
    assert s(1) == pytest.approx(0.5) and s(2) == pytest.approx(1.0) and s(10) == pytest.approx(0.0)
    assert s(12) == pytest.approx(1.0)  # second cycle, 2 of its 4 warm-up steps
    assert s(30) == pytest.approx(0.5) and s(100) == pytest.approx(0.5)  # past the last cycle: its floor
    with pytest.raises(ValueError, match="one entry per cycle"):
        LambdaWarmUpCosineScheduler2([1], [0.0, 0.0], [1.0], [0.0], [10])


def test_linear_schedule_of_the_shapes_training_config():
    params = OmegaConf.load(REPO / "configs" / "shapes" / "shapes-ldm-train.yaml").model.params.scheduler_config
    s = instantiate_from_config(params)
    assert isinstance(s, LambdaLinearScheduler)
    assert s(0) == pytest.approx(1e-6) and s(100) == pytest.approx(0.5, rel=1e-5) and s(200) == pytest.approx(0.1 + 0.9 * 5800 / 6000)
    assert s(6000) == pytest.approx(0.1)


def test_drives_torch_lambda_lr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    lr = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=LambdaLinearScheduler([2], [0.0], [1.0], [0.0], [4]).schedule)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        lr.step()
    assert seen == pytest.approx([0.0, 1.0, 2.0 * 2 / 4, 2.0 * 1 / 4])


def test_scheduler_state_saves_and_loads_with_weights_only(tmp_path):
    """Python floats everywhere: numpy ones in the optimizer and LambdaLR state once kept ``main.py -r`` from reading
    a training run's checkpoints with ``weights_only=True``."""
    schedulers = [LambdaLinearScheduler([2], [0.1], [1.0], [0.0], [6]), LambdaWarmUpCosineScheduler2([2], [0.1], [1.0], [0.0], [6]),
                  LambdaWarmUpCosineScheduler(2, 0.1, 1.0, 0.0, 6)]
    for schedule in schedulers:
        assert all(type(schedule.schedule(n)) is float for n in range(8))
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        lr = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=schedule.schedule)
        for _ in range(3):
            opt.step()
            lr.step()
        torch.save({"optimizer": opt.state_dict(), "scheduler": lr.state_dict()}, tmp_path / "state.pt")
        assert torch.load(tmp_path / "state.pt", weights_only=True)["scheduler"]["_last_lr"][0] == opt.param_groups[0]["lr"]
