"""Lightning callbacks of the training loop."""

from dmd.callbacks.checkpoint import IterationCheckpoint

__all__ = ["IterationCheckpoint"]
