"""Score identity Distillation (Zhou et al., ICML 2024; mingyuanzhou/SiD training/sid_loss.py):
DMD2's loop (TTUR, the fake score trained on generator samples, optional GAN head) with SiD's
generator loss in place of distribution matching (:func:`dmd.losses.sid_generator_loss`, its
``alpha`` weighting; 1.2 in the paper). CFG goes to the real score only, DMD's convention: SiD-LSG
also guides the fake score (its kappa_1/kappa_2 scales), which this module does not offer.

Where it departs from the official SiD code (the defaults of conf/algorithm/sid.yaml): the generator's
t is uniform over DDPM steps in ``dm_t_range`` (SiD: uniform along the Karras rho=7 index up to
tmax; same top end, but more weight on large sigmas here), the fake score's loss is the teacher's
own denoising loss at uniform t (SiD: EDM's log-normal sigmas and weighting), the generator is
updated before the fake score on the same samples (SiD: fake score first, fresh samples each), and
multi-step students use DMD2's backward simulation, which SiD's paper does not have ("SiD + DMD2
multi-step"). SiD's code clips no gradient norm (it only zeroes non-finite gradients): fmnist_sid sets
``optim.grad_clip: null``, since the loss summed over pixels has norms far above the project's clip.
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
