"""Offline Fashion-MNIST metrics under the project's feature network.

``fid_fmnist``: Frechet distance between classifier-penultimate features of generated images
and of a reference split (NOT Inception FID; numbers are comparable only with each other).
``class_consistency``: share of generated images the classifier assigns to the label they
were generated for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dmd import ROOT_DIR
from dmd.data.fmnist import load_fashion_mnist
from dmd.metrics.features import FashionMNISTClassifier, extract
from dmd.metrics.fid import fid_from_features

DEFAULT_CLASSIFIER = ROOT_DIR / "experiments" / "checkpoints" / "fmnist_classifier"


def load_classifier(path: str | Path = DEFAULT_CLASSIFIER) -> FashionMNISTClassifier:
    return FashionMNISTClassifier.load(path)


def fmnist_metrics(images: torch.Tensor | np.ndarray, labels=None, reference: str = "test",
                   classifier: FashionMNISTClassifier | None = None, data_root=None) -> dict:
    """fid_fmnist vs a Fashion-MNIST split and, given labels, class consistency."""
    classifier = classifier or load_classifier()
    images = torch.as_tensor(images)
    feats, logits = extract(classifier, images)
    ref_images, _ = load_fashion_mnist(reference, data_root)
    ref_feats, _ = extract(classifier, ref_images)
    out = {f"fid_fmnist_{reference}": fid_from_features(feats, ref_feats),
           "num_samples": int(images.shape[0])}
    if labels is not None:
        labels = torch.as_tensor(labels).long()
        if (labels >= 0).all():
            out["class_consistency"] = (logits.argmax(-1) == labels).float().mean().item()
    return out
