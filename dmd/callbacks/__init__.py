"""Lightning callbacks of the training loop."""

from dmd.callbacks.checkpoint import IterationCheckpoint
from dmd.callbacks.evaluation import EvaluationCallback
from dmd.callbacks.rounds import RoundReleases

__all__ = ["EvaluationCallback", "IterationCheckpoint", "RoundReleases"]
