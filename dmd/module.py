"""The DMD / DMD2 LightningModule: alternating generator and fake-score updates.

One ``training_step`` is one iteration of DMD2's training loop (manual optimisation):

    every N-th iteration (N = TTUR ratio):   generator step on the distribution-matching loss
    every iteration:                         fake-score step on the denoising loss of
                                             detached generator samples

The real score (the teacher) is frozen. Lightning's ``global_step`` counts the steps of both
optimizers, so the module keeps its own counters (``iteration``, ``generator_steps``,
``fake_steps``), checkpoints them and drives the TTUR cadence from them.
"""

from __future__ import annotations

import copy

import pytorch_lightning as pl
import torch
from torch import nn

from dmd.generator import Generator, backward_simulation_step
from dmd.losses import denoising_loss, distribution_matching_loss
from dmd.teachers import Teacher


def _warmup(optimizer, steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, steps)))


class DMDModule(pl.LightningModule):
    def __init__(self, teacher: Teacher, generator: Generator, fake_score: nn.Module,
                 guidance_scale: float = 1.0, ttur_ratio: int = 5, lr_generator: float = 1e-5,
                 lr_fake: float = 1e-5, weight_decay: float = 0.01, warmup_steps: int = 0,
                 grad_clip: float = 10.0, backward_simulation: bool = True, seed: int = 0):
        super().__init__()
        if ttur_ratio < 1:
            raise ValueError(f"ttur_ratio must be >= 1, got {ttur_ratio}.")
        self.automatic_optimization = False
        self.teacher = teacher
        self.real_score = teacher.denoiser.requires_grad_(False).eval()
        self.generator, self.fake_score = generator, fake_score
        self.guidance_scale, self.ttur_ratio = guidance_scale, ttur_ratio
        self.lr_generator, self.lr_fake = lr_generator, lr_fake
        self.weight_decay, self.warmup_steps, self.grad_clip = weight_decay, warmup_steps, grad_clip
        self.backward_simulation, self.seed = backward_simulation, seed
        self.iteration = self.generator_steps = self.fake_steps = 0

    # -- one iteration of DMD2's loop -------------------------------------------------------
    def training_step(self, batch, batch_idx):
        _, labels = batch
        n = labels.shape[0]
        cond = labels if self.teacher.num_classes else None
        opt_g, opt_f = self.optimizers()
        sched_g, sched_f = self.lr_schedulers()
        logs = {}

        if self.iteration % self.ttur_ratio == 0:
            x = self.generate(n, cond, self.iteration)
            loss_dm, dm_logs = distribution_matching_loss(
                x, self.real_score, self.fake_score, cond,
                self.teacher.null_condition(n, self.device), self.guidance_scale)
            self._step(opt_g, sched_g, loss_dm)
            self.generator_steps += 1
            logs.update({"loss/dm": loss_dm.detach(), **dm_logs})

        with torch.no_grad():
            x = self.generate(n, cond, self.iteration)
        loss_fake = denoising_loss(self.fake_score, x.detach(), cond)
        self._step(opt_f, sched_f, loss_fake)
        self.fake_steps += 1
        self.iteration += 1

        logs.update({"loss/fake": loss_fake.detach(), "counters/generator_steps": self.generator_steps,
                     "counters/fake_steps": self.fake_steps})
        self.log_dict(logs, prog_bar=False)
        return None

    def generate(self, n: int, cond, iteration: int):
        """Generator samples for training: backward simulation picks the step to train."""
        noise = torch.randn(n, *self.teacher.sample_shape, device=self.device)
        if self.generator.num_steps == 1 or not self.backward_simulation:
            return self.generator(noise, cond)
        k = backward_simulation_step(iteration, self.generator.num_steps, self.seed)
        return self.generator.backward_simulation(noise, cond, k)

    def _step(self, optimizer, scheduler, loss):
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip,
                            gradient_clip_algorithm="norm")
        optimizer.step()
        scheduler.step()

    # -- optimisers and checkpointed state ---------------------------------------------------
    def configure_optimizers(self):
        def adamw(params, lr):
            return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=self.weight_decay)

        opt_g = adamw(self.generator.parameters(), self.lr_generator)
        opt_f = adamw(self.fake_score.parameters(), self.lr_fake)
        return [opt_g, opt_f], [_warmup(opt_g, self.warmup_steps), _warmup(opt_f, self.warmup_steps)]

    def on_save_checkpoint(self, checkpoint):
        checkpoint["dmd_counters"] = {"iteration": self.iteration,
                                      "generator_steps": self.generator_steps,
                                      "fake_steps": self.fake_steps}
        # The frozen teacher is not part of the trained state: keep it out of checkpoints.
        for key in [k for k in checkpoint["state_dict"] if k.startswith("real_score.")]:
            del checkpoint["state_dict"][key]

    def on_load_checkpoint(self, checkpoint):
        counters = checkpoint["dmd_counters"]
        self.iteration = counters["iteration"]
        self.generator_steps, self.fake_steps = counters["generator_steps"], counters["fake_steps"]
        checkpoint["state_dict"].update(
            {f"real_score.{k}": v for k, v in self.real_score.state_dict().items()})


def copy_denoiser(denoiser: nn.Module) -> nn.Module:
    """A trainable copy of the teacher's network (generator and fake score start from it)."""
    return copy.deepcopy(denoiser).requires_grad_(True).train()
