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


def test_sid_loss_and_gradient_by_hand_with_cfg_on_the_real_score_only():
    """SiD: sum_dims (f_r - f_f) * ((f_r - x) - alpha (f_r - f_f)) / w, w = sg(mean|x - f_r|), batch mean.
    With predictions that do not depend on x_t, x's gradient is -(f_r - f_f) / (w B)."""
    from dmd.losses import sid_generator_loss

    sched = _schedule()
    real_table = torch.tensor([[0.5, 0.0], [1.0, 1.0], [0.0, 0.5]])
    fake_table = torch.tensor([[2.0, 2.0], [-1.0, 0.0], [9.0, 9.0]])
    real, fake = Const(sched, real_table), Const(sched, fake_table)
    x = torch.tensor([[1.0, 1.0], [0.0, 2.0]], requires_grad=True)
    cond, uncond, w, alpha = torch.tensor([0, 1]), torch.tensor([2, 2]), 3.0, 1.2
    loss, _ = sid_generator_loss(x, real, fake, cond, uncond, w, alpha=alpha, t=torch.tensor([500, 500]))
    loss.backward()
    f_r = real_table[uncond] + w * (real_table[cond] - real_table[uncond])  # CFG on the real score only
    f_f = fake_table[cond]
    norm = (x.detach() - f_r).abs().mean(1, keepdim=True)
    expected = ((f_r - f_f) * ((f_r - x.detach()) - alpha * (f_r - f_f)) / norm).sum(1).mean()
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(x.grad, -(f_r - f_f) / norm / 2, atol=1e-6)


def test_sid_gradient_flows_through_the_noised_input_into_the_scores():
    """Unlike DMD's, SiD's loss is differentiated through x_t: a score that depends on x_t changes x's gradient."""
    from dmd.losses import sid_generator_loss

    class Scaled(torch.nn.Module):  # x0 prediction = c * x_t
        def __init__(self, c):
            super().__init__()
            self.schedule, self.c = _schedule(), c

        def forward(self, x_t, t, cond=None):
            return self.c * x_t

    x = torch.tensor([[1.0, -2.0]], requires_grad=True)
    t, eps = torch.tensor([300]), torch.zeros(1, 2)
    loss, _ = sid_generator_loss(x, Scaled(0.9), Scaled(0.5), alpha=1.0, t=t, eps=eps)
    loss.backward()
    a, _ = _schedule().alpha_sigma(t, x)
    a = a.item()
    # alpha = 1: loss = sum (f_r - f_f) (f_f - x) / w with f_r = 0.9 a x, f_f = 0.5 a x (eps = 0)
    xd = x.detach().double()
    norm = (xd - 0.9 * a * xd).abs().mean()
    grad = (0.4 * a * (0.5 * a * xd - xd) + 0.4 * a * xd * (0.5 * a - 1)) / norm
    assert torch.allclose(x.grad.double(), grad, atol=1e-5)
