"""Fashion-MNIST networks trained by the project: offline evaluators and a perceptual distance.

Inception, CLIP and LPIPS weights cannot be downloaded here, so Fashion-MNIST uses small CNN
classifiers trained by the project (``python -m dmd.train_classifier arch=<arch>``), each a
separate architecture and training run, bundled under ``experiments/checkpoints``:

- ``fmnist_classifier`` (arch ``vgg``: plain conv + BatchNorm + max-pool): the features of
  ``fid_fmnist`` and the predictions of class consistency;
- ``fmnist_resnet`` (arch ``resnet``: residual blocks, GroupNorm, SiLU, strided convs): the
  second, independent evaluation feature space (``fid_fmnist_resnet``);
- ``fmnist_perceptual`` (arch ``alex``: large kernels, no normalisation): used by no evaluator;
  its layer activations define the offline perceptual distance of DMD's regression loss
  (:class:`dmd.distances.PerceptualDistance`).

Weights live in safetensors next to a ``config.json`` (its ``arch`` picks the body).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class _Residual(nn.Module):
    """Pre-activation residual block (GroupNorm, SiLU); ``stride`` 2 halves the resolution."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.branch = nn.Sequential(
            nn.GroupNorm(8, c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, stride, 1),
            nn.GroupNorm(8, c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, 1, 1))
        self.skip = nn.Identity() if (c_in, stride) == (c_out, 1) else nn.Conv2d(c_in, c_out, 1, stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.branch(x)


def _vgg_body(c1: int, c2: int, c3: int) -> list[nn.Module]:
    return [_conv_block(1, c1), _conv_block(c1, c1), nn.MaxPool2d(2),  # 14x14
            _conv_block(c1, c2), _conv_block(c2, c2), nn.MaxPool2d(2),  # 7x7
            _conv_block(c2, c3)]


def _resnet_body(c1: int, c2: int, c3: int) -> list[nn.Module]:
    return [nn.Conv2d(1, c1, 3, 1, 1), _Residual(c1, c1),
            _Residual(c1, c2, 2), _Residual(c2, c2),  # 14x14
            _Residual(c2, c3, 2), _Residual(c3, c3),  # 7x7
            nn.GroupNorm(8, c3), nn.SiLU()]


def _alex_body(c1: int, c2: int, c3: int) -> list[nn.Module]:
    return [nn.Conv2d(1, c1, 5, 1, 2), nn.ReLU(), nn.MaxPool2d(2),  # 14x14
            nn.Conv2d(c1, c2, 5, 1, 2), nn.ReLU(), nn.MaxPool2d(2),  # 7x7
            nn.Conv2d(c2, c3, 3, 1, 1), nn.ReLU()]


ARCHITECTURES = {"vgg": _vgg_body, "resnet": _resnet_body, "alex": _alex_body}


class FashionMNISTClassifier(nn.Module):
    """CNN on 1x28x28 images in [-1, 1]: ``features`` (penultimate, ``feature_dim``) and logits;
    ``arch`` picks the convolutional body (:data:`ARCHITECTURES`)."""

    def __init__(self, channels: tuple[int, int, int] = (32, 64, 128), feature_dim: int = 128,
                 num_classes: int = 10, dropout: float = 0.3, arch: str = "vgg"):
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"Unknown classifier arch {arch!r}; choose one of {sorted(ARCHITECTURES)}.")
        c1, c2, c3 = channels
        self.config = {"arch": arch, "channels": list(channels), "feature_dim": feature_dim,
                       "num_classes": num_classes, "dropout": dropout}
        self.body = nn.Sequential(
            *ARCHITECTURES[arch](c1, c2, c3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(c3, feature_dim), nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def activations(self, x: Tensor) -> list[Tensor]:
        """The output of every activation layer of the convolutional body (ReLU / SiLU), in
        order: the layers a perceptual distance compares."""
        out = []
        for layer in self.body:
            x = layer(x)
            if isinstance(layer, (nn.ReLU, nn.SiLU, nn.Sequential, _Residual)) and x.ndim == 4:
                out.append(x)
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(self.config, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> FashionMNISTClassifier:
        """Load from a folder with ``config.json`` and ``model.safetensors`` (frozen, eval mode)."""
        folder = Path(folder)
        cfg_path, weights = folder / "config.json", folder / "model.safetensors"
        if not (cfg_path.is_file() and weights.is_file()):
            raise FileNotFoundError(
                f"{folder} must hold config.json and model.safetensors (written by "
                "`python -m dmd.train_classifier`).")
        cfg = json.loads(cfg_path.read_text())
        net = cls(tuple(cfg["channels"]), cfg["feature_dim"], cfg["num_classes"], cfg["dropout"],
                  cfg.get("arch", "vgg"))  # folders written before arch existed are vgg
        try:
            net.load_state_dict(load_file(weights))
        except RuntimeError as err:
            raise RuntimeError(f"{weights} does not match {cfg_path}: {err}") from err
        net.weights_sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
        return net.eval().requires_grad_(False)


@torch.no_grad()
def extract(net: FashionMNISTClassifier, images: Tensor, batch_size: int = 1000,
            device=None, progress: bool = False) -> tuple[Tensor, Tensor]:
    """(features, logits) for images in [-1, 1] (N, 1, 28, 28), or uint8 NHWC / NCHW."""
    device = device or next(net.parameters()).device
    net = net.to(device)
    feats, logits = [], []
    for start in tqdm(range(0, images.shape[0], batch_size), desc="features", disable=not progress):
        x = as_model_input(images[start: start + batch_size]).to(device)
        f = net.features(x)
        feats.append(f.cpu())
        logits.append(net.head(f).cpu())
    return torch.cat(feats).double(), torch.cat(logits)


def as_model_input(images: Tensor) -> Tensor:
    """uint8 images (NHWC as in .npz files, or NCHW) -> float NCHW in [-1, 1]; floats pass."""
    if images.dtype == torch.uint8:
        if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
            images = images.permute(0, 3, 1, 2)
        return images.float() / 127.5 - 1.0
    return images.float()
