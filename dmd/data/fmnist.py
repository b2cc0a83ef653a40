"""Fashion-MNIST (28x28 grey, 10 classes) scaled to [-1, 1].

Looked for, in order: a configured folder, the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``), and a torchvision download when ``download=True``
and the internet is reachable. The IDX files may be gzipped or not.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from dmd.data.loaders import resumable_loader

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (big-endian header: magic, dims) into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    fix = "reinstall it (apt-get install --reinstall dataset-fashion-mnist) or point data.root elsewhere"
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, OSError) as err:  # a cut-off or damaged gzip stream
        raise ValueError(f"{path} is truncated or corrupt ({err}): {fix}.") from err
    ndim = data[3] if len(data) >= 4 else 0
    if len(data) < 4 + 4 * ndim or data[:2] != b"\0\0" or ndim == 0:
        raise ValueError(f"{path} is truncated or corrupt (no IDX header in its {len(data)} bytes): {fix}.")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated or corrupt: header says {shape}, found {arr.size} bytes: {fix}.")
    return arr.reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for sub in (folder, folder / "FashionMNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (sub / name).is_file():
                return sub / name
    return None


def _candidate_dirs(root: str | Path | None) -> list[Path]:
    return ([Path(root).expanduser()] if root else []) + [DEBIAN_DIR]


def load_fashion_mnist(split: str = "train", root: str | Path | None = None,
                       download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images uint8 N x 1 x 28 x 28, labels int64 N) for ``split`` in train/test."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    img_stem, lbl_stem = _FILES[split]
    found = [(_find(d, img_stem), _find(d, lbl_stem)) for d in _candidate_dirs(root)]
    img, lbl = next(((i, lb) for i, lb in found if i and lb), (None, None))
    hint = ""
    if img is None and download:
        if root:
            try:
                from torchvision.datasets import FashionMNIST

                FashionMNIST(str(root), train=split == "train", download=True)
            except Exception as err:  # network errors vary by platform
                hint = f" (the download failed: {err})"
            img, lbl = _find(Path(root), img_stem), _find(Path(root), lbl_stem)
        else:
            hint = " (data.download=true needs data.root to download into)"
    if img is None or lbl is None:
        tried = ", ".join(str(d) for d in _candidate_dirs(root))
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files ({img_stem}[.gz]) not found in: {tried}. Fix one of: "
            f"(1) set data.root=<folder with the IDX files>; "
            f"(2) install the Debian package: apt-get install dataset-fashion-mnist "
            f"(files land in {DEBIAN_DIR}); "
            f"(3) set data.download=true and data.root=<folder> on a machine with internet "
            f"(torchvision download){hint}."
        )
    images = torch.from_numpy(_read_idx(img).copy()).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(lbl).astype(np.int64))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{img} and {lbl} disagree on the number of examples.")
    return images, labels


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images_uint8.float() / 127.5 - 1.0


class FashionMNISTDataModule(pl.LightningDataModule):
    """Batches of (image in [-1, 1], label); the test split serves validation."""

    num_classes = len(CLASSES)
    image_shape = (1, 28, 28)

    def __init__(self, root: str | None = None, download: bool = False, batch_size: int = 128,
                 num_workers: int = 0, val_batch_size: int = 512, seed: int = 0):
        super().__init__()
        self.seed = seed
        self.root, self.download = root, download
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self._dataset("train")
            self.val_set = self._dataset("test")

    def _dataset(self, split: str) -> TensorDataset:
        images, labels = load_fashion_mnist(split, self.root, self.download)
        return TensorDataset(to_model_range(images), labels)

    def train_dataloader(self) -> DataLoader:
        return resumable_loader(self.train_set, self.batch_size, self.seed, num_workers=self.num_workers,
                                persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.val_batch_size, num_workers=self.num_workers)
