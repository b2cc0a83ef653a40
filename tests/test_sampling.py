import pytest
import torch
from diffusers import DDPMScheduler

from dmd.conditioning import drop_labels, guided_x0, null_labels_like
from dmd.data import GaussianMixture
from dmd.sampling import nfe, sample
from dmd.schedule import sampling_timesteps
from dmd.teachers import gaussian_mixture_teacher


@pytest.fixture(scope="module")
def gmm_teacher():
    return gaussian_mixture_teacher(GaussianMixture.ring(), DDPMScheduler(beta_schedule="linear"))


def _mode_stats(x, means):
    d = torch.cdist(x.double(), means.double())
    nearest = d.argmin(1)
    share = torch.bincount(nearest, minlength=means.shape[0]).double() / x.shape[0]
    return share, d.min(1).values.median().item()


@pytest.mark.parametrize("name,steps", [("ddim", 100), ("heun", 25)])
def test_ode_samplers_reproduce_the_mixture(gmm_teacher, name, steps):
    mix = GaussianMixture.ring()
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
    x = sample(gmm_teacher.denoiser, noise, name=name, steps=steps)
    share, median = _mode_stats(x, mix.means)
    assert share.min() > 0.09 and share.max() < 0.16
    ref_share, ref_median = _mode_stats(mix.sample(4000, torch.Generator().manual_seed(1))[0], mix.means)
    assert median == pytest.approx(ref_median, rel=0.25)


def test_sampling_timesteps_start_at_noise_and_end_at_data(gmm_teacher):
    sched = gmm_teacher.denoiser.schedule
    for spacing in ("linspace", "karras"):
        ts = sampling_timesteps(12, sched, spacing)
        assert ts[0] == 999 and ts[-1] == 0 and all(a > b for a, b in zip(ts, ts[1:]))
    karras = sampling_timesteps(12, sched, "karras")
    assert karras[-2] < sampling_timesteps(12, sched, "linspace")[-2] / 2  # dense at low noise
    assert sampling_timesteps(4, sched, "trailing") == [999, 749, 499, 249]
    with pytest.raises(ValueError, match="spacing"):
        sampling_timesteps(4, sched, "cosine")


def test_guided_x0_is_uncond_plus_w_times_difference(tiny_unet_kwargs):
    from diffusers import UNet2DModel

    from dmd.denoisers import DiffusersUNetDenoiser

    torch.manual_seed(0)
    den = DiffusersUNetDenoiser(UNet2DModel(**tiny_unet_kwargs), gmm_schedule(), "v_prediction")
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([100, 500, 900])
    y = torch.tensor([0, 1, 0])
    null = null_labels_like(y, 2)
    c, u = den(x, t, y), den(x, t, null)
    assert torch.allclose(guided_x0(den, x, t, y, null, 1.0), c)
    assert torch.allclose(guided_x0(den, x, t, y, null, 0.0), u, atol=1e-5)
    assert torch.allclose(guided_x0(den, x, t, y, null, 3.0), u + 3.0 * (c - u), atol=1e-5)


def gmm_schedule():
    from dmd.schedule import VPSchedule

    return VPSchedule.from_diffusers(DDPMScheduler(beta_schedule="linear"))


def test_drop_labels_rate():
    y = torch.zeros(20000, dtype=torch.long)
    dropped = drop_labels(y, 10, 0.1, generator=torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0, 10}
    assert (dropped == 10).float().mean().item() == pytest.approx(0.1, abs=0.01)


def test_nfe_counts():
    assert nfe("ddim", 25, 1.0) == 25
    assert nfe("heun", 13, 1.0) == 25
    assert nfe("heun", 13, 2.0) == 50


def test_unknown_sampler_is_a_clear_error(gmm_teacher):
    with pytest.raises(ValueError, match="Unknown sampler 'dpm'"):
        sample(gmm_teacher.denoiser, torch.randn(2, 2), name="dpm")
