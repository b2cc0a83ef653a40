"""Conditions (class labels, text embeddings), the null condition and classifier-free guidance.

A condition is whatever a :class:`~dmd.denoisers.Denoiser` accepts as ``cond``: ``None``
(unconditional), a LongTensor of class labels (the null class is label ``num_classes``), or
a dict of tensors for text-conditioned UNets (the null condition is the empty-prompt
embedding for SD1.5, zeros for SDXL).
"""

from __future__ import annotations

import torch
from torch import Tensor


def null_labels_like(labels: Tensor, num_classes: int) -> Tensor:
    """The null class (index ``num_classes``) for every element of ``labels``."""
    return torch.full_like(labels, num_classes)


def drop_labels(labels: Tensor, num_classes: int, p: float, generator=None) -> Tensor:
    """Replace each label by the null class with probability ``p`` (CFG training)."""
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device, generator=generator) < p
    return torch.where(drop, null_labels_like(labels, num_classes), labels)


def concat_conditions(a, b):
    """Stack two conditions of the same kind along the batch (one forward for cond+uncond)."""
    if isinstance(a, dict):
        return {k: concat_conditions(a[k], b[k]) for k in a}
    return torch.cat([a, b], dim=0)


def guided_x0(denoiser, x_t: Tensor, t: Tensor, cond, uncond, guidance_scale: float) -> Tensor:
    """Classifier-free guidance in x0 space: uncond + w * (cond - uncond).

    w = 1 (or no null condition) is the plain conditional prediction and costs one forward.
    """
    if uncond is None or guidance_scale == 1.0:
        return denoiser(x_t, t, cond)
    t = torch.as_tensor(t, device=x_t.device)
    t2 = torch.cat([t, t]) if t.ndim else t
    x0 = denoiser(torch.cat([x_t, x_t]), t2, concat_conditions(cond, uncond))
    x0_cond, x0_uncond = x0.chunk(2)
    return x0_uncond + guidance_scale * (x0_cond - x0_uncond)
