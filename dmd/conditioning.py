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


def map_condition(fn, cond):
    """Apply ``fn`` to every tensor of a condition (None, a tensor, or a nested dict of them)."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: map_condition(fn, v) for k, v in cond.items()}
    return fn(cond)


def condition_to(cond, device):
    """A condition moved to ``device`` (None: left where it is)."""
    return cond if device is None else map_condition(lambda t: t.to(device), cond)


def select_condition(cond, index):
    """Rows ``index`` (a slice or an index tensor) of a batched condition."""
    return map_condition(lambda t: t[index], cond)


def repeat_condition(cond, n: int):
    """A batch-1 condition repeated to ``n`` rows."""
    return map_condition(lambda t: t.expand(n, *t.shape[1:]).contiguous(), cond)


def flatten_condition(cond, prefix: str = "") -> dict:
    """A nested condition dict as flat ``{"a.b": tensor}`` (for safetensors files)."""
    if not isinstance(cond, dict):
        return {prefix: cond}
    out = {}
    for k, v in cond.items():
        out.update(flatten_condition(v, f"{prefix}.{k}" if prefix else k))
    return out


def unflatten_condition(flat: dict) -> dict:
    """Inverse of :func:`flatten_condition`."""
    out: dict = {}
    for key, v in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def concat_conditions(*conds):
    """Stack conditions of the same kind along the batch (e.g. cond+uncond for one forward)."""
    if isinstance(conds[0], dict):
        return {k: concat_conditions(*(c[k] for c in conds)) for k in conds[0]}
    return torch.cat(conds, dim=0)


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
