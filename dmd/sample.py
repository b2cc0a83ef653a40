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

from dmd.draw import sample_generator, sample_teacher
from dmd.files import atomic_path
from dmd.generator import load_generator
from dmd.rundir import claim_run_dir
from dmd.sampling import nfe
from dmd.teachers import Teacher
from dmd.validation import validate
from dmd.visualize import save_sample_grid, to_uint8

log = logging.getLogger(__name__)


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
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: savez keeps the name
        np.savez(f, arr_0=arr0, arr_1=arr1)
    return path


def run(cfg: DictConfig) -> Path:
    validate(cfg, "sample")
    with claim_run_dir(cfg, "sample"):
        return draw(cfg)


def draw(cfg: DictConfig) -> Path:
    s = cfg.sampler
    if cfg.ckpt:  # a distilled generator: its own step schedule, no sampler settings
        generator, generator_info = load_generator(cfg.ckpt, cfg.get("timesteps"))
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
