"""Small networks in diffusers' model format (``save_pretrained`` / ``from_pretrained``).

:class:`MLPNet` is the 2-D counterpart of ``UNet2DModel``: same call signature
(``sample, timestep, class_labels``), same ``.sample`` output, same folder format, so a 2-D
teacher is a diffusers folder (``unet/`` + ``scheduler/``) like the Fashion-MNIST one and
every loader, generator and fake score treats both alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import Tensor, nn


@dataclass
class MLPOutput(BaseOutput):  # a dataclass, as diffusers' outputs are (torch.compile rebuilds them as such)
    sample: Tensor


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer-style sinusoidal embedding of (possibly fractional) timesteps."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPNet(ModelMixin, ConfigMixin):
    """Time- (and optionally class-) conditioned residual-free MLP for low-dimensional data.

    ``mid`` (the output of the middle hidden layer) is the bottleneck a GAN head reads.
    ``num_class_embeds`` counts the null class used for classifier-free guidance, as in
    ``UNet2DModel``.
    """

    @register_to_config
    def __init__(self, sample_size: int = 2, hidden: int = 256, depth: int = 4,
                 time_embed_dim: int = 64, num_class_embeds: int | None = None):
        super().__init__()
        self.time_mlp = nn.Sequential(nn.Linear(time_embed_dim, hidden), nn.SiLU())
        self.class_embedding = nn.Embedding(num_class_embeds, hidden) if num_class_embeds else None
        self.inp = nn.Sequential(nn.Linear(sample_size + hidden, hidden), nn.SiLU())
        half = max(depth // 2, 1)
        self.down = nn.Sequential(*[m for _ in range(half - 1) for m in (nn.Linear(hidden, hidden), nn.SiLU())])
        self.mid = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU())
        self.up = nn.Sequential(*[m for _ in range(depth - half - 1) for m in (nn.Linear(hidden, hidden), nn.SiLU())])
        self.out = nn.Linear(hidden, sample_size)

    def forward(self, sample: Tensor, timestep: Tensor, class_labels: Tensor | None = None,
                return_dict: bool = True):
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(sample.shape[0]) if t.ndim == 0 else t
        h = self.time_mlp(sinusoidal_embedding(t, self.config.time_embed_dim))
        if self.class_embedding is not None and class_labels is not None:
            h = h + self.class_embedding(class_labels)
        h = self.up(self.mid(self.down(self.inp(torch.cat([sample, h], dim=-1)))))
        out = self.out(h)
        return MLPOutput(sample=out) if return_dict else (out,)
