import pytest
import torch
from diffusers import DDPMScheduler

from dmd.schedule import PREDICTION_TYPES, VPSchedule, trailing_timesteps


@pytest.fixture
def schedule():
    return VPSchedule.from_diffusers(DDPMScheduler(beta_schedule="linear"))


def test_alphas_match_diffusers(schedule):
    sched = DDPMScheduler(beta_schedule="linear")
    x0, eps = torch.randn(5, 3), torch.randn(5, 3)
    t = torch.tensor([0, 10, 500, 900, 999])
    assert torch.allclose(schedule.add_noise(x0, eps, t), sched.add_noise(x0, eps, t), atol=1e-5)
    # alpha^2 + sigma^2 = 1 (variance preserving); the end of the schedule is near pure noise.
    a, s = schedule.alpha_sigma(t, x0)
    assert torch.allclose(a**2 + s**2, torch.ones_like(a))
    assert schedule.alphas_cumprod[999] == pytest.approx(4.04e-5, rel=0.02)


@pytest.mark.parametrize("ptype", PREDICTION_TYPES)
def test_conversions_invert(schedule, ptype):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
    t = torch.randint(0, 1000, (64,), generator=g)
    x_t = schedule.add_noise(x0.double(), eps.double(), t)
    target = schedule.target(x0.double(), eps.double(), t, ptype)
    # The training target converts back to the clean x0 ...
    assert torch.allclose(schedule.to_x0(target, x_t, t, ptype), x0.double(), atol=1e-8)
    # ... and from_x0 is the inverse of to_x0 for an arbitrary prediction.
    pred = torch.randn(64, 2, dtype=torch.float64, generator=g)
    back = schedule.from_x0(schedule.to_x0(pred, x_t, t, ptype), x_t, t, ptype)
    assert torch.allclose(back, pred, atol=1e-6)


def test_eps_v_x0_agree_with_each_other(schedule):
    x0, eps = torch.randn(8, 4).double(), torch.randn(8, 4).double()
    t = torch.full((8,), 700)
    x_t = schedule.add_noise(x0, eps, t)
    v = schedule.target(x0, eps, t, "v_prediction")
    assert torch.allclose(schedule.from_x0(x0, x_t, t, "epsilon"), eps, atol=1e-8)
    assert torch.allclose(schedule.from_x0(x0, x_t, t, "v_prediction"), v, atol=1e-8)


def test_unknown_prediction_type_is_a_clear_error(schedule):
    with pytest.raises(ValueError, match="prediction_type"):
        schedule.to_x0(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), "velocity")


def test_trailing_timesteps():
    assert trailing_timesteps(4) == [999, 749, 499, 249]
    assert trailing_timesteps(1) == [999]
    assert trailing_timesteps(1000) == list(range(999, -1, -1))
    with pytest.raises(ValueError):
        trailing_timesteps(0)
