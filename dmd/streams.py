"""Random streams keyed by their purpose: no evaluation draw can equal a training draw.

Every random draw of the project comes from a ``torch.Generator`` seeded by
``stream(purpose, seed)``: the seed is hashed together with the purpose, so two purposes never
share a stream whatever seeds a user picks (``eval.seed=0`` and ``algorithm.regression.seed=0``
once gave the same 1000 noises to the evaluation and to DMD's regression pairs).

Purposes:
    training            the DMD module's noise, timesteps and regression batches (per rank)
    training-data       draws of an analytic mixture that make up its training set
    eval                the noise of samples that are scored (callback, dmd.evaluate, dmd.sample)
    eval-renoise        the fresh noise a multi-step generator re-noises with when scored
    teacher-reference   the teacher samples that metrics compare against
    data-reference      subsets of real data (or mixture draws) that metrics compare against
    regression-pairs    the noise of DMD's teacher noise -> image pairs
    latency             inputs of latency measurements

``STREAMS_VERSION`` is part of every cache key built on drawn samples (regression pairs,
teacher references): caches made with another derivation are never reused.
"""

from __future__ import annotations

import hashlib

import torch

STREAMS_VERSION = 2
PURPOSES = ("training", "training-data", "eval", "eval-renoise", "teacher-reference",
            "data-reference", "regression-pairs", "latency")


def stream_seed(purpose: str, seed: int) -> int:
    """A 63-bit seed for ``(purpose, seed)``."""
    if purpose not in PURPOSES:
        raise ValueError(f"Unknown random stream purpose {purpose!r}; one of {PURPOSES}.")
    digest = hashlib.sha256(f"dmd-stream-v{STREAMS_VERSION}:{purpose}:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def stream(purpose: str, seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` for ``(purpose, seed)``."""
    return torch.Generator().manual_seed(stream_seed(purpose, seed))


def noise(purpose: str, seed: int, num_samples: int, shape) -> torch.Tensor:
    """The first ``num_samples`` standard normal draws of shape ``shape`` of that stream."""
    return torch.randn(num_samples, *shape, generator=stream(purpose, seed))
