"""The DMD / DMD2 LightningModule: alternating generator and fake-score updates.

One ``training_step`` is one iteration of DMD2's training loop (manual optimisation):

    every N-th iteration (N = TTUR ratio):  generator step on
        dm_weight * distribution-matching loss  [+ w_gan * GAN generator loss]
                                                [+ regression_weight * regression loss (DMD)]
    every iteration:                         fake-score step on
        denoising loss of detached generator samples
                                                [+ gan_discriminator_weight * GAN discriminator loss]

The real score (the teacher) is frozen. Lightning's ``global_step`` counts the steps of both
optimizers, so the module keeps its own counters (``iteration``, ``generator_steps``,
``fake_steps``), checkpoints them, and drives the TTUR cadence and the training length from
them. Every random draw comes from the module's own ``torch.Generator``, whose state is
checkpointed: a resumed run continues exactly where it stopped.

Balancing the GAN against DM (``gan_balance``): the DM loss is a mean over B*D elements, the GAN
generator loss a mean over B, so a fixed GAN weight acts more strongly as the data dimension D
grows. ``fixed``: w_gan = gan_generator_weight; ``dimension``: the weight is stated at DMD2's
ImageNet-64 dimension (``gan_reference_dim`` = 64*64*3) and rescaled, w_gan = weight * D_ref / D;
``adaptive``: the GAN's gradient with respect to the generator output is rescaled, per step, to
``gan_grad_ratio`` times the DM term's (DMD2's authors advise matching the two norms on new data).
Every generator step logs each weighted term's gradient norm with respect to the generator
output, ``grad_norm/x/{dm,gan,regression}``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from dmd.gan import DiscriminatorHead, discriminator_logits
from dmd.generator import Generator, backward_simulation_step
from dmd.losses import (
    TIMESTEP_DISTRIBUTIONS,
    denoising_loss,
    distribution_matching_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    regression_loss,
)
from dmd.regression_pairs import pair_batch
from dmd.student import StudentModule, copy_denoiser, optimized, trainable, training_rng, warmup
from dmd.teachers import Teacher

__all__ = ["DMDModule", "copy_denoiser", "optimized", "trainable", "training_rng"]

GAN_BALANCES = ("fixed", "dimension", "adaptive")
IMAGENET64_DIM = 64 * 64 * 3  # where DMD2's GAN weights were chosen


class DMDModule(StudentModule):
    """DMD (ratio 1 + regression) and DMD2 (TTUR + GAN, multi-step) in one loop.

    ``regression_pairs`` is a dict {noise, images[, labels]} from :mod:`dmd.pairs` and
    ``regression_distance`` a per-sample distance (:mod:`dmd.distances`); both are needed
    only when ``regression_weight > 0``. A GAN head is built on the fake score's bottleneck
    when either GAN weight is > 0.
    """

    has_fake_score = True

    @classmethod
    def from_config(cls, cfg, teacher, generator, fake_score, pairs, distance, **student):
        a, reg = cfg.algorithm, cfg.algorithm.regression
        return cls(
            teacher, generator, fake_score, guidance_scale=a.guidance_scale, ttur_ratio=a.ttur_ratio,
            lr_fake=cfg.optim.lr_fake, dm_weight=a.dm_weight, dm_t_range=a.dm_t_range,
            timestep_distribution=a.get("timestep_distribution", "uniform"),
            gan_generator_weight=a.gan.generator_weight,
            gan_discriminator_weight=a.gan.discriminator_weight, gan_t_range=a.gan.t_range,
            gan_balance=a.gan.balance, gan_reference_dim=a.gan.reference_dim,
            gan_grad_ratio=a.gan.grad_ratio,
            regression_weight=reg.weight, regression_pairs=pairs, regression_distance=distance,
            regression_batch_size=reg.batch_size, backward_simulation=a.backward_simulation,
            **student, **cls.method_options(a))

    @classmethod
    def method_options(cls, algorithm) -> dict:
        """Arguments of a method built on DMD2's loop beyond DMD's own (none for DMD)."""
        return {}

    def __init__(self, teacher: Teacher, generator: Generator, fake_score: nn.Module,
                 guidance_scale: float = 1.0, ttur_ratio: int = 5, lr_generator: float = 1e-5,
                 lr_fake: float = 1e-5, betas=(0.9, 0.999), weight_decay: float = 0.01,
                 warmup_steps: int = 0, grad_clip: float = 10.0, dm_weight: float = 1.0,
                 dm_t_range=(0.02, 0.98), timestep_distribution: str = "uniform",
                 gan_generator_weight: float = 0.0,
                 gan_discriminator_weight: float = 0.0, gan_t_range=(0.02, 0.98),
                 gan_balance: str = "fixed", gan_reference_dim: int = IMAGENET64_DIM,
                 gan_grad_ratio: float = 1.0,
                 regression_weight: float = 0.0, regression_pairs: dict | None = None,
                 regression_distance: nn.Module | None = None, regression_batch_size: int = 0,
                 backward_simulation: bool = True, ema_decay: float | None = None,
                 max_iterations: int | None = None, seed: int = 0, max_network_passes: int | None = None,
                 finite_check_every: int | None = None, fused: bool = False):
        super().__init__(teacher, generator, lr_generator, betas, weight_decay, warmup_steps, grad_clip,
                         ema_decay, max_iterations, seed, regression_distance, max_network_passes,
                         finite_check_every, fused)
        if ttur_ratio < 1:
            raise ValueError(f"ttur_ratio must be >= 1, got {ttur_ratio}.")
        if regression_weight > 0 and (regression_pairs is None or regression_distance is None):
            raise ValueError("regression_weight > 0 needs regression_pairs and regression_distance.")
        if regression_weight > 0 and generator.num_steps != 1:
            raise ValueError("DMD's regression loss is defined for one-step generators; "
                             "set regression_weight=0 for a multi-step generator.")
        if timestep_distribution not in TIMESTEP_DISTRIBUTIONS:
            raise ValueError(f"timestep_distribution={timestep_distribution!r}; choose one of {TIMESTEP_DISTRIBUTIONS}.")
        if gan_balance not in GAN_BALANCES:
            raise ValueError(f"gan_balance={gan_balance!r}; choose one of {GAN_BALANCES}.")
        self.fake_score = fake_score
        self.guidance_scale, self.ttur_ratio = guidance_scale, ttur_ratio
        self.lr_fake = lr_fake
        self.dm_weight, self.dm_t_range = dm_weight, tuple(dm_t_range)
        self.timestep_distribution = timestep_distribution  # of the DM and fake-score losses
        self.gan_generator_weight, self.gan_discriminator_weight = gan_generator_weight, gan_discriminator_weight
        self.gan_t_range = tuple(gan_t_range)
        self.gan_balance, self.gan_grad_ratio = gan_balance, gan_grad_ratio
        dim = int(torch.Size(teacher.sample_shape).numel())
        # The weight the GAN term gets in the loss (adaptive: 1, its gradient rescaled in backward)
        self.gan_weight = {"fixed": gan_generator_weight, "adaptive": 1.0,
                           "dimension": gan_generator_weight * gan_reference_dim / dim}[gan_balance]
        self.use_gan = gan_generator_weight > 0 or gan_discriminator_weight > 0
        self.gan_head = DiscriminatorHead.for_network(fake_score.unet) if self.use_gan else None
        self.regression_weight = regression_weight
        self.regression_pairs = regression_pairs or {}
        self.regression_batch_size = regression_batch_size
        self.backward_simulation = backward_simulation

    def other_trained_networks(self) -> list:
        head = self.gan_head.net if self.gan_head is not None else None  # its layers: FSDP wants
        return [self.fake_score, head]  # no view outputs

    def on_fit_start(self):
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.use_gan and not getattr(datamodule, "has_real_images", True):
            raise ValueError("The GAN loss needs real images, and the data has none: set data.images "
                             "(a folder) or pair images in a .jsonl prompt file, or set "
                             "algorithm.gan.generator_weight=0 algorithm.gan.discriminator_weight=0.")
        super().on_fit_start()

    def train_iteration(self, batch):
        real, cond = self.data_batch(batch)
        opt_g, opt_f = self.optimizers()
        sched_g, sched_f = self.lr_schedulers()
        logs = {}

        x = None
        if self.iteration % self.ttur_ratio == 0:
            x, gen_logs = self.generator_step(real.shape[0], cond, opt_g, sched_g)
            logs.update(gen_logs)
        logs.update(self.fake_score_step(real, cond, x, opt_f, sched_f))

        logs.update({"lr/generator": sched_g.get_last_lr()[0], "lr/fake": sched_f.get_last_lr()[0]})
        self.progress("loss_fake", logs["loss/fake"])
        self.finish_iteration(logs)
        return None

    def generator_step(self, n: int, cond, opt_g, sched_g):
        """Update the generator on the DM loss (+ GAN generator loss, + regression loss)."""
        x = self.generate(n, cond)
        norms = {}  # each weighted term's gradient w.r.t. the generator output, filled in backward
        x_dm = _watch(x, "dm", norms)
        loss_dm, logs = self.matching_loss(x_dm, cond)
        loss = self.dm_weight * loss_dm
        logs["loss/dm"] = loss_dm.detach()
        if self.gan_generator_weight > 0:
            rescale = None
            if self.gan_balance == "adaptive":  # ||g_gan|| = ratio * ||g_dm||: g_dm is known before
                g_dm = torch.autograd.grad(loss, x_dm, retain_graph=True)[0]  # backward (cheap: an MSE)
                rescale = self.gan_grad_ratio * g_dm.detach().float().norm()
            with self.discriminator_frozen():  # the GAN loss trains the generator only
                loss_gan = gan_generator_loss(self.discriminate(_watch(x, "gan", norms, rescale), cond))
            loss = loss + self.gan_weight * loss_gan
            logs["loss/gan_generator"] = loss_gan.detach()
        if self.regression_weight > 0:
            loss_reg = self.regression_term(norms)
            loss = loss + self.regression_weight * loss_reg
            logs["loss/regression"] = loss_reg.detach()
        self._check_finite(loss, "generator")
        logs["grad_norm/generator"] = self._step(opt_g, sched_g, loss)
        logs.update({f"grad_norm/x/{k}": v for k, v in norms.items()})
        if self.ema is not None:
            self.ema.step(optimized(opt_g))
        self.generator_steps += 1
        return x.detach(), logs

    def matching_loss(self, x, cond):
        """The generator's score-matching term on samples ``x``: DMD's distribution matching
        (subclasses change it, e.g. :class:`dmd.methods.sid.SiDModule`). Returns (loss, logs)."""
        return distribution_matching_loss(
            x, self.real_score, self.fake_score, cond, self.teacher.null_condition(x.shape[0], self.device),
            self.guidance_scale, t_range=self.dm_t_range, generator=self.rng,
            distribution=self.timestep_distribution)

    def fake_score_step(self, real, cond, x, opt_f, sched_f):
        """Update the fake score on generator samples (+ the GAN discriminator loss).

        On generator iterations it reuses that iteration's samples (drawn before the update),
        otherwise it draws new ones without gradients.
        """
        if x is None:
            with torch.no_grad():
                x = self.generate(real.shape[0], cond)
        loss_fake = denoising_loss(self.fake_score, x, cond, generator=self.rng,
                                   distribution=self.timestep_distribution)
        loss = loss_fake
        logs = {"loss/fake": loss_fake.detach()}
        if self.gan_discriminator_weight > 0:
            loss_d = gan_discriminator_loss(self.discriminate(real, cond), self.discriminate(x, cond))
            loss = loss + self.gan_discriminator_weight * loss_d
            logs["loss/gan_discriminator"] = loss_d.detach()
        self._check_finite(loss, "fake score")
        logs["grad_norm/fake"] = self._step(opt_f, sched_f, loss)
        self.fake_steps += 1
        return logs

    def generate(self, n: int, cond):
        """Generator samples for training: backward simulation picks the step to train."""
        noise = self.noise(n)
        if self.generator.num_steps == 1 or not self.backward_simulation:
            return self.generator(noise, cond, generator=self.rng)
        k = backward_simulation_step(self.iteration, self.generator.num_steps, self.seed)
        self.backward_simulation_trace.update(f"{self.iteration}:{k};".encode())
        return self.generator.backward_simulation(noise, cond, k, generator=self.rng)

    def discriminate(self, x, cond):
        return discriminator_logits(self.fake_score, self.gan_head, x, cond, self.gan_t_range,
                                    generator=self.rng)

    @contextlib.contextmanager
    def discriminator_frozen(self):
        """The fake score's and the head's weights out of the autograd graph: the generator's GAN
        loss then backpropagates to the sample only, not into gradients of the discriminator that
        its own step would clear. Sharded networks keep theirs (FSDP fixes which of its
        parameters take gradients when it first runs), and so do gradient-checkpointed ones (their
        blocks are recomputed in backward, when the weights take gradients again: the recomputation
        must save what the forward saved)."""
        keep = self.sharded or getattr(self.fake_score.unet, "is_gradient_checkpointing", False)
        params = [] if keep else [p for p in [*self.fake_score.parameters(), *self._head_parameters()]
                                  if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    def regression_term(self, norms: dict | None = None):
        """Regression loss on a random batch of cached teacher pairs (DMD)."""
        noise, target, cond = pair_batch(self.regression_pairs, self.regression_batch_size, self.rng, self.device)
        out = self.generator(noise, cond)
        if norms is not None:
            out = _watch(out, "regression", norms)
        return regression_loss(out, target, self.regression_distance)

    def _head_parameters(self):
        return self.gan_head.parameters() if self.gan_head is not None else []

    # -- optimisers and checkpointed state ---------------------------------------------------
    def configure_optimizers(self):
        opt_g = self.adamw(trainable(self.generator), self.lr_generator)
        # The discriminator step trains the head and the fake network's encoder with this optimizer.
        opt_f = self.adamw(trainable(self.fake_score) + list(self._head_parameters()), self.lr_fake)
        return [opt_g, opt_f], [warmup(opt_g, self.warmup_steps), warmup(opt_f, self.warmup_steps)]



def _watch(x: torch.Tensor, name: str, norms: dict, rescale: torch.Tensor | None = None) -> torch.Tensor:
    """An alias of ``x`` whose gradient in backward (one loss term's, w.r.t. the generator output)
    has its norm recorded in ``norms[name]``; with ``rescale``, the gradient is first scaled to
    that norm (the adaptive GAN weight)."""
    alias = x.view_as(x)

    def hook(grad):
        norm = grad.detach().float().norm()
        if rescale is not None:
            factor = rescale / norm.clamp_min(1e-12)
            grad, norm = grad * factor.to(grad.dtype), norm * factor
        norms[name] = norm
        return grad

    alias.register_hook(hook)
    return alias

