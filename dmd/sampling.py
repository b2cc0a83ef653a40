"""Teacher samplers: the probability-flow ODE solved on the teacher's discrete timesteps.

Written in coordinates where the ODE is dy/ds = (y - D(x)) / s with D the (guided) x0
prediction: for VP schedules the variance-exploding ones of Karras et al. (EDM), y = x / alpha,
s = sigma / alpha; for flow matching x itself over s = sigma (the velocity eps - x0). First order (Euler) in these coordinates *is* DDIM (eta = 0); second order is
EDM's Heun step (Algorithm 1), with a plain Euler step into s = 0. Samplers are plain
functions, as in k-diffusion.
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dmd.conditioning import guided_x0
from dmd.schedule import sampling_timesteps

SAMPLERS = ("ddim", "euler", "heun")


@torch.no_grad()
def sample_ode(
    denoiser,
    noise: Tensor,
    cond=None,
    uncond=None,
    steps: int = 25,
    guidance_scale: float = 1.0,
    order: int = 1,
    spacing: str = "karras",
    progress: bool = False,
) -> Tensor:
    """Integrate from x_{T-1} = ``noise`` to x0 over ``steps`` timesteps (see ``sampling_timesteps``).

    Returns the final x0 prediction. NFE = steps for order 1 and 2 * steps - 1 for order 2
    (times two with classifier-free guidance).
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 (Euler/DDIM) or 2 (Heun), got {order}.")
    schedule = denoiser.schedule
    ts = sampling_timesteps(steps, schedule, spacing)
    x = noise

    def x0_at(x, t):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        return guided_x0(denoiser, x, tt, cond, uncond, guidance_scale).to(torch.float64)

    def coordinates(t):  # y = x / c at ODE time s (VP: c = alpha, s = sigma / alpha; flow: 1, sigma)
        return schedule.ode_coordinates(torch.tensor([t]), noise)

    for i, t in enumerate(tqdm(ts, desc="sampling", disable=not progress, leave=False)):
        a, sv = coordinates(t)
        y = x.to(torch.float64) / a
        d = x0_at(x, t)
        if i + 1 == len(ts):
            x = d  # last step lands on s = 0, where y = D
            break
        t_next = ts[i + 1]
        a_n, sv_n = coordinates(t_next)
        slope = (y - d) / sv
        y_next = y + (sv_n - sv) * slope
        if order == 2:
            d_next = x0_at((a_n * y_next).to(x.dtype), t_next)
            slope_next = (y_next - d_next) / sv_n
            y_next = y + (sv_n - sv) * 0.5 * (slope + slope_next)
        x = (a_n * y_next).to(noise.dtype)
    return x.to(noise.dtype)


def ode_step(x: Tensor, x0: Tensor, t: Tensor, t_next: Tensor, schedule) -> Tensor:
    """One Euler (= DDIM, eta 0) step of the probability-flow ODE from timesteps ``t`` to
    ``t_next`` (per sample; ``t_next < 0`` is the data, where the step lands on ``x0``), given the
    (guided) x0 prediction at (x, t). The step of :func:`sample_ode`, for a batch whose samples
    sit at different timesteps (consistency and progressive distillation's teacher steps)."""
    a, s = schedule.ode_coordinates(t, x)
    to_data = t_next < 0
    a_n, s_n = schedule.ode_coordinates(t_next.clamp(min=0), x)
    y = x.to(a.dtype) / a
    d = x0.to(a.dtype)
    y_next = y + (s_n - s) * (y - d) / s
    x_next = torch.where(to_data.reshape(-1, *[1] * (x.ndim - 1)), d, a_n * y_next)
    return x_next.to(x.dtype)


def sample(denoiser, noise, cond=None, uncond=None, name="ddim", steps=25, guidance_scale=1.0,
           spacing="karras", progress=False):
    """Dispatch by sampler name: ``ddim`` / ``euler`` (first order) or ``heun`` (second order)."""
    if name not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}; choose one of {SAMPLERS}.")
    order = 2 if name == "heun" else 1
    return sample_ode(denoiser, noise, cond, uncond, steps, guidance_scale, order, spacing, progress)


def nfe(name: str, steps: int, guidance_scale: float) -> int:
    """Network evaluations per sample for a sampler setting (CFG doubles the batch)."""
    evals = 2 * steps - 1 if name == "heun" else steps
    return evals * (2 if guidance_scale != 1.0 else 1)
