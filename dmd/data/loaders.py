"""Training data loaders that resume mid-epoch exactly.

torchdata's ``StatefulDataLoader`` is a drop-in ``DataLoader`` with ``state_dict`` /
``load_state_dict``; Lightning stores that state in its checkpoints and restores it. The
shuffle order is :class:`EpochShuffle`'s: a permutation that is a pure function of (seed,
epoch), so a resumed run sees exactly the batches an uninterrupted run would have seen, in
this epoch and every later one.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler
from torchdata.stateful_dataloader import StatefulDataLoader


class EpochShuffle(Sampler[int]):
    """Shuffled indices; epoch e uses randperm(n) seeded by (seed, e). Lightning sets the epoch
    (``set_epoch``); the state (epoch, indices already yielded) is checkpointed by
    ``StatefulDataLoader`` so a resumed epoch skips what was already seen."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed = n, seed
        self.epoch, self.start, self.yielded = 0, 0, 0

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # a new epoch starts at its beginning, whatever state was loaded
            self.start = 0
        self.epoch = epoch

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=gen).tolist()
        start, self.start = self.start, 0
        for i in range(start, self.n):
            self.yielded = i + 1
            yield order[i]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.start = state["epoch"], state["yielded"]
        if self.start >= self.n:  # saved at the end of an epoch: the next one is next
            self.epoch, self.start = self.epoch + 1, 0


def resumable_loader(dataset, batch_size: int, seed: int, **kwargs) -> StatefulDataLoader:
    """Shuffled, drop-last training loader whose position is checkpointed by Lightning; batches in
    pinned memory when a GPU is present (Lightning's copy to the device is then asynchronous)."""
    kwargs.setdefault("pin_memory", torch.cuda.is_available())
    return StatefulDataLoader(dataset, batch_size=batch_size, sampler=EpochShuffle(len(dataset), seed),
                              drop_last=True, **kwargs)
