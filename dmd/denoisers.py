"""One interface for every model: an x0-predictor ``D(x_t, t, cond)``.

Every network (diffusers UNets, a small MLP, the analytic Gaussian mixture) is wrapped into a
:class:`Denoiser`, so losses, samplers and generators never care what is inside. A wrapper
only says how to call its network (:meth:`Denoiser.network_output`) and in which
parameterisation the network answers (``prediction_type``); the base class converts that
answer to x0 with the schedule, in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dmd.conditioning import map_condition
from dmd.losses import randn_like
from dmd.schedule import Schedule


class Denoiser(nn.Module):
    """x0-predictor D(x_t, t, cond) around a network with a given ``prediction_type``."""

    def __init__(self, schedule: Schedule, prediction_type: str):
        super().__init__()
        self.schedule = schedule
        self.prediction_type = prediction_type

    def network_output(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        """The raw network output (eps, v or x0, per ``prediction_type``)."""
        raise NotImplementedError

    def noise_like(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Fresh N(0, I) noise shaped like samples ``x`` (a multi-step generator's re-noising),
        drawn in the layout the model's own pipeline draws it, so equal seeds give equal samples."""
        return randn_like(x, generator)

    def forward(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        t = _as_batch_timesteps(t, x_t)
        out = self.network_output(x_t, t, cond)
        return self.schedule.to_x0(out, x_t, t, self.prediction_type)


def _as_batch_timesteps(t, x: Tensor) -> Tensor:
    t = torch.as_tensor(t, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


class DiffusersUNetDenoiser(Denoiser):
    """Wraps a diffusers ``UNet2DModel`` (class labels) or ``UNet2DConditionModel`` (text), or
    any model with their call signature (:class:`~dmd.networks.MLPNet`).

    ``cond`` is a LongTensor of class labels for ``UNet2DModel`` (the null class used for CFG
    is label ``num_classes``), or a dict of keyword arguments for ``UNet2DConditionModel``
    (``encoder_hidden_states`` and, for SDXL, ``added_cond_kwargs``).
    """

    def __init__(self, unet: nn.Module, schedule: Schedule, prediction_type: str):
        super().__init__(schedule, prediction_type)
        self.unet = unet

    def network_output(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        dtype = getattr(self.unet, "dtype", x_t.dtype)
        if dtype != x_t.dtype:  # a half-precision (frozen) network: inputs in its dtype, answer in the caller's
            cast = map_condition(lambda c: c.to(dtype) if c.is_floating_point() else c, cond)
            return self._call(x_t.to(dtype), t, cast).to(x_t.dtype)
        return self._call(x_t, t, cond)

    def _call(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        t = self.schedule.model_time(t)  # VP: the integer timestep; flow: diffusers' sigma * T
        if isinstance(cond, dict):
            return self.unet(x_t, t, **cond).sample
        return self.unet(x_t, t, class_labels=cond).sample


def MLPDenoiser(schedule: Schedule, prediction_type: str = "v_prediction", dim: int = 2,
                hidden: int = 256, depth: int = 4, time_embed_dim: int = 64,
                num_classes: int = 0) -> DiffusersUNetDenoiser:
    """A small time- (and optionally class-) conditioned :class:`~dmd.networks.MLPNet` for 2-D data."""
    from dmd.networks import MLPNet

    net = MLPNet(dim, hidden, depth, time_embed_dim, num_classes + 1 if num_classes else None)
    return DiffusersUNetDenoiser(net, schedule, prediction_type)


class GaussianMixtureDenoiser(Denoiser):
    """Exact posterior mean E[x0 | x_t] of an isotropic Gaussian mixture under any schedule
    x_t = alpha x0 + sigma eps (VP or flow matching).

    For component k (weight w_k, mean mu_k, std s_k): x_t | k ~ N(alpha mu_k, v_k I) with
    v_k = alpha^2 s_k^2 + sigma^2, and E[x0 | x_t, k] = mu_k + alpha s_k^2 / v_k (x_t - alpha mu_k).
    The answer mixes these by the posterior responsibilities p(k | x_t). It is the oracle real
    score of the 2-D experiments (Tweedie: E[x0|x_t] = (x_t + sigma^2 grad log p_t(x_t)) / alpha).
    """

    def __init__(self, schedule: Schedule, means, stds, weights=None):
        super().__init__(schedule, "sample")
        means = torch.as_tensor(means, dtype=torch.float64)
        stds = torch.as_tensor(stds, dtype=torch.float64).expand(means.shape[0])
        weights = torch.ones(means.shape[0]) if weights is None else torch.as_tensor(weights)
        weights = weights.to(torch.float64)
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("log_weights", (weights / weights.sum()).log())

    def component_log_likelihoods(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """log w_k + log N(x_t; alpha mu_k, v_k I) for every k, and v_k; shapes (B, K)."""
        a, s = self.schedule.alpha_sigma(t, x_t)  # (B, 1)
        x = x_t.to(torch.float64)
        var = a**2 * self.stds[None] ** 2 + s**2  # (B, K)
        sq = ((x[:, None, :] - a[:, :, None] * self.means[None]) ** 2).sum(-1)  # (B, K)
        d = x.shape[-1]
        log_n = -0.5 * sq / var - 0.5 * d * torch.log(2 * math.pi * var)
        return self.log_weights[None] + log_n, var

    def log_prob(self, x_t: Tensor, t: Tensor) -> Tensor:
        """log p_t(x_t) of the noised mixture."""
        t = _as_batch_timesteps(t, x_t)
        return torch.logsumexp(self.component_log_likelihoods(x_t, t)[0], dim=-1)

    def network_output(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        a, _ = self.schedule.alpha_sigma(t, x_t)
        x = x_t.to(torch.float64)
        log_joint, var = self.component_log_likelihoods(x_t, t)
        resp = torch.softmax(log_joint, dim=-1)  # p(k | x_t), (B, K)
        gain = (a * self.stds[None] ** 2 / var)[..., None]  # (B, K, 1)
        mu = self.means[None]
        x0_k = mu + gain * (x[:, None, :] - a[:, :, None] * mu)
        return (resp[..., None] * x0_k).sum(1).to(x_t.dtype)
