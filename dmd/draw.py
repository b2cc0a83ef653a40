"""Drawing samples from a teacher's ODE sampler or a distilled generator, batch by batch, on the
random stream of their purpose (:mod:`dmd.streams`). Used by the evaluation callback, the
entry points (``dmd.sample``, ``dmd.evaluate``, ``dmd.pretrain``), teacher references and DMD's
regression pairs.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from dmd.conditioning import condition_to, select_condition
from dmd.generator import Generator
from dmd.sampling import sample
from dmd.streams import noise as stream_noise
from dmd.streams import stream
from dmd.teachers import Teacher


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def draw_samples(teacher: Teacher, sample_fn, noise: torch.Tensor, labels: torch.Tensor | None = None,
                 batch_size: int = 500, device=None, desc: str = "sampling",
                 progress: bool = True):
    """Apply ``sample_fn(noise, cond, uncond)`` batch by batch; returns (samples, labels) on CPU.

    ``teacher`` says how conditions look (class-balanced labels, the null condition); noise
    is given, so the samples depend on the seed only (not on the device or the batch size).
    """
    device = device or default_device()
    num_samples = noise.shape[0]
    if labels is None:
        labels = teacher.labels(num_samples)
    out = []
    for start in tqdm(range(0, num_samples, batch_size), desc=desc, disable=not progress):
        sl = slice(start, start + batch_size)
        cond = condition_to(select_condition(labels, sl), device)
        uncond = teacher.null_condition(noise[sl].shape[0], device)
        with torch.no_grad():
            out.append(sample_fn(noise[sl].to(device), cond, uncond).cpu())
        if not torch.isfinite(out[-1]).all():  # never score or save NaN as if it were samples
            raise FloatingPointError(
                f"{desc}: samples {start}-{start + out[-1].shape[0] - 1} contain NaN/Inf; the model's "
                "weights are corrupt or diverged (or its precision overflows). Nothing was scored.")
    return torch.cat(out), labels


def sample_teacher(teacher: Teacher, num_samples: int, name: str = "ddim", steps: int = 25,
                   guidance_scale: float = 1.0, seed: int = 0, batch_size: int = 500,
                   labels: torch.Tensor | None = None, device=None, progress: bool = True,
                   spacing: str = "karras", purpose: str = "eval"):
    """Draw ``num_samples`` from the teacher's ODE sampler; returns (samples, labels) on CPU.
    The noise is the ``purpose`` stream's (:mod:`dmd.streams`) for ``seed``."""
    device = device or default_device()
    teacher.denoiser.to(device)
    noise = stream_noise(purpose, seed, num_samples, teacher.sample_shape)

    return draw_samples(teacher, teacher_sampling_fn(teacher, name, steps, guidance_scale, spacing),
                        noise, labels, batch_size, device,
                        f"{name} x{steps}", progress)


def teacher_sampling_fn(teacher: Teacher, name: str = "ddim", steps: int = 25,
                        guidance_scale: float = 1.0, spacing: str = "karras"):
    """``fn(noise, cond, uncond)`` running the teacher's ODE sampler."""

    def fn(z, cond, uncond):
        return sample(teacher.denoiser, z, cond, uncond, name, steps, guidance_scale, spacing)

    return fn


def sample_generator(generator: Generator, info: Teacher, num_samples: int, seed: int = 0,
                     batch_size: int = 500, labels: torch.Tensor | None = None, device=None,
                     progress: bool = True):
    """Draw ``num_samples`` from a distilled generator (its own 1- or multi-step schedule), on
    the evaluation stream (:mod:`dmd.streams`) of ``seed``."""
    device = device or default_device()
    generator.to(device).eval()
    noise = stream_noise("eval", seed, num_samples, info.sample_shape)
    return draw_samples(info, generator_sampling_fn(generator, seed), noise, labels, batch_size,
                        device, f"generator x{generator.num_steps}", progress)


def generator_sampling_fn(generator: Generator, seed: int = 0):
    """``fn(noise, cond, uncond)`` running the generator; the re-noising of multi-step
    generators draws from the ``eval-renoise`` stream of ``seed``, batch after batch (so,
    unlike one-step samples, multi-step samples also depend on the batch size)."""
    rng = stream("eval-renoise", seed)

    def fn(z, cond, uncond):
        return generator(z, cond, generator=rng)

    return fn
