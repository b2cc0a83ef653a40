"""DMD's losses as pure functions, in the papers' terms.

- ``denoising_loss``: the teacher's training objective and, in distillation, the fake score's
  (on detached generator samples): an MSE in the network's own parameterisation (eps, v or
  x0), so its weighting over t is the one the teacher was trained with.
- ``distribution_matching_loss``: DMD's generator loss, real score minus fake score.
- ``sid_generator_loss``: Score identity Distillation's generator loss (same two scores).
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

TIMESTEP_DISTRIBUTIONS = ("uniform", "sigma", "logit_normal")


def sample_timesteps(n: int, num_train_timesteps: int, device=None, low: float = 0.0,
                     high: float = 1.0, generator=None, distribution: str = "uniform",
                     schedule=None) -> Tensor:
    """Integer timesteps in [low * T, high * T], capped at T - 1 (DMD's DM loss: [20, 980]).

    ``distribution``: ``uniform`` in t (DMD, DMD2; on a flow table with a shift, sigma then
    follows the shifted table, as the teacher was trained), ``sigma`` (sigma uniform between
    its values at the range's ends, each draw mapped to the nearest timestep of ``schedule``)
    or ``logit_normal`` (t / T = sigmoid(N(0, 1)), truncated to the range: SD3's training density,
    Esser et al. 2024, which diffusers' SD3 training script draws over the same table).
    """
    lo = int(low * num_train_timesteps)
    hi = min(int(high * num_train_timesteps), num_train_timesteps - 1) + 1
    hi = max(hi, lo + 1)
    # Drawn on the generator's device (CPU by default) so the stream does not depend on the device.
    on = generator.device if generator is not None else device
    if distribution == "uniform":
        t = torch.randint(lo, hi, (n,), generator=generator, device=on)
    elif distribution == "logit_normal":  # truncated to the range by inverse CDF (no pile at its ends)
        edges = torch.tensor([lo, hi], dtype=torch.float64, device=on) / num_train_timesteps
        cdf = torch.special.ndtr(torch.logit(edges.clamp(1e-6, 1 - 1e-6)))
        u = cdf[0] + torch.rand(n, generator=generator, device=on, dtype=torch.float64) * (cdf[1] - cdf[0])
        s = torch.sigmoid(torch.special.ndtri(u))
        t = (s * num_train_timesteps).long().clamp(lo, hi - 1)
    elif distribution == "sigma":
        if schedule is None:
            raise ValueError("distribution='sigma' needs the schedule (its sigma table).")
        table = schedule.sigma_table().to(on)  # increasing in t for VP and flow schedules
        u = torch.rand(n, generator=generator, device=on, dtype=table.dtype)
        target = table[lo] + u * (table[hi - 1] - table[lo])
        right = torch.searchsorted(table, target).clamp(1, num_train_timesteps - 1)
        nearer_left = (target - table[right - 1]) < (table[right] - target)
        t = torch.where(nearer_left, right - 1, right).clamp(lo, hi - 1)
    else:
        raise ValueError(f"Unknown timestep distribution {distribution!r}; choose one of {TIMESTEP_DISTRIBUTIONS}.")
    return t.to(device)


def randn_like(x: Tensor, generator=None) -> Tensor:
    """Standard normal noise shaped like x, drawn from ``generator`` (on its device) if given."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device,
                       dtype=x.dtype).to(x.device)


def denoising_loss(denoiser, x0: Tensor, cond=None, t: Tensor | None = None,
                   eps: Tensor | None = None, generator=None, distribution: str = "uniform") -> Tensor:
    """Mean squared error of the network output against its target at a noised x0 (t drawn
    over the whole schedule by ``distribution``, see :func:`sample_timesteps`)."""
    schedule = denoiser.schedule
    if t is None:
        t = sample_timesteps(x0.shape[0], schedule.num_train_timesteps, x0.device, generator=generator,
                             distribution=distribution, schedule=schedule)
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


@torch.no_grad()
def _noise_draw(x: Tensor, schedule, t, eps, t_range, generator, distribution: str):
    """(t, eps) where a generator loss noises ``x``: the given ones, else drawn (t first)."""
    if t is None:
        t = sample_timesteps(x.shape[0], schedule.num_train_timesteps, x.device, *t_range,
                             generator=generator, distribution=distribution, schedule=schedule)
    if eps is None:
        eps = randn_like(x, generator)
    return t, eps


def distribution_matching_loss(x: Tensor, real_score, fake_score, cond=None, uncond=None,
                               guidance_scale: float = 1.0, t: Tensor | None = None,
                               eps: Tensor | None = None, t_range=(0.02, 0.98), generator=None,
                               distribution: str = "uniform"):
    """DMD's generator loss on generator samples ``x`` (requires grad).

    Noise x to a t in [0.02T, 0.98T] (uniform by default; see :func:`sample_timesteps`), ask the real score (the frozen teacher, with
    classifier-free guidance) and the fake score (never guided) for x0, and regress x onto
    stopgrad(x - grad): d(loss)/dx = grad / x.numel(). The loss value is only a diagnostic.
    Returns (loss, logs).
    """
    schedule = real_score.schedule
    with torch.no_grad():
        t, eps = _noise_draw(x, schedule, t, eps, t_range, generator, distribution)
        x_t = schedule.add_noise(x, eps, t)
        # x0 predictions in float64: the difference of two close predictions is the signal.
        x0_real = guided_x0(real_score, x_t, t, cond, uncond, guidance_scale).double()
        x0_fake = fake_score(x_t, t, cond).double()
        grad = dm_gradient(x.detach().double(), x0_real, x0_fake)
        target = (x.detach().double() - grad).to(x.dtype)
    loss = 0.5 * F.mse_loss(x, target)
    return loss, {"dm/grad_abs_mean": grad.abs().mean().detach(),
                  "dm/real_fake_gap": (x0_fake - x0_real).abs().mean().detach()}


def sid_generator_loss(x: Tensor, real_score, fake_score, cond=None, uncond=None,
                       guidance_scale: float = 1.0, alpha: float = 1.2, t: Tensor | None = None,
                       eps: Tensor | None = None, t_range=(0.02, 0.98), generator=None,
                       distribution: str = "uniform"):
    """Score identity Distillation's generator loss (Zhou et al., ICML 2024) on samples ``x``.

    With x_t the noised x, f_r the real score's x0 (with CFG) and f_f the fake score's, both at
    x_t: sum over dimensions of (f_r - f_f) * ((f_r - x) - alpha * (f_r - f_f)) / w, with
    w = stopgrad(mean |x - f_r|) per sample (>= 1e-5), averaged over the batch. Unlike DMD's, it
    is differentiated through x_t into both score networks too (their weights do not move: the
    real score is frozen and the fake score's gradients are cleared before its own step).
    Returns (loss, logs).
    """
    schedule = real_score.schedule
    t, eps = _noise_draw(x, schedule, t, eps, t_range, generator, distribution)
    x_t = schedule.add_noise(x, eps, t)
    f_r = guided_x0(real_score, x_t, t, cond, uncond, guidance_scale)
    f_f = fake_score(x_t, t, cond)
    dims = tuple(range(1, x.ndim))
    w = (x - f_r).detach().abs().mean(dim=dims, keepdim=True).clamp_min(1e-5)
    gap = f_r - f_f
    loss = (gap * ((f_r - x) - alpha * gap) / w).sum(dim=dims).mean()
    return loss, {"sid/real_fake_gap": gap.detach().abs().mean()}


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


CONSISTENCY_DISTANCES = ("l2", "pseudo_huber")


def consistency_loss(prediction: Tensor, target: Tensor, distance: str = "l2", huber_c: float = 1e-3) -> Tensor:
    """Consistency distillation's loss between the student's output at t_{n+k} and the target
    network's at the teacher's ODE step t_n: the mean squared error (Song et al. 2023, ``l2``) or
    LCM's elementwise pseudo-Huber sqrt(d^2 + c^2) - c (Luo et al. 2023; c = 0.001)."""
    diff = prediction.float() - target.float()
    if distance == "l2":
        return diff.square().mean()
    if distance == "pseudo_huber":
        return ((diff.square() + huber_c**2).sqrt() - huber_c).mean()
    raise ValueError(f"Unknown consistency distance {distance!r}; choose one of {CONSISTENCY_DISTANCES}.")


def truncated_snr_loss(prediction: Tensor, target: Tensor, snr: Tensor) -> Tensor:
    """Progressive distillation's loss (Salimans & Ho 2022): the squared error of the x0
    prediction weighted by max(SNR(t), 1) ("truncated SNR"), per sample; ``snr`` has one value
    per sample."""
    per_sample = (prediction.float() - target.float()).square().flatten(1).mean(dim=1)
    return (snr.float().clamp(min=1.0) * per_sample).mean()
