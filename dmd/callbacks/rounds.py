"""Keeping every round of progressive distillation (:mod:`dmd.methods.pd`)."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl

from dmd.generator import save_generator


class RoundReleases(pl.Callback):
    """After each round's last iteration, release that round's student (EMA weights if EMA is on)
    as a generator folder ``<folder>/<N>step`` that ``dmd.sample`` and ``dmd.evaluate`` load
    like any run's ``generator/``. ``init`` is the teacher whose network the student copies
    (its pipeline parts are saved with the student)."""

    def __init__(self, init, folder: str | Path):
        self.init, self.folder = init, Path(folder)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        finished = pl_module.finished_round()
        if finished is None:
            return
        released = pl_module.round_generator(finished)  # under FSDP a collective: every rank calls it
        if trainer.is_global_zero:
            save_generator(released, self.init, self.folder / f"{released.num_steps}step")
