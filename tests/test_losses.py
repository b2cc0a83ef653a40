"""DMD's losses against hand computation."""

import torch

from dmd.losses import distribution_matching_loss, dm_gradient


class Const(torch.nn.Module):
    """A fake 'denoiser' that returns fixed x0 predictions (cond picks a row for CFG tests)."""

    def __init__(self, schedule, table):
        super().__init__()
        self.schedule, self.table = schedule, table

    def forward(self, x_t, t, cond=None):
        if cond is None:
            return self.table[0].expand_as(x_t)
        return self.table[cond]


def _schedule():
    from diffusers import DDPMScheduler

    from dmd.schedule import VPSchedule

    return VPSchedule.from_diffusers(DDPMScheduler())


def test_dm_gradient_by_hand():
    x = torch.tensor([[1.0, 2.0], [0.0, -1.0]], dtype=torch.float64)
    real = torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    fake = torch.tensor([[1.0, -1.0], [2.0, 1.0]], dtype=torch.float64)
    # sample 0: mean|x - real| = (1 + 2) / 2 = 1.5; sample 1: (0 + 2) / 2 = 1.
    expected = torch.tensor([[1 / 1.5, -1 / 1.5], [2.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(dm_gradient(x, real, fake), expected)
    # A zero normaliser (x == x0_real) gives 0, not inf/nan.
    assert torch.equal(dm_gradient(real, real, fake)[0], torch.zeros(2, dtype=torch.float64))


def test_dm_loss_gradient_with_cfg_on_the_real_score_only():
    sched = _schedule()
    # Rows: label 0, label 1, null label 2 (for the real score); the fake score sees only cond.
    real_table = torch.tensor([[[0.5, 0.0]], [[1.0, 1.0]], [[0.0, 0.5]]]).squeeze(1)
    fake_table = torch.tensor([[[2.0, 2.0]], [[-1.0, 0.0]], [[9.0, 9.0]]]).squeeze(1)
    real, fake = Const(sched, real_table), Const(sched, fake_table)
    x = torch.tensor([[1.0, 1.0], [0.0, 2.0]], requires_grad=True)
    cond, uncond, w = torch.tensor([0, 1]), torch.tensor([2, 2]), 3.0
    loss, _ = distribution_matching_loss(x, real, fake, cond, uncond, w, t=torch.tensor([500, 500]))
    loss.backward()
    guided = real_table[uncond] + w * (real_table[cond] - real_table[uncond])  # CFG on real only
    weight = (x.detach() - guided).abs().mean(1, keepdim=True)
    grad = (fake_table[cond] - guided) / weight
    assert torch.allclose(x.grad, grad / x.numel(), atol=1e-6)
    assert torch.allclose(loss, 0.5 * (grad**2).mean(), atol=1e-6)


def test_dm_loss_on_a_matched_fake_score_is_zero():
    """If the fake score equals the real score, the generator already matches: no gradient."""
    from dmd.data import GaussianMixture
    from dmd.denoisers import GaussianMixtureDenoiser

    mix = GaussianMixture.ring()
    den = GaussianMixtureDenoiser(_schedule(), mix.means, mix.stds)
    x = torch.randn(64, 2, requires_grad=True)
    loss, _ = distribution_matching_loss(x, den, den)
    loss.backward()
    assert loss.item() == 0 and torch.count_nonzero(x.grad) == 0
