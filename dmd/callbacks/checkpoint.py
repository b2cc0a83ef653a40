"""Checkpoint at the iteration where training stops.

``ModelCheckpoint`` saves every N Lightning steps; a run that stops at ``max_iterations``
in the middle of an epoch also needs its exact final state (counters, RNG, optimizer and
data-loader position), saved from inside the loop, so that a longer rerun continues it
batch for batch. (A checkpoint written after ``trainer.fit`` returns would record the epoch
as finished and skip the rest of its batches.)
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl


class FinalCheckpoint(pl.Callback):
    def __init__(self, dirpath: str, filename: str = "last.ckpt"):
        self.path = Path(dirpath) / filename

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        limit = getattr(pl_module, "max_iterations", None)
        if limit and pl_module.iteration == limit:
            trainer.save_checkpoint(self.path)
