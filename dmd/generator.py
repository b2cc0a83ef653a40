"""One-step and multi-step generators around a denoiser, with DMD2's backward simulation.

A generator maps pure noise z ~ N(0, I) (and a condition) to a sample. Step k evaluates the
denoiser at timestep ``timesteps[k]``: the first step on z itself (one-step SDXL in DMD2 uses
t = 399 with pure-noise input; t < T-1 keeps x0 better conditioned), every later step on its
previous x0 prediction taken to ``timesteps[k]``: by ``sampling="fresh"`` re-noising with fresh
noise (DMD2's multi-step generator, consistency models' multistep sampling), by
``sampling="ddim"`` a deterministic DDIM step that reuses the previous input's implied noise
(progressive distillation's students, which are trained to match DDIM steps).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from torch import Tensor, nn

from dmd.files import atomic_folder
from dmd.sampling import ode_step

SAMPLINGS = ("fresh", "ddim")


class Generator(nn.Module):
    def __init__(self, denoiser: nn.Module, timesteps=(999,), sampling: str = "fresh"):
        super().__init__()
        timesteps = [int(t) for t in timesteps]
        if not timesteps or any(a <= b for a, b in zip(timesteps, timesteps[1:])):
            raise ValueError(f"timesteps must be a non-empty decreasing list, got {timesteps}.")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}.")
        self.denoiser, self.timesteps, self.sampling = denoiser, timesteps, sampling

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def step(self, x_t: Tensor, k: int, cond) -> Tensor:
        """x0 prediction of step k."""
        t = torch.full((x_t.shape[0],), self.timesteps[k], device=x_t.device, dtype=torch.long)
        return self.denoiser(x_t, t, cond)

    def renoise(self, x0: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """Input of step k from the previous x0: forward-noise it to timesteps[k]."""
        eps = self.denoiser.noise_like(x0, generator)  # on the generator's device: same stream on CPU/GPU
        t = torch.full((x0.shape[0],), self.timesteps[k], device=x0.device, dtype=torch.long)
        return self.denoiser.schedule.add_noise(x0, eps, t)

    def ddim_input(self, x_prev: Tensor, x0: Tensor, k: int) -> Tensor:
        """Input of step k by DDIM (eta = 0): the teacher samplers' ODE step from step k-1's input."""
        t_prev, t = (torch.full((x0.shape[0],), self.timesteps[j], device=x0.device) for j in (k - 1, k))
        return ode_step(x_prev, x0, t_prev, t, self.denoiser.schedule)

    def next_input(self, x_prev: Tensor, x0: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """Input of step k from step k-1's input and x0 prediction (see ``sampling``)."""
        if self.sampling == "ddim":
            return self.ddim_input(x_prev, x0, k)
        return self.renoise(x0, k, generator)

    def forward(self, noise: Tensor, cond=None, num_steps: int | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        """Run the first ``num_steps`` steps (all by default) from pure noise."""
        x_t, x0 = noise, self.step(noise, 0, cond)
        for k in range(1, num_steps or self.num_steps):
            x_t = self.next_input(x_t, x0, k, generator)
            x0 = self.step(x_t, k, cond)
        return x0

    def backward_simulation(self, noise: Tensor, cond, k: int,
                            generator: torch.Generator | None = None) -> Tensor:
        """DMD2's training-time sample for step k.

        Steps 0..k-1 run without gradients from pure noise (so step k sees the inputs it will
        see at inference, not noised real images); only step k is differentiated.
        """
        if k == 0:
            return self.step(noise, 0, cond)
        if self.sampling != "fresh":
            raise ValueError("Backward simulation is DMD2's, for generators sampled by re-noising "
                             "(sampling='fresh').")
        with torch.no_grad():
            x0 = self.forward(noise, cond, num_steps=k, generator=generator)
        return self.step(self.renoise(x0, k, generator), k, cond)


def backward_simulation_step(iteration: int, num_steps: int, seed: int = 0) -> int:
    """The step index trained at ``iteration``: uniform, and a pure function of the counter
    and the seed, so every rank (and a resumed run) picks the same one without communicating."""
    return random.Random(seed * 1_000_003 + iteration).randrange(num_steps)


GENERATOR_FILE = "generator.json"


def save_generator(generator: Generator, teacher, folder: str | Path) -> Path:
    """Write a distilled generator as a diffusers folder (the network's ``unet/`` or
    ``transformer/``, ``scheduler/``; a text-to-image teacher's other pipeline parts too, so the
    folder loads as a pipeline) plus ``generator.json`` (its timesteps, what samples look like
    and, for flow-matching generators, the ``sigmas`` and ``guidance_scale`` to give the
    pipeline). A LoRA generator is saved fused, and its adapters beside it in diffusers' LoRA
    format (:mod:`dmd.t2i.lora`)."""
    from dmd.t2i.lora import fused_copy, has_lora, save_lora

    folder = Path(folder)
    with atomic_folder(folder) as tmp:  # a rerun's release never leaves old and new files mixed
        unet = generator.denoiser.unet
        if has_lora(unet):
            save_lora(unet, tmp, teacher.pipeline_class, teacher.network_subfolder)
            unet = fused_copy(unet)
        unet.save_pretrained(tmp / teacher.network_subfolder)
        released_scheduler(teacher.scheduler, generator.denoiser.schedule,
                           stochastic=generator.sampling == "fresh").save_pretrained(tmp / "scheduler")
        teacher.save_components(tmp)
        meta = {"timesteps": generator.timesteps, "sampling": generator.sampling, "num_classes": teacher.num_classes,
                "sample_shape": list(teacher.sample_shape), "text_to_image": teacher.pipeline_class is not None}
        if meta["text_to_image"]:  # the size it was trained at (Flux networks do not record one)
            meta["image_size"] = teacher.image_shape[-1]
        if getattr(generator.denoiser, "guidance", None) is not None:
            meta["guidance"] = generator.denoiser.guidance
        if is_flow_scheduler(teacher.scheduler):
            meta.update(pipeline_call(generator))
        (tmp / GENERATOR_FILE).write_text(json.dumps(meta, indent=2))
    return folder


def is_flow_scheduler(scheduler) -> bool:
    return "FlowMatch" in type(scheduler).__name__


def released_scheduler(scheduler, schedule, stochastic: bool = True):
    """The scheduler saved with a generator. A flow-matching one samples the generator as dmd
    does: ``stochastic_sampling`` (each step's x0 re-noised with fresh noise, DMD2's multi-step
    sampling; one step is the same either way), and a fixed shift (a resolution-dependent one,
    Flux's, becomes the fixed shift of ``schedule``, the table the generator was trained on), so
    that the ``sigmas`` in generator.json reach the network as the generator's timesteps. A
    generator sampled by DDIM steps (``stochastic=False``) keeps the deterministic Euler step."""
    if not is_flow_scheduler(scheduler):
        return scheduler
    config = dict(scheduler.config, stochastic_sampling=stochastic)
    if config.get("use_dynamic_shifting"):
        config.update(use_dynamic_shifting=False, shift=schedule.shift)
    return type(scheduler).from_config(config)


def pipeline_call(generator: Generator) -> dict:
    """The arguments of a stock diffusers pipeline call that samples this flow generator:
    ``sigmas`` (before the released scheduler's fixed shift: (t + 1) / T for each timestep t; the
    shifted values are the generator's), no CFG (``guidance_scale`` 1, or Flux's embedded guidance)."""
    T = generator.denoiser.schedule.num_train_timesteps
    guidance = getattr(generator.denoiser, "guidance", None)
    return {"pipeline_call": {"num_inference_steps": generator.num_steps,
                              "sigmas": [(t + 1) / T for t in generator.timesteps],
                              "guidance_scale": 1.0 if guidance is None else guidance}}


def load_generator(path: str | Path, timesteps=None):
    """Load a generator saved by :func:`save_generator` from its folder or a ``dmd.train`` run dir.

    ``timesteps`` (None: those it was trained with) samples its network at other timesteps, e.g.
    a consistency model, trained once, in 1, 2 or 4 steps. Returns (generator, info) where
    ``info`` is a :class:`~dmd.teachers.Teacher` describing the generator's network (sample
    shape, classes, null condition).
    """
    from dmd.teachers import load_teacher

    folder = Path(path)
    if (folder / "generator" / GENERATOR_FILE).is_file():
        folder = folder / "generator"
    meta_path = folder / GENERATOR_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{path} is not a distilled generator: expected {meta_path} (written at the end of "
            "`python -m dmd.train`; a run that has not finished has only checkpoints/).")
    meta = json.loads(meta_path.read_text())
    if meta.get("text_to_image"):
        from dmd.t2i.teacher import load_text_to_image_teacher

        kwargs = {k: meta[k] for k in ("guidance", "image_size") if meta.get(k) is not None}
        info = load_text_to_image_teacher(str(folder), **kwargs)  # guidance: a distilled Flux's input
    else:
        info = load_teacher(str(folder))
    T = info.denoiser.schedule.num_train_timesteps
    if timesteps is not None and not all(0 <= int(t) < T for t in timesteps):
        raise ValueError(f"timesteps={list(timesteps)}: the generator's schedule has timesteps 0..{T - 1}.")
    return Generator(info.denoiser, meta["timesteps"] if timesteps is None else timesteps,
                     meta.get("sampling", "fresh")), info
