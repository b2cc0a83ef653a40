"""2-D isotropic Gaussian mixtures: the toy data whose score is known in closed form."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from dmd.data.loaders import resumable_loader


class GaussianMixture:
    """Mixture of isotropic Gaussians N(mu_k, s_k^2 I) with weights w_k (normalised)."""

    def __init__(self, means, stds, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float32)
        k = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float32).expand(k).clone()
        w = torch.ones(k) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        if w.shape != (k,) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be {k} non-negative numbers with a positive sum.")
        self.weights = w / w.sum()

    @classmethod
    def ring(cls, num_modes: int = 8, radius: float = 2.0, std: float = 0.1, weights=None):
        """Modes at angles 2*pi*k/num_modes on a circle (the ``gmm8`` preset's layout)."""
        ang = torch.arange(num_modes) * 2 * math.pi / num_modes
        means = radius * torch.stack([ang.cos(), ang.sin()], dim=-1)
        return cls(means, std, weights)

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n points and the index of the component each came from."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.means.shape[1], generator=generator)
        return self.means[comp] + self.stds[comp, None] * noise, comp

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        var = self.stds.to(x) ** 2
        sq = ((x[:, None] - self.means.to(x)[None]) ** 2).sum(-1)
        log_n = -0.5 * sq / var - 0.5 * d * torch.log(2 * math.pi * var)
        return torch.logsumexp(self.weights.to(x).log() + log_n, dim=-1)


class _MixtureSamples(Dataset):
    """A fixed, seeded set of mixture draws (so an epoch is reproducible)."""

    def __init__(self, mixture: GaussianMixture, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x, self.k = mixture.sample(n, g)

    def __len__(self):
        return self.x.shape[0]

    def __getitem__(self, i):
        return self.x[i], self.k[i]


class GaussianMixtureDataModule(pl.LightningDataModule):
    """Batches of (point, component index) from a :class:`GaussianMixture`."""

    def __init__(self, mixture: GaussianMixture, num_samples: int = 100_000, batch_size: int = 512,
                 seed: int = 0):
        super().__init__()
        self.mixture, self.num_samples, self.batch_size, self.seed = mixture, num_samples, batch_size, seed
        self.train_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = _MixtureSamples(self.mixture, self.num_samples, self.seed)
            self.val_set = _MixtureSamples(self.mixture, min(10_000, self.num_samples), self.seed + 1)

    def train_dataloader(self) -> DataLoader:
        return resumable_loader(self.train_set, self.batch_size, self.seed)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)
