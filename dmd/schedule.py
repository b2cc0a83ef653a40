"""Variance-preserving (VP) noise schedule on discrete timesteps.

x_t = alpha_t * x0 + sigma_t * eps,   alpha_t = sqrt(alphas_cumprod[t]),  sigma_t = sqrt(1 - alphas_cumprod[t]).

The schedule is built from a diffusers scheduler (its ``alphas_cumprod``), so a teacher loaded
from a hub folder brings its own schedule. All conversions between the network
parameterisations (eps, v, x0) run in float64 by default: at t near T the factor 1/alpha_t is
large (157x for DDPM's linear schedule at t=999) and fp16/bf16 round-off would be amplified.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"Unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES} "
            "(diffusers names: 'epsilon', 'v_prediction', 'sample' = x0)."
        )


class VPSchedule(nn.Module):
    """alpha_t / sigma_t lookup tables plus add_noise and eps <-> v <-> x0 conversions."""

    def __init__(self, alphas_cumprod: Tensor, compute_dtype: torch.dtype = torch.float64):
        super().__init__()
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if alphas_cumprod.ndim != 1 or not ((alphas_cumprod > 0) & (alphas_cumprod <= 1)).all():
            raise ValueError("alphas_cumprod must be a 1-D tensor with values in (0, 1].")
        self.compute_dtype = compute_dtype
        # Buffers (not parameters): they follow .to(device) but are never trained.
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)

    @classmethod
    def from_diffusers(cls, scheduler, **kwargs) -> VPSchedule:
        """Build from any diffusers scheduler exposing ``alphas_cumprod`` (DDPM, DDIM, Euler...)."""
        if not hasattr(scheduler, "alphas_cumprod"):
            raise TypeError(f"{type(scheduler).__name__} has no alphas_cumprod; use a VP scheduler.")
        return cls(scheduler.alphas_cumprod, **kwargs)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """alpha_t, sigma_t in the compute dtype, shaped to broadcast against ``like`` (B, ...)."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).long()
        if t.ndim == 0:
            t = t.expand(like.shape[0])
        abar = self.alphas_cumprod[t].to(device=like.device, dtype=self.compute_dtype)
        abar = abar.reshape(-1, *([1] * (like.ndim - 1)))
        return abar.sqrt(), (1.0 - abar).sqrt()

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Forward process q(x_t | x0): alpha_t * x0 + sigma_t * eps (returned in x0's dtype)."""
        a, s = self.alpha_sigma(t, x0)
        return (a * x0.to(a.dtype) + s * eps.to(a.dtype)).to(x0.dtype)

    def to_x0(self, output: Tensor, x_t: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        """Convert a network output of the given parameterisation into an x0 prediction."""
        _check_prediction_type(prediction_type)
        a, s = self.alpha_sigma(t, x_t)
        out, xt = output.to(a.dtype), x_t.to(a.dtype)
        if prediction_type == "epsilon":
            x0 = (xt - s * out) / a
        elif prediction_type == "v_prediction":
            x0 = a * xt - s * out
        else:
            x0 = out
        return x0.to(torch.promote_types(output.dtype, torch.float32))

    def from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        """Inverse of :meth:`to_x0`: the network output that would have produced ``x0``."""
        _check_prediction_type(prediction_type)
        a, s = self.alpha_sigma(t, x_t)
        x0d, xt = x0.to(a.dtype), x_t.to(a.dtype)
        if prediction_type == "epsilon":
            out = (xt - a * x0d) / s
        elif prediction_type == "v_prediction":
            # v = alpha * eps - sigma * x0 with eps = (x_t - alpha * x0) / sigma.
            out = (a * xt - x0d) / s
        else:
            out = x0d
        return out.to(torch.promote_types(x0.dtype, torch.float32))

    def target(self, x0: Tensor, eps: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        """Regression target of a denoising loss in the network's own parameterisation."""
        _check_prediction_type(prediction_type)
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "sample":
            return x0
        a, s = self.alpha_sigma(t, x0)
        return (a * eps.to(a.dtype) - s * x0.to(a.dtype)).to(x0.dtype)

    def snr(self, t: Tensor) -> Tensor:
        abar = self.alphas_cumprod[torch.as_tensor(t, device=self.alphas_cumprod.device).long()]
        return abar / (1.0 - abar)


def trailing_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Evenly spaced timesteps that start at T-1 ("trailing" spacing in diffusers).

    Starting at T-1 matters: the sampler's (and the generator's) N(0, I) input is only
    what the network saw in training at the very end of the schedule. 4 steps over T=1000
    gives DMD2's 999/749/499/249.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}.")
    step = num_train_timesteps / num_steps
    return [round(num_train_timesteps - i * step) - 1 for i in range(num_steps)]


SPACINGS = ("trailing", "linspace", "karras")


def sampling_timesteps(num_steps: int, schedule: VPSchedule, spacing: str = "karras",
                       rho: float = 7.0) -> list[int]:
    """Decreasing integer timesteps for an ODE sampler that ends near the data.

    ``trailing`` (starts at T-1, ends at T/K - 1: the generator's grid), ``linspace`` (T-1 .. 0)
    or ``karras`` (EDM's sigma^(1/rho) spacing between sigma(T-1) and sigma(0), each level
    mapped to the nearest integer timestep; dense at low noise where few-step samplers err).
    """
    T = schedule.num_train_timesteps
    if spacing == "trailing":
        return trailing_timesteps(num_steps, T)
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be in [1, {T}], got {num_steps}.")
    if num_steps == 1:
        return [T - 1]
    if spacing == "linspace":
        ts = torch.linspace(T - 1, 0, num_steps).round().long()
    elif spacing == "karras":
        abar = schedule.alphas_cumprod.detach().cpu().double()  # the grid is host-side, whatever the device
        log_sigmas = (((1 - abar) / abar).sqrt()).log()  # VE sigma of every integer timestep
        s_max, s_min = log_sigmas[-1].exp() ** (1 / rho), log_sigmas[0].exp() ** (1 / rho)
        ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
        targets = ((s_max + ramp * (s_min - s_max)) ** rho).log()
        ts = (log_sigmas[None, :] - targets[:, None]).abs().argmin(dim=1)
    else:
        raise ValueError(f"Unknown timestep spacing {spacing!r}; choose one of {SPACINGS}.")
    return list(dict.fromkeys(ts.tolist()))  # strictly decreasing, duplicates dropped
