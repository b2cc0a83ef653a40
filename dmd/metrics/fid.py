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


def _kth_neighbour_radius(f: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Distance of every row of ``f`` to its k-th nearest other row."""
    radii = []
    for start in range(0, f.shape[0], chunk):
        d = torch.cdist(f[start: start + chunk], f)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # +1: the row itself is at distance 0
    return torch.cat(radii)


def _inside(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """For every query row: does it lie in some support row's k-NN ball?"""
    hits = []
    for start in range(0, query.shape[0], chunk):
        d = torch.cdist(query[start: start + chunk], support)
        hits.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(hits)


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019) of two feature sets.

    Each set's manifold is the union of balls around its points reaching their k-th nearest
    neighbour. Precision: the share of generated points inside the real manifold (quality);
    recall: the share of real points inside the generated manifold (diversity). Both sets should
    have the same size (the radii shrink with n).
    """
    real = torch.as_tensor(np.asarray(real, dtype=np.float64)).float()
    fake = torch.as_tensor(np.asarray(fake, dtype=np.float64)).float()
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set.")
    precision = _inside(fake, real, _kth_neighbour_radius(real, k)).float().mean().item()
    recall = _inside(real, fake, _kth_neighbour_radius(fake, k)).float().mean().item()
    return precision, recall
