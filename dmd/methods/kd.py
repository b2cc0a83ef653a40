"""Knowledge distillation (Luhman & Luhman 2021, "Knowledge distillation in iterative generative
models for improved sampling speed"): a one-step student regressed onto the teacher's ODE
solutions, noise z -> x = T(z, c), cached once (:mod:`dmd.regression_pairs`, the pairs DMD's
regression term uses). The loss is the mean distance between G(z, c) and x (L2 by default; L1 in
the paper for CIFAR-10, ``algorithm.regression.distance`` offers l2, lpips and the offline
perceptual networks). Nothing else trains: no fake score, no real score at training time.
"""

from __future__ import annotations

from torch import nn

from dmd.generator import Generator
from dmd.losses import regression_loss
from dmd.regression_pairs import pair_batch
from dmd.student import StudentModule
from dmd.teachers import Teacher


class KDModule(StudentModule):
    """One generator update per iteration on a random batch of cached teacher pairs."""

    @classmethod
    def uses_pairs(cls, algorithm) -> bool:
        return True

    @classmethod
    def from_config(cls, cfg, teacher, generator, fake_score, pairs, distance, **student):
        return cls(teacher, generator, pairs, distance, batch_size=cfg.algorithm.regression.batch_size, **student)

    def __init__(self, teacher: Teacher, generator: Generator, pairs: dict, distance: nn.Module,
                 batch_size: int = 64, **student):
        super().__init__(teacher, generator, regression_distance=distance, **student)
        if generator.num_steps != 1:
            raise ValueError("Knowledge distillation trains a one-step student on (noise, teacher "
                             "sample) pairs: set algorithm.generator_timesteps to one timestep.")
        self.pairs, self.batch_size = pairs, batch_size

    def train_iteration(self, batch):
        noise, target, cond = pair_batch(self.pairs, self.batch_size, self.rng, self.device)
        loss = regression_loss(self.generator(noise, cond), target, self.regression_distance)
        self.finish_iteration(self.generator_update(loss, "regression"))
        return None
