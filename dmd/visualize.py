"""Pictures: image grids and 2-D scatter plots of samples."""

from __future__ import annotations

from pathlib import Path

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clamped, rounded)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_sample_grid(samples: torch.Tensor, path: str | Path, nrow: int = 10) -> Path:
    """Images in [-1, 1] (N, C, H, W) as a PNG grid; 2-D points (N, 2) as a scatter plot."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if samples.ndim == 4:
        from torchvision.utils import save_image  # (a second to import: only when drawing images)

        save_image(samples.float().clamp(-1, 1), str(path), nrow=nrow, normalize=True,
                   value_range=(-1, 1), padding=1)
    elif samples.ndim == 2 and samples.shape[1] == 2:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
        pts = samples.float().cpu().numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4)
        ax.set_aspect("equal")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
    else:
        raise ValueError(f"Cannot draw samples of shape {tuple(samples.shape)}.")
    return path
