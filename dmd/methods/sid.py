"""Score identity Distillation (Zhou et al., ICML 2024; mingyuanzhou/SiD training/sid_loss.py):
DMD2's loop (TTUR, the fake score trained on generator samples, optional GAN head) with SiD's
generator loss in place of distribution matching (:func:`dmd.losses.sid_generator_loss`, its
``alpha`` weighting; 1.2 in the paper). CFG, as in SiD-LSG, goes to the real score only here (the
fake score is never guided, as in DMD).
"""

from __future__ import annotations

from dmd.losses import sid_generator_loss
from dmd.module import DMDModule


class SiDModule(DMDModule):
    """DMD2's module with the score-identity generator loss (weight: ``dm_weight``)."""

    @classmethod
    def method_options(cls, algorithm) -> dict:
        return {"alpha": algorithm.sid.alpha}

    def __init__(self, *args, alpha: float = 1.2, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha = alpha

    def matching_loss(self, x, cond):
        return sid_generator_loss(
            x, self.real_score, self.fake_score, cond, self.teacher.null_condition(x.shape[0], self.device),
            self.guidance_scale, alpha=self.alpha, t_range=self.dm_t_range, generator=self.rng,
            distribution=self.timestep_distribution)
