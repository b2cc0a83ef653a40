"""Losses as pure functions.

``denoising_loss`` is the teacher's training objective (and, in distillation, the fake-score
objective): an MSE in the network's own parameterisation (eps, v or x0), so its weighting over
t is the one the teacher was trained with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sample_timesteps(n: int, num_train_timesteps: int, device=None, low: float = 0.0,
                     high: float = 1.0, generator=None) -> Tensor:
    """Uniform integer timesteps in [low * T, high * T) (DMD's DM loss uses [0.02T, 0.98T])."""
    lo, hi = int(low * num_train_timesteps), int(high * num_train_timesteps)
    return torch.randint(lo, max(hi, lo + 1), (n,), device=device, generator=generator)


def denoising_loss(denoiser, x0: Tensor, cond=None, t: Tensor | None = None,
                   eps: Tensor | None = None) -> Tensor:
    """Mean squared error of the network output against its target at a noised x0."""
    schedule = denoiser.schedule
    if t is None:
        t = sample_timesteps(x0.shape[0], schedule.num_train_timesteps, x0.device)
    if eps is None:
        eps = torch.randn_like(x0)
    x_t = schedule.add_noise(x0, eps, t)
    out = denoiser.network_output(x_t, t, cond)
    target = schedule.target(x0, eps, t, denoiser.prediction_type)
    return F.mse_loss(out.float(), target.float())
