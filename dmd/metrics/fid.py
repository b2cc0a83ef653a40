"""Frechet distance between feature sets (the math is clean-fid's ``frechet_distance``)."""

from __future__ import annotations

import numpy as np
import torch
from cleanfid.fid import frechet_distance


def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of an (N, D) feature matrix."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"Need an (N >= 2, D) feature matrix, got shape {f.shape}.")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def fid_from_features(a, b) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets."""
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    return float(frechet_distance(mu1, s1, mu2, s2))
