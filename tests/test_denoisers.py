import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

from dmd.data import GaussianMixture
from dmd.denoisers import DiffusersUNetDenoiser, GaussianMixtureDenoiser, MLPDenoiser
from dmd.schedule import VPSchedule


def _schedule():
    return VPSchedule.from_diffusers(DDPMScheduler(beta_schedule="linear"))


def test_gaussian_mixture_denoiser_is_tweedie_of_autograd_score():
    """E[x0 | x_t] = (x_t + sigma_t^2 grad log p_t(x_t)) / alpha_t, score from autograd."""
    mix = GaussianMixture.ring(8, 2.0, 0.1, weights=[8, 1, 4, 1, 2, 1, 4, 1])
    den = GaussianMixtureDenoiser(_schedule(), mix.means, mix.stds, mix.weights)
    g = torch.Generator().manual_seed(0)
    for t_val in (5, 100, 400, 800, 990):
        x = (2.5 * torch.randn(256, 2, generator=g)).double().requires_grad_(True)
        t = torch.full((256,), t_val)
        (score,) = torch.autograd.grad(den.log_prob(x, t).sum(), x)
        a, s = den.schedule.alpha_sigma(t, x)
        tweedie = (x + s**2 * score) / a
        assert torch.allclose(den(x.detach(), t), tweedie, atol=1e-8), t_val


def test_gaussian_mixture_denoiser_limits():
    mix = GaussianMixture.ring()
    den = GaussianMixtureDenoiser(_schedule(), mix.means, mix.stds)
    x = mix.means + 0.01
    # Almost no noise: D(x) ~ x.  Pure noise: D(x) ~ the mixture mean (0 for the ring).
    assert torch.allclose(den(x.double(), torch.zeros(8, dtype=torch.long)), x.double(), atol=0.02)
    assert den(torch.randn(16, 2).double(), torch.full((16,), 999)).abs().max() < 0.05


def test_mlp_denoiser_prediction_types():
    for ptype in ("epsilon", "v_prediction", "sample"):
        den = MLPDenoiser(_schedule(), ptype, hidden=32, depth=2, num_classes=3)
        x, t, y = torch.randn(5, 2), torch.randint(0, 1000, (5,)), torch.randint(0, 4, (5,))
        raw = den.network_output(x, t, y)
        assert torch.allclose(den(x, t, y), den.schedule.to_x0(raw, x, t, ptype).float(), atol=1e-6)


def test_unet2d_wrapper_from_config(tmp_path, tiny_unet_kwargs):
    unet = UNet2DModel(**tiny_unet_kwargs)
    unet.save_pretrained(tmp_path / "unet")
    unet = UNet2DModel.from_pretrained(tmp_path / "unet")
    den = DiffusersUNetDenoiser(unet, _schedule(), "v_prediction")
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 300, 600, 999]), torch.tensor([0, 1, 2, 2])
    x0 = den(x, t, y)
    assert x0.shape == x.shape and x0.dtype == torch.float32
    v = unet(x, t, class_labels=y).sample
    assert torch.allclose(x0, den.schedule.to_x0(v, x, t, "v_prediction").float(), atol=1e-6)
    # The class label matters (the null class 2 gives a different answer).
    assert not torch.allclose(den(x, t, torch.zeros(4, dtype=torch.long)), den(x, t, torch.full((4,), 2)))


def test_unet2d_condition_wrapper_from_config():
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=12,
                                attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    den = DiffusersUNetDenoiser(unet, _schedule(), "epsilon")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    cond = {"encoder_hidden_states": torch.randn(2, 5, 12)}
    x0 = den(x, t, cond)
    eps = unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
    assert torch.allclose(x0, den.schedule.to_x0(eps, x, t, "epsilon").float(), atol=1e-5)
