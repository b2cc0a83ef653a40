"""Checkpoints keyed on DMD iterations, not Lightning steps.

Lightning's ``global_step`` advances by 2 on generator iterations (two optimizers), so
``ModelCheckpoint(every_n_train_steps=N)`` would skip some multiples of N and drift from the
training's own clock. :class:`IterationCheckpoint` saves ``last.ckpt`` every N iterations and at
the iteration where ``max_iterations`` stops training, from inside the loop: counters, RNG,
optimizer and data-loader position are those of that moment, so a rerun continues batch for
batch. (A checkpoint written after ``trainer.fit`` returns would record the epoch as finished.)
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl


class IterationCheckpoint(pl.Callback):
    def __init__(self, dirpath: str, every_n_iterations: int = 500, filename: str = "last.ckpt"):
        if every_n_iterations < 1:
            raise ValueError(f"every_n_iterations must be >= 1, got {every_n_iterations}.")
        self.path = Path(dirpath) / filename
        self.every_n_iterations = every_n_iterations

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        it = pl_module.iteration
        limit = getattr(pl_module, "max_iterations", None)
        if it % self.every_n_iterations == 0 or (limit and it == limit):
            trainer.save_checkpoint(self.path, weights_only=False)  # the full training state
