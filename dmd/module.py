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

import copy
import hashlib

import pytorch_lightning as pl
import torch
from diffusers.training_utils import EMAModel
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
from dmd.sharding import (
    full_state_dict,
    gather_to_cpu,
    is_sharded,
    materialize,
    meta_copy,
    shard_like,
    shard_networks,
    whole,
)
from dmd.streams import stream_seed
from dmd.teachers import Teacher

RANK_SEED_STRIDE = 1_000_003
GAN_BALANCES = ("fixed", "dimension", "adaptive")
IMAGENET64_DIM = 64 * 64 * 3  # where DMD2's GAN weights were chosen


def training_rng(seed: int, rank: int = 0) -> torch.Generator:
    """The module's random stream on one rank: noise, timesteps and regression batches."""
    return torch.Generator().manual_seed(stream_seed("training", seed + RANK_SEED_STRIDE * rank))


def _warmup(optimizer, steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, steps)))


def _grad_norm(parameters) -> torch.Tensor:
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    return whole(torch.nn.utils.get_total_norm(grads))  # sharded grads: one all-reduce


class DMDModule(pl.LightningModule):
    """DMD (ratio 1 + regression) and DMD2 (TTUR + GAN, multi-step) in one loop.

    ``regression_pairs`` is a dict {noise, images[, labels]} from :mod:`dmd.pairs` and
    ``regression_distance`` a per-sample distance (:mod:`dmd.distances`); both are needed
    only when ``regression_weight > 0``. A GAN head is built on the fake score's bottleneck
    when either GAN weight is > 0.
    """

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
                 max_iterations: int | None = None, seed: int = 0):
        super().__init__()
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
        self.automatic_optimization = False
        self.teacher = teacher
        self.real_score = teacher.denoiser.requires_grad_(False).eval()
        self.generator, self.fake_score = generator, fake_score
        self.guidance_scale, self.ttur_ratio = guidance_scale, ttur_ratio
        self.lr_generator, self.lr_fake, self.betas = lr_generator, lr_fake, tuple(betas)
        self.weight_decay, self.warmup_steps, self.grad_clip = weight_decay, warmup_steps, grad_clip
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
        self.regression_weight, self.regression_distance = regression_weight, regression_distance
        self.regression_pairs = regression_pairs or {}
        self.regression_batch_size = regression_batch_size
        if isinstance(regression_distance, nn.Module):
            regression_distance.requires_grad_(False)
        self.backward_simulation, self.seed = backward_simulation, seed
        self.max_iterations = max_iterations
        # Only trained weights (all of them, or the LoRA adapters) are optimised and averaged.
        self.ema_decay = ema_decay
        self.ema = EMAModel(trainable(generator), decay=ema_decay) if ema_decay else None
        self._release_template: list[nn.Module] = []  # FSDP: the generator's shape, weightless
        self.rng = training_rng(seed)
        self.iteration = self.generator_steps = self.fake_steps = 0
        # (iteration, step) pairs backward simulation trained, hashed: ranks compare it (train.py)
        self.backward_simulation_trace = hashlib.sha256()

    def setup(self, stage: str) -> None:
        # Each rank draws its own noise and timesteps (rank 0: the single-process stream), before
        # a resumed checkpoint restores every rank's own state. The backward-simulation step
        # stays a function of (iteration, seed): the same on every rank.
        self.rng = training_rng(self.seed, self.global_rank)

    def configure_model(self) -> None:
        # Under trainer=fsdp (dmd.sharding.FullyShardedStrategy) Lightning gives the module a
        # device mesh: shard the trained networks. The frozen real score stays whole on every
        # rank (rank 0 alone samples the teacher for evaluation references).
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None or is_sharded(self.generator):
            return
        self._release_template[:] = [meta_copy(self.generator)]
        head = self.gan_head.net if self.gan_head is not None else None  # its layers: FSDP wants
        shard_networks([self.generator.denoiser, self.fake_score, head], mesh["data_parallel"])  # no view outputs
        if self.ema is not None:  # average the shards each rank holds
            self.ema = EMAModel(trainable(self.generator), decay=self.ema_decay)

    @property
    def sharded(self) -> bool:
        return is_sharded(self.generator)

    def on_fit_start(self):
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.use_gan and not getattr(datamodule, "has_real_images", True):
            raise ValueError("The GAN loss needs real images, and the data has none: set data.images "
                             "(a folder) or pair images in a .jsonl prompt file, or set "
                             "algorithm.gan.generator_weight=0 algorithm.gan.discriminator_weight=0.")
        if self.ema is not None:  # EMAModel keeps its own copies: follow the module's device
            self.ema.to(self.device)

    # -- one iteration of DMD2's loop -------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx):
        # A run resumed at (or beyond) its length does no further update.
        if self.max_iterations and self.iteration >= self.max_iterations:
            self.trainer.should_stop = True
            return -1
        return None

    def training_step(self, batch, batch_idx):
        real, labels = batch
        if tuple(real.shape[1:]) != tuple(self.teacher.sample_shape):
            raise ValueError(f"The data's samples have shape {tuple(real.shape[1:])}, the teacher's "
                             f"{tuple(self.teacher.sample_shape)}: match the data's resolution "
                             "(e.g. data.image_size) to the teacher's.")
        cond = self.teacher.condition(labels)  # class labels, text embeddings or None
        opt_g, opt_f = self.optimizers()
        sched_g, sched_f = self.lr_schedulers()
        logs = {}

        x = None
        if self.iteration % self.ttur_ratio == 0:
            x, gen_logs = self.generator_step(real.shape[0], cond, opt_g, sched_g)
            logs.update(gen_logs)
        logs.update(self.fake_score_step(real, cond, x, opt_f, sched_f))

        self.iteration += 1
        logs.update({"counters/iteration": float(self.iteration),
                     "counters/generator_steps": float(self.generator_steps),
                     "counters/fake_steps": float(self.fake_steps),
                     "lr/generator": sched_g.get_last_lr()[0], "lr/fake": sched_f.get_last_lr()[0]})
        self.log_dict(logs, prog_bar=False)
        self.log("loss_fake", logs["loss/fake"], prog_bar=True, logger=False)
        if self.max_iterations and self.iteration >= self.max_iterations:
            self.trainer.should_stop = True
        return None

    def generator_step(self, n: int, cond, opt_g, sched_g):
        """Update the generator on the DM loss (+ GAN generator loss, + regression loss)."""
        x = self.generate(n, cond)
        norms = {}  # each weighted term's gradient w.r.t. the generator output, filled in backward
        x_dm = _watch(x, "dm", norms)
        loss_dm, logs = distribution_matching_loss(
            x_dm, self.real_score, self.fake_score, cond, self.teacher.null_condition(n, self.device),
            self.guidance_scale, t_range=self.dm_t_range, generator=self.rng,
            distribution=self.timestep_distribution)
        loss = self.dm_weight * loss_dm
        logs["loss/dm"] = loss_dm.detach()
        if self.gan_generator_weight > 0:
            rescale = None
            if self.gan_balance == "adaptive":  # ||g_gan|| = ratio * ||g_dm||: g_dm is known before
                g_dm = torch.autograd.grad(loss, x_dm, retain_graph=True)[0]  # backward (cheap: an MSE)
                rescale = self.gan_grad_ratio * g_dm.detach().float().norm()
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

    def regression_term(self, norms: dict | None = None):
        """Regression loss on a random batch of cached teacher pairs (DMD)."""
        pairs = self.regression_pairs
        idx = torch.randint(pairs["noise"].shape[0], (self.regression_batch_size,), generator=self.rng)
        noise, target = pairs["noise"][idx].to(self.device), pairs["images"][idx].to(self.device)
        cond = pairs["labels"][idx].to(self.device) if "labels" in pairs else None
        out = self.generator(noise, cond)
        if norms is not None:
            out = _watch(out, "regression", norms)
        return regression_loss(out, target, self.regression_distance)

    def noise(self, n: int):
        """Pure noise z ~ N(0, I) from the module's random stream."""
        return torch.randn(n, *self.teacher.sample_shape, generator=self.rng).to(self.device)

    def _head_parameters(self):
        return self.gan_head.parameters() if self.gan_head is not None else []

    def _check_finite(self, loss, which: str):
        # Every rank learns of a non-finite loss on any rank (no rank left waiting in an all-reduce).
        if self.trainer.strategy.reduce_boolean_decision(not torch.isfinite(loss).item(), all=False):
            raise FloatingPointError(
                f"Non-finite {which} loss (this rank: {loss.item()}) at iteration {self.iteration}. Training "
                "stopped before this update; <run dir>/checkpoints/last.ckpt (the last periodic "
                "save) is a good state to resume from. Lower optim.lr_generator / optim.lr_fake or "
                "raise optim.warmup_steps.")

    def _step(self, optimizer, scheduler, loss):
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        norm = _grad_norm(optimized(optimizer))  # logged before clipping: growth is the first sign of trouble
        self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        optimizer.step()
        scheduler.step()
        return norm

    # -- optimisers and checkpointed state ---------------------------------------------------
    def configure_optimizers(self):
        def adamw(params, lr):
            return torch.optim.AdamW(params, lr=lr, betas=self.betas, weight_decay=self.weight_decay)

        opt_g = adamw(trainable(self.generator), self.lr_generator)
        # The discriminator step trains the head and the fake network's encoder with this optimizer.
        opt_f = adamw(trainable(self.fake_score) + list(self._head_parameters()), self.lr_fake)
        return [opt_g, opt_f], [_warmup(opt_g, self.warmup_steps), _warmup(opt_f, self.warmup_steps)]

    def on_save_checkpoint(self, checkpoint):
        checkpoint["dmd_counters"] = {"iteration": self.iteration,
                                      "generator_steps": self.generator_steps,
                                      "fake_steps": self.fake_steps}
        # Every rank's stream (collective: all ranks save together, rank 0 writes the file).
        gathered = self.all_gather(self.rng.get_state().to(self.device)).reshape(self.trainer.world_size, -1)
        checkpoint["dmd_rng_states"] = [state.clone() for state in gathered.cpu()]  # own storage each
        if self.ema is not None:  # whole, on rank 0 (it writes the file); sharded: every rank gathers
            ema = self.ema.state_dict()
            checkpoint["generator_ema"] = {**ema, "shadow_params": gather_to_cpu(
                ema["shadow_params"], keep=self.global_rank == 0)}
        if self.sharded:  # the strategy saves and reloads the whole module strictly, frozen parts too
            return
        # The frozen teacher and the regression distance's network are not trained state.
        frozen = ("real_score.", "regression_distance.")
        for key in [k for k in checkpoint["state_dict"] if k.startswith(frozen)]:
            del checkpoint["state_dict"][key]

    def on_load_checkpoint(self, checkpoint):
        if "dmd_counters" not in checkpoint:
            raise ValueError("This checkpoint was not written by dmd.train (no DMD counters): "
                             "point ckpt_path at a dmd.train run's checkpoints/last.ckpt.")
        if (self.ema is not None) != ("generator_ema" in checkpoint):
            raise ValueError("algorithm.ema_decay must match the run being resumed (EMA was "
                             f"{'on' if 'generator_ema' in checkpoint else 'off'} there).")
        counters = checkpoint["dmd_counters"]
        self.iteration = counters["iteration"]
        self.generator_steps, self.fake_steps = counters["generator_steps"], counters["fake_steps"]
        states = checkpoint.get("dmd_rng_states") or [checkpoint["dmd_rng_state"]]  # older: one rank
        if len(states) != self.trainer.world_size:
            raise ValueError(f"This checkpoint was written by {len(states)} process(es), this run has "
                             f"{self.trainer.world_size}: resume with the same number of devices x nodes.")
        self.rng.set_state(states[self.global_rank].clone())  # a view into a shared storage crashes it
        if self.ema is not None:
            self.ema.load_state_dict(checkpoint["generator_ema"])
            self.ema.shadow_params = shard_like(self.ema.shadow_params, trainable(self.generator))
        if self.sharded:  # the strategy has loaded the module's weights itself
            return
        state = checkpoint["state_dict"]
        self._check_matches(state, checkpoint)
        state.update({f"real_score.{k}": v for k, v in self.real_score.state_dict().items()})
        if isinstance(self.regression_distance, nn.Module):
            state.update({f"regression_distance.{k}": v
                          for k, v in self.regression_distance.state_dict().items()})

    def _check_matches(self, state: dict, checkpoint: dict) -> None:
        """Refuse, in one sentence, a checkpoint of other networks (another preset's run)."""
        frozen = ("real_score.", "regression_distance.")
        mine = {k: tuple(v.shape) for k, v in self.state_dict().items() if not k.startswith(frozen)}
        theirs = {k: tuple(v.shape) for k, v in state.items() if not k.startswith(frozen)}
        differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        if differ:
            k = differ[0]
            raise ValueError(
                f"This checkpoint holds other networks than this run builds ({len(differ)} of "
                f"{len(mine)} weights differ, e.g. {k}: {theirs.get(k, 'missing')} in the checkpoint, "
                f"{mine.get(k, 'missing')} here): it was written by a run of another preset or "
                "network. Resume it with its own command, or point ckpt_path elsewhere.")

    def release_generator(self) -> Generator | None:
        """A copy of the generator with the EMA weights if EMA is on (the model to release), on
        rank 0; None on the other ranks. Collective: under FSDP every rank must call it (the
        shards are gathered to rank 0)."""
        if self.sharded:
            return self._gather_generator()
        if self.global_rank != 0:
            return None
        released = copy.deepcopy(self.generator)
        if self.ema is not None:
            self.ema.copy_to(trainable(released))
        return released.eval()

    def _gather_generator(self) -> Generator | None:
        state = full_state_dict(self.generator)
        if self.ema is not None:
            names = [n for n, p in self.generator.named_parameters() if p.requires_grad]
            averaged = gather_to_cpu(self.ema.shadow_params, keep=self.global_rank == 0)
            state.update(zip(names, averaged))
        if self.global_rank != 0:
            return None
        return materialize(self._release_template[0], state).to(self.device).eval()


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


def optimized(optimizer) -> list[nn.Parameter]:
    """The parameters an optimizer updates (under FSDP: the shards, whatever state the module's
    forward has left its parameter attributes in)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """The parameters that train (all of a fully fine-tuned network; the adapters of a LoRA one)."""
    return [p for p in module.parameters() if p.requires_grad]


def copy_denoiser(denoiser: nn.Module) -> nn.Module:
    """A trainable copy of a network (generator and fake score start from the teacher's, or from
    its float32 reload when the teacher is kept in half precision: see ``train.student_init``)."""
    return copy.deepcopy(denoiser).requires_grad_(True).train()
