"""Lightning callbacks of the training loop."""

from dmd.callbacks.checkpoint import IterationCheckpoint
from dmd.callbacks.evaluation import EvaluationCallback

__all__ = ["EvaluationCallback", "IterationCheckpoint"]
