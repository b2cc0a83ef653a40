"""``python -m dmd.sample``: draw samples from a model into an ADM-style ``.npz``.

Contract (other tools rely on it)::

    python -m dmd.sample num_samples=N out=FILE.npz seed=S [teacher=<preset>]
        [sampler.name=ddim|euler|heun] [sampler.steps=K] [sampler.guidance_scale=W]
        [hydra.run.dir=DIR]
    python -m dmd.sample ckpt=<train run dir | generator folder> num_samples=N out=FILE.npz

Writes ``arr_0`` (uint8 N x H x W x C images, or float32 N x 2 points for 2-D data) and
``arr_1`` (int64 labels; -1 for unconditional and text-conditioned models), plus ``FILE.png``, a
sample grid. Latent (text-to-image) samples are decoded to images first.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm.auto import tqdm

from dmd.conditioning import condition_to, select_condition
from dmd.data.fmnist import to_uint8
from dmd.generator import Generator, load_generator
from dmd.runs import require, run_dir, save_resolved_config
from dmd.sampling import SAMPLERS, nfe, sample
from dmd.streams import noise as stream_noise
from dmd.streams import stream
from dmd.teachers import Teacher
from dmd.visualize import save_sample_grid

log = logging.getLogger(__name__)


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


def write_npz(samples: torch.Tensor, labels: torch.Tensor | None, path: str | Path) -> Path:
    """ADM evaluation-suite convention: arr_0 = uint8 NHWC images (or float32 points), arr_1 = labels."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if samples.ndim == 4:
        arr0 = to_uint8(samples).permute(0, 2, 3, 1).numpy()
    else:
        arr0 = samples.float().numpy()
    n = samples.shape[0]
    arr1 = (labels if labels is not None else torch.full((n,), -1)).long().numpy()
    np.savez(path, arr_0=arr0, arr_1=arr1)
    return path


def run(cfg: DictConfig) -> Path:
    s = cfg.sampler
    require(cfg.num_samples >= 1, f"num_samples must be >= 1, got {cfg.num_samples}.")
    require(s.name in SAMPLERS, f"sampler.name={s.name!r}; choose one of {SAMPLERS}.")
    require(s.steps >= 1, f"sampler.steps must be >= 1, got {s.steps}.")
    require(s.guidance_scale >= 0, f"sampler.guidance_scale must be >= 0, got {s.guidance_scale}.")
    require(str(cfg.out).endswith(".npz"), f"out={cfg.out} must end in .npz.")
    out_dir = run_dir()
    save_resolved_config(cfg, out_dir)
    if cfg.ckpt:  # a distilled generator: its own step schedule, no sampler settings
        generator, generator_info = load_generator(cfg.ckpt)
        samples, labels = sample_generator(generator, generator_info, cfg.num_samples, cfg.seed, cfg.batch_size)
        what = f"generator {cfg.ckpt} ({generator.num_steps} step(s), NFE {generator.num_steps})"
    else:
        teacher: Teacher = instantiate(cfg.teacher)
        samples, labels = sample_teacher(teacher, cfg.num_samples, s.name, s.steps,
                                         s.guidance_scale, cfg.seed, cfg.batch_size)
        what = (f"teacher ({s.name}, {s.steps} steps, CFG {s.guidance_scale:.2f}, "
                f"NFE {nfe(s.name, s.steps, s.guidance_scale)})")
    # Latent samples decoded; text conditions are no class labels (arr_1 = -1).
    samples, labels = (generator_info if cfg.ckpt else teacher).as_images(samples, labels)
    out = Path(cfg.out)
    if not out.is_absolute():  # relative to where the user ran the command, not the run dir
        out = Path(hydra.utils.get_original_cwd()) / out
    write_npz(samples, labels, out)
    save_sample_grid(samples[: cfg.grid_size], out.with_suffix(".png"))
    log.info("Wrote %d samples of the %s to %s", cfg.num_samples, what, out)
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
