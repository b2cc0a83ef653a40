"""Per-sample distances for DMD's regression loss.

DMD uses LPIPS between the generator's and the teacher's image for the same noise. LPIPS
weights are downloaded by torchmetrics on first use; offline, ``perceptual`` is the same kind of
distance (unit-normalised activations of several layers, compared per position) on a network
the project trained for it alone (``experiments/checkpoints/fmnist_perceptual``: its own
architecture and training run, used by no evaluator). A training signal must never be an
evaluator's network: ``dmd.train`` refuses a distance whose weights an evaluator uses
(:func:`dmd.metrics.evaluator.check_independent`).
"""

from __future__ import annotations

from torch import Tensor, nn


class L2Distance(nn.Module):
    """Mean squared difference per sample."""

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return (x.float() - y.float()).pow(2).flatten(1).mean(1)


class _NetworkDistance(nn.Module):
    """A distance computed by a frozen Fashion-MNIST network of the project (a classifier folder)."""

    def __init__(self, path: str):
        super().__init__()
        from dmd.metrics.features import FashionMNISTClassifier

        self.net = FashionMNISTClassifier.load(path).requires_grad_(False).eval()
        self.path = str(path)
        self.weights_sha256 = self.net.weights_sha256


class FeatureDistance(_NetworkDistance):
    """Squared L2 distance between the penultimate features of a frozen network."""

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return (self.net.features(x.float()) - self.net.features(y.float())).pow(2).sum(1)


class PerceptualDistance(_NetworkDistance):
    """LPIPS's form without its learned per-channel weights (Zhang et al. 2018, the "baseline"
    variant): for every activation layer, channel vectors normalised to unit length, squared
    differences summed over channels, averaged over positions; summed over layers."""

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        total = 0.0
        for a, b in zip(self.net.activations(x.float()), self.net.activations(y.float())):
            a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
            b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
            total = total + (a - b).pow(2).sum(1).mean((1, 2))
        return total


class LPIPSDistance(nn.Module):
    """torchmetrics' LPIPS (images in [-1, 1]; grayscale repeated to 3 channels)."""

    def __init__(self, net_type: str = "vgg"):
        super().__init__()
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        try:
            self.lpips = LearnedPerceptualImagePatchSimilarity(net_type=net_type, reduction="none")
        except Exception as err:  # weight download fails offline
            raise RuntimeError(
                f"LPIPS ({net_type}) weights could not be loaded ({err}). They are downloaded on "
                "first use; offline, set algorithm.regression.distance=perceptual (or l2)."
            ) from err
        self.lpips.requires_grad_(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x, y = x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)
        # The metric's network directly: calling the metric object would also accumulate state.
        return self.lpips.net(x.float().clamp(-1, 1), y.float().clamp(-1, 1)).flatten()


DISTANCES = {"l2": L2Distance, "lpips": LPIPSDistance, "perceptual": PerceptualDistance,
             "features": FeatureDistance}


def build_distance(name: str, network: str | None = None) -> nn.Module:
    """``l2``, ``lpips``, or ``perceptual`` / ``features`` (a network folder, ``network``)."""
    if name not in DISTANCES:
        raise ValueError(f"Unknown regression distance {name!r}; choose one of {sorted(DISTANCES)}.")
    if name in ("perceptual", "features"):
        if not network:
            raise ValueError(f"distance={name} needs a network folder (algorithm.regression.network).")
        return DISTANCES[name](network)
    return DISTANCES[name]()


def digest(distance: nn.Module) -> str | None:
    """The weights sha256 of the network behind a distance (None for l2 / LPIPS)."""
    return getattr(distance, "weights_sha256", None)


__all__ = ["DISTANCES", "build_distance", "digest"]
