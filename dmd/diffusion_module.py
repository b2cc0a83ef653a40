"""LightningModule that trains a diffusion model (the teacher) with the denoising loss.

Class-conditional with label dropout (the null class makes classifier-free guidance possible),
AdamW with linear warmup, and an EMA of the weights (diffusers' ``EMAModel``) that is what gets
saved as the teacher.
"""

from __future__ import annotations

import copy

import pytorch_lightning as pl
import torch
from diffusers.training_utils import EMAModel

from dmd.conditioning import drop_labels
from dmd.denoisers import Denoiser
from dmd.losses import denoising_loss


class DiffusionModule(pl.LightningModule):
    def __init__(self, denoiser: Denoiser, num_classes: int = 0, label_dropout: float = 0.1,
                 lr: float = 1e-3, weight_decay: float = 0.01, warmup_steps: int = 500,
                 ema_decay: float = 0.999, grad_clip: float = 1.0):
        super().__init__()
        self.denoiser = denoiser
        self.num_classes, self.label_dropout = num_classes, label_dropout
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.grad_clip = grad_clip
        self.ema = EMAModel(self.denoiser.parameters(), decay=ema_decay, use_ema_warmup=True,
                            power=2 / 3)

    def training_step(self, batch, batch_idx):
        x0, labels = batch
        cond = None
        if self.num_classes:
            cond = drop_labels(labels, self.num_classes, self.label_dropout)
        loss = denoising_loss(self.denoiser, x0, cond)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_before_optimizer_step(self, optimizer):
        # Logged before clipping: a growing norm is the earliest sign of divergence.
        norm = torch.nn.utils.clip_grad_norm_(self.denoiser.parameters(), self.grad_clip)
        self.log("train/grad_norm", norm)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.ema.step(self.denoiser.parameters())

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.denoiser.parameters(), lr=self.lr, betas=(0.9, 0.999),
                                weight_decay=self.weight_decay)
        warmup = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: min(1.0, (step + 1) / max(1, self.warmup_steps)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint):
        self.ema.load_state_dict(checkpoint["ema"])

    def ema_denoiser(self) -> Denoiser:
        """A copy of the denoiser carrying the EMA weights (the model that gets released)."""
        ema_copy = copy.deepcopy(self.denoiser)
        self.ema.copy_to(ema_copy.parameters())
        return ema_copy
