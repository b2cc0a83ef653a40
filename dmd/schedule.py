"""Noise schedules on discrete timesteps t = 0 .. T-1: x_t = alpha_t * x0 + sigma_t * eps.

* :class:`VPSchedule` (variance preserving, DDPM family): alpha_t = sqrt(alphas_cumprod[t]),
  sigma_t = sqrt(1 - alphas_cumprod[t]); parameterisations eps, v (alpha eps - sigma x0), x0.
* :class:`FlowSchedule` (rectified flow / flow matching, SD3 and Flux): alpha_t = 1 - sigma_t,
  sigma_t from diffusers' ``FlowMatchEulerDiscreteScheduler`` (with its ``shift``); the network
  predicts the velocity v = eps - x0 (``flow_prediction``), so x0 = x_t - sigma_t v; it is
  called with diffusers' timestep sigma_t * T.

Both are built from a diffusers scheduler (:func:`schedule_from_diffusers`), so a teacher loaded
from a hub folder brings its own schedule. Losses, samplers and generators only use the shared
interface (``alpha_sigma``, ``add_noise``, ``to_x0``/``from_x0``/``target``, ``ode_coordinates``).
All conversions run in float64 by default: at t near T the factor 1/alpha_t is large (157x
for DDPM's linear schedule at t=999) and fp16/bf16 round-off would be amplified.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import Tensor, nn

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
FLOW_PREDICTION_TYPES = ("flow_prediction", "epsilon", "sample")


def _check_prediction_type(prediction_type: str, allowed=PREDICTION_TYPES) -> None:
    if prediction_type not in allowed:
        raise ValueError(
            f"Unknown prediction_type {prediction_type!r} for this schedule; expected one of {allowed} "
            "(diffusers names: 'epsilon', 'v_prediction', 'sample' = x0, 'flow_prediction' = "
            "eps - x0 for flow-matching schedules)."
        )


def _at(table: Tensor, t, like: Tensor, dtype: torch.dtype) -> Tensor:
    """``table[t]`` (t a batch of integer timesteps, or one for the whole batch) in ``dtype``,
    shaped to broadcast against ``like`` (B, ...)."""
    t = torch.as_tensor(t, device=table.device).long()
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    return table[t].to(device=like.device, dtype=dtype).reshape(-1, *([1] * (like.ndim - 1)))


class Schedule(nn.Module):
    """What every schedule shares: x_t = alpha_t x0 + sigma_t eps over ``alpha_sigma``."""

    compute_dtype: torch.dtype

    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def sigma_table(self) -> Tensor:
        """sigma_t at every integer timestep (host, compute dtype), computed once."""
        if getattr(self, "_sigma_table", None) is None:
            T = self.num_train_timesteps
            self._sigma_table = self.alpha_sigma(torch.arange(T), torch.zeros(T, 1))[1].flatten().cpu()
        return self._sigma_table

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Forward process q(x_t | x0): alpha_t * x0 + sigma_t * eps (returned in x0's dtype)."""
        a, s = self.alpha_sigma(t, x0)
        return (a * x0.to(a.dtype) + s * eps.to(a.dtype)).to(x0.dtype)


