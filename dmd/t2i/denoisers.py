"""Denoisers around the diffusion transformers of SD3 and Flux (flow matching, velocity output).

Both keep the network in ``.unet`` like :class:`~dmd.denoisers.DiffusersUNetDenoiser` does (the
attribute every other module, LoRA and the checkpoints' keys use): the name is the role, "the
denoising network", not its architecture. Conditions are the dicts of
:class:`~dmd.t2i.text.PromptEncoder` (``encoder_hidden_states`` + ``pooled_projections``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dmd.denoisers import DiffusersUNetDenoiser


class SD3Denoiser(DiffusersUNetDenoiser):
    """``SD3Transformer2DModel`` called as StableDiffusion3Pipeline calls it (timestep sigma * T)."""

    def _call(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        return self.unet(hidden_states=x_t, timestep=self.schedule.model_time(t), **cond).sample


class FluxDenoiser(DiffusersUNetDenoiser):
    """``FluxTransformer2DModel`` called as FluxPipeline calls it: latents (B, C, H, W) as a
    sequence of 2x2 patches (B, H/2 * W/2, 4C) with their (0, row, column) position ids, text
    positions all zero, the timestep as sigma in [0, 1] and, for guidance-distilled models
    (FLUX.1-dev: ``guidance_embeds``), the guidance value as an input instead of CFG.

    ``guidance``: that value (FluxPipeline's ``guidance_scale``; 3.5 by default there). The
    teacher (real score), the generator and the fake score all take the same value: at the
    start the generator is the teacher sampled at that guidance, and the fake score, a copy of
    the same network, must answer for the generator's samples; any other value would make it
    start as a different model from the distribution it tracks."""

    def __init__(self, unet, schedule, prediction_type: str, guidance: float | None = 3.5):
        super().__init__(unet, schedule, prediction_type)
        self.guidance = guidance if unet.config.guidance_embeds else None

    def _call(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        b, c, h, w = x_t.shape
        tokens = pack_latents(x_t)
        text = cond["encoder_hidden_states"]
        guidance = None if self.guidance is None else torch.full((b,), self.guidance, device=x_t.device,
                                                                 dtype=tokens.dtype)
        sigma = self.schedule.model_time(t) / self.schedule.num_train_timesteps
        out = self.unet(hidden_states=tokens, timestep=sigma.to(tokens.dtype), guidance=guidance,
                        pooled_projections=cond["pooled_projections"], encoder_hidden_states=text,
                        txt_ids=torch.zeros(text.shape[1], 3, device=x_t.device, dtype=tokens.dtype),
                        img_ids=patch_ids(h, w, x_t.device, tokens.dtype)).sample
        return unpack_latents(out, c, h, w)

    def noise_like(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        # FluxPipeline's scheduler draws its noise as tokens (B, H/2 * W/2, 4C).
        return unpack_latents(super().noise_like(pack_latents(x), generator), *x.shape[1:])


def pack_latents(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch one token, channels-major within it."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, c: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`pack_latents`."""
    b = tokens.shape[0]
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def patch_ids(h: int, w: int, device=None, dtype=torch.float32) -> Tensor:
    """(H/2 * W/2, 3) position ids of the patches: (0, row, column)."""
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)
