"""DMD's losses as pure functions, in the papers' terms.

- ``denoising_loss``: the teacher's training objective and, in distillation, the fake score's
  (on detached generator samples): an MSE in the network's own parameterisation (eps, v or
  x0), so its weighting over t is the one the teacher was trained with.
- ``distribution_matching_loss``: DMD's generator loss, real score minus fake score.
- ``gan_generator_loss`` / ``gan_discriminator_loss``: DMD2's non-saturating GAN losses on the
  logits of a head reading the fake score's bottleneck (see :mod:`dmd.gan`).
- ``regression_loss``: DMD's loss on teacher noise -> image pairs (see :mod:`dmd.pairs`).

Every random draw takes an optional ``generator`` so that training is reproducible and a
resumed run continues the same random stream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dmd.conditioning import guided_x0


def sample_timesteps(n: int, num_train_timesteps: int, device=None, low: float = 0.0,
                     high: float = 1.0, generator=None) -> Tensor:
    """Uniform integer timesteps in [low * T, high * T], capped at T - 1 (DMD's DM loss: [20, 980])."""
    lo = int(low * num_train_timesteps)
    hi = min(int(high * num_train_timesteps), num_train_timesteps - 1) + 1
    # Drawn on the generator's device (CPU by default) so the stream does not depend on the device.
    t = torch.randint(lo, max(hi, lo + 1), (n,), generator=generator,
                      device=generator.device if generator is not None else device)
    return t.to(device)


def randn_like(x: Tensor, generator=None) -> Tensor:
    """Standard normal noise shaped like x, drawn from ``generator`` (on its device) if given."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device,
                       dtype=x.dtype).to(x.device)


def denoising_loss(denoiser, x0: Tensor, cond=None, t: Tensor | None = None,
                   eps: Tensor | None = None, generator=None) -> Tensor:
    """Mean squared error of the network output against its target at a noised x0."""
    schedule = denoiser.schedule
    if t is None:
        t = sample_timesteps(x0.shape[0], schedule.num_train_timesteps, x0.device, generator=generator)
    if eps is None:
        eps = randn_like(x0, generator)
    x_t = schedule.add_noise(x0, eps, t)
    out = denoiser.network_output(x_t, t, cond)
    target = schedule.target(x0, eps, t, denoiser.prediction_type)
    return F.mse_loss(out.float(), target.float())


def dm_gradient(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """DMD's distribution-matching gradient for the generator output ``x``.

    (x0_fake - x0_real) / mean|x - x0_real|, the normaliser taken per sample over all
    non-batch dimensions; non-finite entries (a zero normaliser) become 0.
    """
    dims = tuple(range(1, x.ndim))
    weight = (x - x0_real).abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num((x0_fake - x0_real) / weight, nan=0.0, posinf=0.0, neginf=0.0)


def distribution_matching_loss(x: Tensor, real_score, fake_score, cond=None, uncond=None,
                               guidance_scale: float = 1.0, t: Tensor | None = None,
                               eps: Tensor | None = None, t_range=(0.02, 0.98), generator=None):
    """DMD's generator loss on generator samples ``x`` (requires grad).

    Noise x to a uniform t in [0.02T, 0.98T], ask the real score (the frozen teacher, with
    classifier-free guidance) and the fake score (never guided) for x0, and regress x onto
    stopgrad(x - grad): d(loss)/dx = grad / x.numel(). The loss value is only a diagnostic.
    Returns (loss, logs).
    """
    schedule = real_score.schedule
    with torch.no_grad():
        if t is None:
            t = sample_timesteps(x.shape[0], schedule.num_train_timesteps, x.device, *t_range,
                                 generator=generator)
        if eps is None:
            eps = randn_like(x, generator)
        x_t = schedule.add_noise(x, eps, t)
        # x0 predictions in float64: the difference of two close predictions is the signal.
        x0_real = guided_x0(real_score, x_t, t, cond, uncond, guidance_scale).double()
        x0_fake = fake_score(x_t, t, cond).double()
        grad = dm_gradient(x.detach().double(), x0_real, x0_fake)
        target = (x.detach().double() - grad).to(x.dtype)
    loss = 0.5 * F.mse_loss(x, target)
    return loss, {"dm/grad_abs_mean": grad.abs().mean().detach(),
                  "dm/real_fake_gap": (x0_fake - x0_real).abs().mean().detach()}


def gan_generator_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss: softplus(-D(G(z))) = -log sigmoid(D(G(z)))."""
    return F.softplus(-logits_fake.float()).mean()


def gan_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """softplus(-D(x_real)) + softplus(D(G(z))): real images labelled 1, generated 0."""
    return F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean()


def regression_loss(x: Tensor, x_teacher: Tensor, distance) -> Tensor:
    """DMD's regression loss: mean distance between the generator's and the teacher's
    outputs for the same noise (and condition). ``distance`` maps two batches to per-sample
    distances (L2, LPIPS or a feature distance; see :mod:`dmd.distances`)."""
    return distance(x, x_teacher).mean()