class VPSchedule(Schedule):
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
        abar = _at(self.alphas_cumprod, t, like, self.compute_dtype)
        return abar.sqrt(), (1.0 - abar).sqrt()

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

    def model_time(self, t: Tensor) -> Tensor:
        """What the network is called with at timestep ``t``: the integer timestep itself."""
        return t

    def ode_times(self) -> Tensor:
        """The probability-flow ODE's time at every integer timestep (host, float64): EDM's
        variance-exploding sigma / alpha, in which dy/ds = (y - D) / s with y = x / alpha."""
        abar = self.alphas_cumprod.detach().cpu().double()
        return ((1 - abar) / abar).sqrt()

    def ode_coordinates(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(c_t, s_t): the ODE state is y = x / c_t at time s_t (see :meth:`ode_times`)."""
        a, s = self.alpha_sigma(t, like)
        return a, s / a

    def digest(self) -> str:
        """sha256 of the schedule's table (provenance of caches made with it)."""
        return hashlib.sha256(self.alphas_cumprod.detach().cpu().double().numpy().tobytes()).hexdigest()

    def same_as(self, other) -> bool:
        return (isinstance(other, VPSchedule) and other.alphas_cumprod.shape == self.alphas_cumprod.shape
                and torch.allclose(other.alphas_cumprod.cpu(), self.alphas_cumprod.cpu()))


class FlowSchedule(Schedule):
    """Rectified-flow schedule: x_t = (1 - sigma_t) x0 + sigma_t eps on T discrete timesteps,
    sigma_t = shift(s) = shift * s / (1 + (shift - 1) * s) with s = (t + 1) / T, exactly the
    table of diffusers' ``FlowMatchEulerDiscreteScheduler`` (its index T-1-t; t = T-1 is pure
    noise). The network is called with diffusers' timestep sigma_t * T."""

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0,
                 compute_dtype: torch.dtype = torch.float64):
        super().__init__()
        if num_train_timesteps < 1 or not shift > 0:
            raise ValueError(f"num_train_timesteps must be >= 1 and shift > 0, got {num_train_timesteps}, {shift}.")
        # float32 first, as diffusers computes it: the same sigmas bit for bit.
        s = torch.from_numpy(np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)) / num_train_timesteps
        sigmas = shift * s / (1 + (shift - 1) * s)
        self.shift, self.compute_dtype = float(shift), compute_dtype
        self.register_buffer("sigmas", sigmas.double(), persistent=False)

    @classmethod
    def from_diffusers(cls, scheduler, image_seq_len: int | None = None, **kwargs) -> FlowSchedule:
        """From a ``FlowMatchEulerDiscreteScheduler``. Resolution-dependent (dynamic) shifting,
        Flux's: the shift its pipelines use for ``image_seq_len`` latent tokens (mu linear in the
        token count between base and max; an exponential time shift by mu is the fixed shift
        exp(mu), a linear one the shift mu), so that timesteps uniform in t follow the teacher's
        training at that resolution; without a token count, the unshifted table."""
        c = scheduler.config
        shift = c.get("shift", 1.0)
        if c.get("use_dynamic_shifting"):
            shift = 1.0 if image_seq_len is None else dynamic_shift(c, image_seq_len)
        return cls(c.num_train_timesteps, shift, **kwargs)

    @property
    def num_train_timesteps(self) -> int:
        return self.sigmas.shape[0]

    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        s = _at(self.sigmas, t, like, self.compute_dtype)
        return 1.0 - s, s

    def to_x0(self, output: Tensor, x_t: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        _check_prediction_type(prediction_type, FLOW_PREDICTION_TYPES)
        a, s = self.alpha_sigma(t, x_t)
        out, xt = output.to(a.dtype), x_t.to(a.dtype)
        if prediction_type == "flow_prediction":
            x0 = xt - s * out
        elif prediction_type == "epsilon":
            x0 = (xt - s * out) / a
        else:
            x0 = out
        return x0.to(torch.promote_types(output.dtype, torch.float32))

    def from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        _check_prediction_type(prediction_type, FLOW_PREDICTION_TYPES)
        a, s = self.alpha_sigma(t, x_t)
        x0d, xt = x0.to(a.dtype), x_t.to(a.dtype)
        if prediction_type == "flow_prediction":
            out = (xt - x0d) / s
        elif prediction_type == "epsilon":
            out = (xt - a * x0d) / s
        else:
            out = x0d
        return out.to(torch.promote_types(x0.dtype, torch.float32))

    def target(self, x0: Tensor, eps: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        _check_prediction_type(prediction_type, FLOW_PREDICTION_TYPES)
        if prediction_type == "flow_prediction":
            return eps - x0
        return eps if prediction_type == "epsilon" else x0

    def snr(self, t: Tensor) -> Tensor:
        s = self.sigmas[torch.as_tensor(t, device=self.sigmas.device).long()]
        return (1 - s) ** 2 / s**2

    def model_time(self, t: Tensor) -> Tensor:
        """diffusers' flow timestep: sigma_t * T (a float)."""
        t = torch.as_tensor(t, device=self.sigmas.device).long()
        return (self.sigmas[t] * self.num_train_timesteps).float()

    def ode_times(self) -> Tensor:
        """The flow ODE's time is sigma itself: dx/dsigma = (x - D) / sigma (= eps - x0)."""
        return self.sigmas.detach().cpu().double()

    def ode_coordinates(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        _, s = self.alpha_sigma(t, like)
        return torch.ones_like(s), s

    def digest(self) -> str:
        return hashlib.sha256(b"flow" + self.sigmas.detach().cpu().numpy().tobytes()).hexdigest()

    def same_as(self, other) -> bool:
        return (isinstance(other, FlowSchedule) and other.sigmas.shape == self.sigmas.shape
                and torch.allclose(other.sigmas.cpu(), self.sigmas.cpu()))


def dynamic_shift(config, image_seq_len: int) -> float:
    """The fixed shift equal to a flow scheduler's dynamic shift at ``image_seq_len`` tokens
    (diffusers' ``calculate_shift`` for mu, then its time shift with sigma = 1)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    mu = base + (top - base) / (max_len - base_len) * (image_seq_len - base_len)
    return float(np.exp(mu)) if config.get("time_shift_type", "exponential") == "exponential" else float(mu)


def schedule_from_diffusers(scheduler, **kwargs):
    """The schedule of a diffusers scheduler: flow matching (``FlowMatch*``) or VP (any with
    ``alphas_cumprod``)."""
    if "FlowMatch" in type(scheduler).__name__:
        return FlowSchedule.from_diffusers(scheduler, **kwargs)
    return VPSchedule.from_diffusers(scheduler, **kwargs)


def load_scheduler(path: str, subfolder: str = "scheduler"):
    """The training scheduler of a diffusers folder: its own class for flow matching, else
    ``DDPMScheduler`` (any VP scheduler's config, e.g. PNDM or DDIM, gives the same betas)."""
    import diffusers

    config = diffusers.DDPMScheduler.load_config(path, subfolder=subfolder)  # any ConfigMixin reads it
    name = config.get("_class_name", "")
    cls = getattr(diffusers, name) if "FlowMatch" in name else diffusers.DDPMScheduler
    return cls.from_config(config)


def prediction_type_of(scheduler) -> str:
    """What the scheduler's network predicts (flow-matching schedulers: the velocity)."""
    if "FlowMatch" in type(scheduler).__name__:
        return "flow_prediction"
    return scheduler.config.prediction_type


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
    or ``karras`` (EDM's sigma^(1/rho) spacing of the ODE time between its values at T-1 and 0
    (VP: sigma / alpha; flow: sigma), each level
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
        log_sigmas = schedule.ode_times().log()  # the ODE time of every integer timestep (host-side)
        s_max, s_min = log_sigmas[-1].exp() ** (1 / rho), log_sigmas[0].exp() ** (1 / rho)
        ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
        targets = ((s_max + ramp * (s_min - s_max)) ** rho).log()
        ts = (log_sigmas[None, :] - targets[:, None]).abs().argmin(dim=1)
    else:
        raise ValueError(f"Unknown timestep spacing {spacing!r}; choose one of {SPACINGS}.")
    return list(dict.fromkeys(ts.tolist()))  # strictly decreasing, duplicates dropped
