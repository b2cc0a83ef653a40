"""Teacher noise -> image pairs for DMD's regression loss, computed once and cached.

A pair set is (noise z, label c, teacher ODE sample x = T(z, c)), z from the
``regression-pairs`` stream (never an evaluation draw). It is written as safetensors under
``<cache_dir>/pairs/`` with a JSON provenance file beside it (teacher, sampler, steps, CFG,
number of pairs, seed, stream derivation); a request with the same provenance reuses it.
``python -m dmd.pairs`` makes them ahead of a training run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file

from dmd.draw import sample_teacher
from dmd.files import save_safetensors
from dmd.streams import STREAMS_VERSION
from dmd.streams import noise as stream_noise
from dmd.teachers import Teacher, weights_digest

log = logging.getLogger(__name__)


def pair_batch(pairs: dict, n: int, generator: torch.Generator, device=None) -> tuple:
    """``n`` random pairs (indices from ``generator``): (noise, teacher samples, labels or None)."""
    idx = torch.randint(pairs["noise"].shape[0], (n,), generator=generator)
    labels = pairs["labels"][idx].to(device) if "labels" in pairs else None
    return pairs["noise"][idx].to(device), pairs["images"][idx].to(device), labels


def make_pairs(teacher: Teacher, num_pairs: int, sampler: str = "heun", steps: int = 8,
               guidance_scale: float = 1.0, seed: int = 0, batch_size: int = 500) -> dict:
    """Run the teacher's ODE sampler on the ``regression-pairs`` stream's noise for ``seed``
    (never an evaluation draw); returns {noise, labels, images}.

    ``sample_teacher`` draws its noise from the same stream, so the noise is recreated here.
    """
    images, labels = sample_teacher(teacher, num_pairs, sampler, steps, guidance_scale, seed,
                                    batch_size, purpose="regression-pairs")
    noise = stream_noise("regression-pairs", seed, num_pairs, teacher.sample_shape)
    pairs = {"noise": noise, "images": images}
    if labels is not None:
        pairs["labels"] = labels
    return pairs


def load_or_make_pairs(teacher: Teacher, provenance: dict, cache_dir: str | Path,
                       num_pairs: int, sampler: str, steps: int, guidance_scale: float,
                       seed: int = 0) -> dict:
    """Cached :func:`make_pairs`: the cache key is the provenance plus the sampler settings."""
    prov = {**provenance, "num_pairs": num_pairs, "sampler": sampler, "steps": steps,
            "guidance_scale": guidance_scale, "seed": seed, "streams": STREAMS_VERSION}
    key = hashlib.sha256(json.dumps(prov, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / "pairs" / f"{key}.safetensors"
    if path.is_file():
        try:
            pairs = load_file(path)
            if all(v.shape[0] == num_pairs for v in pairs.values()) and "images" in pairs:
                log.info("Regression pairs: reusing %s", path)
                return pairs
            log.warning("Regression pairs: %s does not hold %d pairs; recomputing it.", path, num_pairs)
        except (SafetensorError, OSError) as err:  # truncated or damaged: recomputed, not trusted
            log.warning("Regression pairs: %s is unreadable (%s); recomputing it.", path, err)
    pairs = make_pairs(teacher, num_pairs, sampler, steps, guidance_scale, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(prov, indent=2))
    save_safetensors({k: v.contiguous() for k, v in pairs.items()}, path)  # parallel jobs never read half a file
    log.info("Regression pairs: wrote %d to %s", num_pairs, path)
    return pairs


def pairs_for_config(cfg: DictConfig, teacher: Teacher) -> dict:
    """The pairs of ``cfg.algorithm.regression`` for this teacher (cached in ``paths.cache_dir``)."""
    reg = cfg.algorithm.regression
    # The weights digest identifies the teacher; its folder's location does not (the same pairs
    # serve every checkout and worktree).
    teacher_cfg = {k: v for k, v in OmegaConf.to_container(cfg.teacher, resolve=True).items() if k != "path"}
    provenance = {"teacher": teacher_cfg, "teacher_weights": weights_digest(teacher.denoiser)}
    return load_or_make_pairs(teacher, provenance, cfg.paths.cache_dir, reg.num_pairs,
                              reg.sampler, reg.steps, reg.guidance_scale, seed=reg.seed)
