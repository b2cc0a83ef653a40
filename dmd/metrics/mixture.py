"""Oracle metrics for 2-D mixture samples: mode coverage, sharpness, energy distance."""

from __future__ import annotations

import torch
from torch import Tensor

from dmd.streams import stream


def nearest_mode(x: Tensor, means: Tensor) -> tuple[Tensor, Tensor]:
    """Index of the nearest mixture mean for every point, and the distance to it."""
    d = torch.cdist(x.double(), means.double().to(x.device))
    dist, idx = d.min(dim=1)
    return idx, dist


def energy_distance(x: Tensor, y: Tensor) -> float:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| (V-statistic; 0 iff the distributions agree)."""
    x, y = x.double(), y.double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def mixture_report(samples: Tensor, mixture, num_energy: int = 4000, seed: int = 0) -> dict:
    """Share of samples per mode (nearest mean), median distance to the nearest mean, and
    the energy distance between ``num_energy`` samples and as many draws from the mixture."""
    samples = samples.detach().cpu().double()
    idx, dist = nearest_mode(samples, mixture.means)
    k = mixture.means.shape[0]
    shares = torch.bincount(idx, minlength=k).double() / samples.shape[0]
    ref, _ = mixture.sample(num_energy, stream("data-reference", seed))  # never the training draws
    n = min(num_energy, samples.shape[0])
    return {
        "mode_shares": [round(float(s), 4) for s in shares],
        "min_mode_share": float(shares.min()),
        "max_mode_share": float(shares.max()),
        "median_dist_to_mode": float(dist.median()),
        "energy_distance": energy_distance(samples[:n], ref.double()),
        "num_samples": samples.shape[0],
    }


class MixtureEvaluator:
    """The evaluator of 2-D mixture samples: :func:`mixture_report` against the known mixture."""

    def __init__(self, mixture, num_energy: int = 4000, teacher=None):
        self.mixture, self.num_energy, self.teacher = mixture, num_energy, teacher

    def __call__(self, samples: Tensor, labels=None, prompts=None) -> dict:
        return mixture_report(samples, self.mixture, self.num_energy)

    def prepare(self) -> None:
        pass

    def check_sample_shape(self, shape) -> None:
        if tuple(shape) != (self.mixture.means.shape[1],):
            raise ValueError(f"eval=mixture scores 2-D points, the model makes samples of shape "
                             f"{tuple(shape)}: use eval=fmnist or eval=inception for images.")

    def teacher_metrics(self, num_samples: int | None = None) -> dict:
        return {}
