"""Training data loaders that resume mid-epoch exactly.

torchdata's ``StatefulDataLoader`` is a drop-in ``DataLoader`` with ``state_dict`` /
``load_state_dict``; Lightning stores that state in its checkpoints and restores it, so a
resumed run sees the batches an uninterrupted run would have seen. The shuffle order comes
from a seeded generator, not the global RNG.
"""

from __future__ import annotations

import torch
from torchdata.stateful_dataloader import StatefulDataLoader


def resumable_loader(dataset, batch_size: int, seed: int, **kwargs) -> StatefulDataLoader:
    """Shuffled, drop-last training loader whose position is checkpointed by Lightning."""
    return StatefulDataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                              generator=torch.Generator().manual_seed(seed), **kwargs)
