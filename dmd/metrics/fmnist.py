"""The bundled Fashion-MNIST feature network (``fid_fmnist``, ``kid_fmnist``, class consistency).

Its metrics are NOT Inception FIDs; numbers are comparable only with each other. The metrics
themselves come from :class:`dmd.metrics.Evaluator` with
:class:`dmd.metrics.extractors.FMNISTFeatures` (``eval=fmnist``).
"""

from __future__ import annotations

import os
from pathlib import Path

from dmd import ROOT_DIR
from dmd.metrics.features import FashionMNISTClassifier

DEFAULT_CLASSIFIER = ROOT_DIR / "experiments" / "checkpoints" / "fmnist_classifier"


def load_classifier(path: str | Path = DEFAULT_CLASSIFIER) -> FashionMNISTClassifier:
    return FashionMNISTClassifier.load(path)


def data_evaluator(cache_dir: str | Path | None = None, split: str = "test"):
    """An evaluator of Fashion-MNIST samples against one data split only (no teacher needed);
    references are cached where ``paths.cache_dir`` puts them ($DMD_CACHE_DIR or .cache/)."""
    from dmd.metrics.evaluator import Evaluator
    from dmd.metrics.extractors import FMNISTFeatures
    from dmd.metrics.reference import DataReference

    if cache_dir is None:
        cache_dir = Path(os.environ.get("DMD_CACHE_DIR", ROOT_DIR / ".cache")) / "references"
    return Evaluator(FMNISTFeatures(), {"data": DataReference(split=split)}, cache_dir,
                     progress=False)
