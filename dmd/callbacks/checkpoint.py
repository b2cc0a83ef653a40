"""Checkpoints keyed on DMD iterations, not Lightning steps.

Lightning's ``global_step`` advances by 2 on generator iterations (two optimizers), so
``ModelCheckpoint(every_n_train_steps=N)`` would skip some multiples of N and drift from the
training's own clock. :class:`IterationCheckpoint` saves ``last.ckpt`` every N iterations and at
the iteration where ``max_iterations`` stops training, from inside the loop: counters, RNG,
optimizer and data-loader position are those of that moment, so a rerun continues batch for
batch. (A checkpoint written after ``trainer.fit`` returns would record the epoch as finished.)

:class:`AtomicCheckpointIO` writes every single-file checkpoint on the run dir's own filesystem:
a temporary sibling, flushed to disk, then renamed over the target, the previous whole save kept
as ``<name>.prev``. (Lightning's own writer stages the file in ``$TMPDIR`` and copies it over the
target when the run dir is on another filesystem: a kill during that copy truncates the only
checkpoint.) :func:`whole_checkpoint` tells a complete file from a truncated one without loading it.
"""

from __future__ import annotations

import glob
import os
import shutil
import zipfile
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from dmd.files import atomic_path, temporary_sibling

PREVIOUS_SUFFIX = ".prev"  # AtomicCheckpointIO's previous file
SHARDED_PREVIOUS_SUFFIX = ".old"  # FullyShardedStrategy's previous folder, while it swaps in a new one


def whole_checkpoint(path: str | Path) -> bool:
    """A folder of shards (Lightning writes its ``meta.pt`` last), or a file whose zip directory
    (written last by ``torch.save``) is intact."""
    path = Path(path)
    return (path / "meta.pt").is_file() if path.is_dir() else path.is_file() and zipfile.is_zipfile(path)


def checkpoint_iteration(path: str | Path | None) -> int | None:
    """The DMD iteration a ``dmd.train`` checkpoint file was saved at (None: no file, or shards)."""
    if path is None or not Path(path).is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return state.get("dmd_counters", {}).get("iteration")


def previous_save(path: str | Path, sharded: bool = False) -> Path:
    """Where the save before ``path``'s latest is kept: by :class:`AtomicCheckpointIO` (a file),
    or by ``dmd.sharding.FullyShardedStrategy`` while it replaces a folder of shards."""
    path = Path(path)
    return path.with_name(path.name + (SHARDED_PREVIOUS_SUFFIX if sharded else PREVIOUS_SUFFIX))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO (``Trainer(plugins=[...])``) with atomic same-filesystem saves."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options.")
        path = Path(path)
        with atomic_path(path) as tmp:  # a sibling: the rename below never crosses filesystems
            try:
                with open(tmp, "wb") as f:
                    torch.save(checkpoint, f)
                    f.flush()
                    os.fsync(f.fileno())
            except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError
                free = shutil.disk_usage(path.parent).free
                raise OSError(f"Writing the checkpoint {path} failed ({str(err).splitlines()[0][:200]}); its "
                              f"filesystem has {free / 2**20:.1f} MiB free. The previous save is intact: "
                              "free space and rerun the same command to resume from it.") from err
            if whole_checkpoint(path):  # a truncated file (an older writer's) never displaces a good one
                os.replace(path, previous_save(path))
        _fsync_dir(path.parent)
        _remove_dead_writers_temporaries(path)


def _remove_dead_writers_temporaries(path: Path) -> None:
    """Delete the half-written temporaries of killed saves of ``path`` by processes of this host."""
    prefix = temporary_sibling(path).name.rsplit("-", 1)[0] + "-"  # <name>.tmp-<host>-
    for tmp in path.parent.glob(glob.escape(prefix) + "*"):
        pid = tmp.name[len(prefix):]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    # The renames themselves reach the disk (POSIX; a no-op where directories cannot be opened).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class IterationCheckpoint(pl.Callback):
    def __init__(self, dirpath: str, every_n_iterations: int = 500, filename: str = "last.ckpt"):
        if every_n_iterations < 1:
            raise ValueError(f"every_n_iterations must be >= 1, got {every_n_iterations}.")
        self.path = Path(dirpath) / filename
        self.every_n_iterations = every_n_iterations

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        it = pl_module.iteration
        limit = getattr(pl_module, "max_iterations", None)
        if it % self.every_n_iterations == 0 or (limit and it == limit) or getattr(pl_module, "budget_spent", False):
            trainer.save_checkpoint(self.path, weights_only=False)  # the full training state
