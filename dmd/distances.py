"""Per-sample distances for DMD's regression loss.

DMD uses LPIPS between the generator's and the teacher's image for the same noise. LPIPS
weights are downloaded by torchmetrics on first use; offline, use ``l2`` or ``features``
(the project's Fashion-MNIST feature network).
"""

from __future__ import annotations

from torch import Tensor, nn


class L2Distance(nn.Module):
    """Mean squared difference per sample."""

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return (x.float() - y.float()).pow(2).flatten(1).mean(1)


class FeatureDistance(nn.Module):
    """Squared L2 distance between the features of a frozen network (e.g. the Fashion-MNIST
    classifier's penultimate layer), a perceptual distance that works offline."""

    def __init__(self, path: str):
        super().__init__()
        from dmd.metrics.features import FashionMNISTClassifier

        self.net = FashionMNISTClassifier.load(path).requires_grad_(False).eval()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return (self.net.features(x.float()) - self.net.features(y.float())).pow(2).sum(1)


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
                "first use; offline, set algorithm.regression.distance=l2 or =features."
            ) from err
        self.lpips.requires_grad_(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x, y = x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)
        # The metric's network directly: calling the metric object would also accumulate state.
        return self.lpips.net(x.float().clamp(-1, 1), y.float().clamp(-1, 1)).flatten()


def build_distance(name: str, feature_network: str | None = None) -> nn.Module:
    """``l2``, ``lpips`` or ``features`` (needs ``feature_network``, a classifier folder)."""
    if name == "l2":
        return L2Distance()
    if name == "lpips":
        return LPIPSDistance()
    if name == "features":
        if not feature_network:
            raise ValueError("distance=features needs a feature_network folder.")
        return FeatureDistance(feature_network)
    raise ValueError(f"Unknown regression distance {name!r}; choose l2, lpips or features.")



