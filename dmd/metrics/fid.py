"""FID and KID on feature matrices: clean-fid's ``frechet_distance`` and ``kernel_distance``."""

from __future__ import annotations

import numpy as np
import torch
from cleanfid.fid import frechet_distance, kernel_distance


def _as_numpy(features) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"Need an (N >= 2, D) feature matrix, got shape {f.shape}.")
    return f


def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of an (N, D) feature matrix."""
    f = _as_numpy(features)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet(mu1, s1, mu2, s2) -> float:
    """clean-fid's Frechet distance; torchmetrics' where clean-fid breaks on a newer scipy.

    clean-fid 0.1.35 calls ``scipy.linalg.sqrtm(..., disp=False)``, an argument newer scipy
    releases removed (seen on a GPU machine); torchmetrics computes the same distance from
    eigenvalues.
    """
    try:
        return float(frechet_distance(mu1, s1, mu2, s2))
    except TypeError as err:
        if "disp" not in str(err):
            raise
        from torchmetrics.image.fid import _compute_fid

        t = [torch.from_numpy(np.asarray(v, dtype=np.float64)) for v in (mu1, s1, mu2, s2)]
        return float(_compute_fid(*t))


def fid_from_features(a, b) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets."""
    return frechet(*feature_statistics(a), *feature_statistics(b))


def kid_from_features(a, b, num_subsets: int = 100, max_subset_size: int = 1000,
                      seed: int = 0) -> float:
    """Kernel Inception Distance (polynomial-kernel MMD^2, mean over random subsets).

    clean-fid draws the subsets from numpy's global RNG: it is seeded here and restored after,
    so the value is reproducible and the caller's RNG state is untouched.
    """
    a, b = _as_numpy(a), _as_numpy(b)
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return float(kernel_distance(a, b, num_subsets=num_subsets, max_subset_size=max_subset_size))
    finally:
        np.random.set_state(state)
