"""Feature extractors for FID/KID: one interface, two networks.

An extractor maps images (float in [-1, 1], NCHW, or uint8) to an (N, D) float64 feature matrix
and, when it is a classifier, logits (for class consistency). Its ``provenance`` (name, weights
hash, resize mode) is part of every cached reference statistic, so changing the network
invalidates the cache.

- :class:`FMNISTFeatures` (``fmnist``): the project's Fashion-MNIST classifier, offline. Its
  metrics are called ``fid_fmnist`` / ``kid_fmnist``: they are NOT Inception FIDs.
- :class:`InceptionFeatures` (``inception``): clean-fid's Inception-v3 (the TF-FID torchscript
  weights) in clean-fid's "clean" mode (PIL bicubic resize to 299x299). Weights come from a
  local folder, or are downloaded by clean-fid on a connected machine.
"""

from __future__ import annotations

import hashlib
import urllib.error
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from dmd.metrics.features import FashionMNISTClassifier, extract
from dmd.visualize import to_uint8

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                 + INCEPTION_FILE)


def _device(device) -> torch.device:
    return torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quantize(images: Tensor) -> Tensor:
    """Float images in [-1, 1] -> uint8, as they would be saved: every metric sees what a user
    sees (out-of-range values clipped, as in a PNG). uint8 input passes unchanged."""
    images = torch.as_tensor(images)
    return images if images.dtype == torch.uint8 else to_uint8(images)


def to_uint8_nhwc(images: Tensor) -> np.ndarray:
    """Images in [-1, 1] (NCHW float) or uint8 (NCHW / NHWC) -> uint8 NHWC numpy."""
    x = quantize(images)
    if x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.permute(0, 2, 3, 1)
    return x.contiguous().numpy()


class FMNISTFeatures:
    """Penultimate features and logits of a Fashion-MNIST classifier trained by the project:
    the bundled ``fmnist_classifier`` (``name`` fmnist) by default; ``fmnist_resnet`` is the
    second, independent feature space (``name`` fmnist_resnet)."""

    resize = "none"

    def __init__(self, path: str | Path | None = None, batch_size: int = 1000, device=None,
                 name: str = "fmnist"):
        from dmd.metrics.fmnist import DEFAULT_CLASSIFIER

        self.name = name
        self.path = Path(path or DEFAULT_CLASSIFIER)
        self.net = FashionMNISTClassifier.load(self.path)
        self.batch_size, self.device = batch_size, device

    @property
    def provenance(self) -> dict:
        return {"name": self.name, "weights_sha256": self.net.weights_sha256, "resize": self.resize}

    def __call__(self, images: Tensor, progress: bool = False) -> tuple[Tensor, Tensor | None]:
        images = torch.as_tensor(images)
        if tuple(images.shape[-3:]) not in ((1, 28, 28), (28, 28, 1)):
            raise ValueError(f"The {self.name} feature network (eval=fmnist) takes 1x28x28 images, got "
                             f"samples of shape {tuple(images.shape[1:])}: use eval=inception for "
                             "other images, eval=mixture for 2-D points.")
        return extract(self.net, images, self.batch_size, _device(self.device), progress)


class InceptionFeatures:
    """clean-fid's Inception-v3 pool features (2048-d), "clean" resize; no logits.

    ``path`` is the folder holding ``inception-2015-12-05.pt``; with ``download=True`` clean-fid
    fetches it there when missing (needs internet).
    """

    name = "inception"
    resize = "clean"  # clean-fid: PIL bicubic to 299x299 on uint8 images, no quantisation after

    def __init__(self, path: str | Path | None = None, download: bool = True,
                 batch_size: int = 64, device=None):
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        self.weights_dir = Path(path or Path.home() / ".cache" / "clean-fid").expanduser()
        weights = self.weights_dir / INCEPTION_FILE
        if not weights.is_file():
            if not download:
                raise FileNotFoundError(self._missing(weights, "download=false"))
            from cleanfid.inception_torchscript import check_download_inception

            self.weights_dir.mkdir(parents=True, exist_ok=True)
            try:
                check_download_inception(fpath=str(self.weights_dir))
            except (urllib.error.URLError, OSError) as err:
                weights.unlink(missing_ok=True)  # never leave a truncated file behind
                raise FileNotFoundError(self._missing(weights, f"download failed: {err}")) from err
        self.weights_sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
        self.device = _device(device)
        self.net = InceptionV3W(str(self.weights_dir), download=False).to(self.device).eval()
        self.resizer = build_resizer("clean")
        self.batch_size = batch_size

    @staticmethod
    def _missing(weights: Path, why: str) -> str:
        return (f"Inception weights {weights} are missing ({why}). Download {INCEPTION_URL} on a "
                f"connected machine into that folder (or set eval.evaluator.extractor.path), "
                "or evaluate offline with the Fashion-MNIST features (eval=fmnist).")

    @property
    def provenance(self) -> dict:
        return {"name": self.name, "weights_sha256": self.weights_sha256, "resize": self.resize}

    @torch.no_grad()
    def __call__(self, images: Tensor, progress: bool = False) -> tuple[Tensor, None]:
        arr = to_uint8_nhwc(images)
        if arr.shape[-1] == 1:  # grayscale: the RGB network sees three equal channels
            arr = np.repeat(arr, 3, axis=-1)
        feats = []
        for start in tqdm(range(0, arr.shape[0], self.batch_size), desc="inception features",
                          disable=not progress):
            batch = np.stack([self.resizer(img) for img in arr[start: start + self.batch_size]])
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().to(self.device)
            feats.append(self.net(x).reshape(x.shape[0], -1).double().cpu())
        return torch.cat(feats), None


__all__ = ["FMNISTFeatures", "InceptionFeatures", "quantize", "to_uint8_nhwc"]
