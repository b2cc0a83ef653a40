"""Metrics: feature extractors, FID/KID against cached references, CLIP score, class
consistency (:class:`Evaluator`), and the 2-D mixture oracle (:class:`MixtureEvaluator`)."""

from dmd.metrics.evaluator import Evaluator
from dmd.metrics.mixture import MixtureEvaluator

__all__ = ["Evaluator", "MixtureEvaluator"]
