"""DMD2's discriminator: a small head on the fake score's bottleneck features.

Real and generated samples are noised to a random t, passed through the fake-score network,
and the output of its bottleneck (``mid_block`` of a diffusers UNet, ``mid`` of
:class:`~dmd.networks.MLPNet`, the image tokens after the middle joint block of an SD3 or Flux
transformer) is read with a forward hook. The head turns those features into
one logit per sample. The discriminator step trains the head *and* the fake network's layers
up to the bottleneck (its encoder); the generator's GAN loss backpropagates through both into
the generated sample.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dmd.losses import randn_like, sample_timesteps


def bottleneck_module(network: nn.Module) -> nn.Module:
    """The module whose output is the bottleneck: ``mid_block`` (UNets), ``mid`` (MLPNet), or
    the middle of ``transformer_blocks`` (SD3's and Flux's joint text-image blocks; the first of
    two, so that it is never SD3's last block, which drops the text stream)."""
    for name in ("mid_block", "mid"):
        module = getattr(network, name, None)
        if module is not None:
            return module
    blocks = getattr(network, "transformer_blocks", None)
    if blocks:
        return blocks[(len(blocks) - 1) // 2]
    raise ValueError(f"{type(network).__name__} has no mid_block/mid/transformer_blocks: cannot attach a GAN head.")


def bottleneck_channels(network: nn.Module) -> int:
    """Feature width at the bottleneck, read from the network's config."""
    cfg = network.config
    if hasattr(cfg, "block_out_channels"):
        return cfg.block_out_channels[-1]
    if hasattr(cfg, "num_attention_heads"):  # diffusion transformers: the token width
        return cfg.num_attention_heads * cfg.attention_head_dim
    return cfg.hidden


class DiscriminatorHead(nn.Module):
    """Bottleneck features -> one logit: conv layers and global pooling for feature maps
    (B, C, H, W), an MLP for vectors (B, C) and for the mean of image tokens (B, N, C)."""

    def __init__(self, channels: int, spatial: bool = True, groups: int = 16):
        super().__init__()
        if spatial:
            g = max(1, min(groups, channels))
            while channels % g:
                g -= 1
            self.net = nn.Sequential(
                nn.GroupNorm(g, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                nn.GroupNorm(g, channels), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                nn.Linear(channels, 1))
        else:
            self.net = nn.Sequential(nn.SiLU(), nn.Linear(channels, channels), nn.SiLU(),
                                     nn.Linear(channels, 1))

    @classmethod
    def for_network(cls, network: nn.Module) -> DiscriminatorHead:
        return cls(bottleneck_channels(network), spatial=hasattr(network.config, "block_out_channels"))

    def forward(self, features: Tensor) -> Tensor:
        if features.ndim == 3:  # transformer tokens: pooled like the conv head's global average
            features = features.mean(dim=1)
        return self.net(features.float()).squeeze(-1)


class _Bottleneck(Exception):
    """Raised by the hook to stop the forward pass once the bottleneck is computed."""

    def __init__(self, features: Tensor):
        super().__init__()
        self.features = features


def _stop_at_bottleneck(module, args, output):
    # Joint transformer blocks answer (text tokens, image tokens): the image stream is last.
    raise _Bottleneck(output[-1] if isinstance(output, tuple) else output)


def bottleneck_features(denoiser, x_t: Tensor, t: Tensor, cond) -> Tensor:
    """Run the denoiser's network on x_t up to its bottleneck and return that output.

    The decoder never runs: the discriminator needs only the encoder, and skipping the rest
    saves about half of every discriminator forward and backward pass.
    """
    hook = bottleneck_module(denoiser.unet).register_forward_hook(_stop_at_bottleneck)
    try:  # eager even where the network is compiled: a traced forward would not stop at the hook
        with torch.compiler.set_stance("force_eager"):
            denoiser.network_output(x_t, t, cond)
    except _Bottleneck as stop:
        return stop.features
    finally:
        hook.remove()
    raise RuntimeError("The network's forward pass did not reach its bottleneck module.")


def discriminator_logits(fake_score, head: DiscriminatorHead, x: Tensor, cond,
                         t_range=(0.02, 0.98), generator: torch.Generator | None = None) -> Tensor:
    """Logits of the discriminator for samples ``x``, noise-injected at a uniform random t."""
    schedule = fake_score.schedule
    t = sample_timesteps(x.shape[0], schedule.num_train_timesteps, x.device, *t_range,
                         generator=generator)
    x_t = schedule.add_noise(x, randn_like(x, generator), t)
    return head(bottleneck_features(fake_score, x_t, t, cond))
