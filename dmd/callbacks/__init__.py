"""Lightning callbacks of the training loop."""

from dmd.callbacks.checkpoint import FinalCheckpoint

__all__ = ["FinalCheckpoint"]
