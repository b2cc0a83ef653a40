"""``python -m dmd.train_classifier [arch=vgg|resnet|alex]``: train a Fashion-MNIST network.

The bundled ones (``dmd.metrics.features``; each command is in its ``metrics.json``):
``fmnist_classifier`` (vgg: ``fid_fmnist`` and class consistency), ``fmnist_resnet`` (the second
evaluation feature space) and ``fmnist_perceptual`` (alex: the offline regression distance, used
by no evaluator). Saves ``<run dir>/classifier/{model.safetensors,config.json,metrics.json}``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig

from dmd.metrics.features import FashionMNISTClassifier, extract
from dmd.rundir import claim_run_dir
from dmd.runs import build_trainer
from dmd.validation import validate

log = logging.getLogger(__name__)


def augment(x: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """Random horizontal flips and random shifts of up to ``pad`` pixels (per batch element)."""
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (pad,) * 4, value=-1.0)
    dx, dy = torch.randint(0, 2 * pad + 1, (2,))
    return padded[..., dy: dy + x.shape[-2], dx: dx + x.shape[-1]]


class ClassifierModule(pl.LightningModule):
    def __init__(self, net: FashionMNISTClassifier, lr: float = 3e-3, weight_decay: float = 5e-4):
        super().__init__()
        self.net, self.lr, self.weight_decay = net, lr, weight_decay

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(augment(x)), y, label_smoothing=0.1)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        acc = (self.net(x).argmax(-1) == y).float().mean()
        self.log("val/acc", acc, prog_bar=True, reduce_fx="mean")

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr,
                                                    total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def train_classifier(cfg: DictConfig) -> Path:
    validate(cfg, "train_classifier")
    with claim_run_dir(cfg, "train_classifier") as (out_dir, _):
        return _train_classifier(cfg, out_dir)


def _train_classifier(cfg: DictConfig, out_dir: Path) -> Path:
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    net = FashionMNISTClassifier(tuple(cfg.channels), cfg.feature_dim, datamodule.num_classes,
                                 arch=cfg.arch)
    module = ClassifierModule(net, cfg.lr, cfg.weight_decay)
    trainer = build_trainer(cfg, out_dir)
    trainer.fit(module, datamodule=datamodule)
    test_x, test_y = datamodule.val_set.tensors
    _, logits = extract(net.eval(), test_x)
    accuracy = (logits.argmax(-1) == test_y).float().mean().item()
    folder = net.save(out_dir / "classifier")
    record = {"test_accuracy": accuracy, "test_examples": len(test_y),
              "command": " ".join(["python -m dmd.train_classifier", *sys.argv[1:]])}
    (folder / "metrics.json").write_text(json.dumps(record, indent=2))
    log.info("Test accuracy %.4f; saved to %s", accuracy, folder)
    return folder


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_classifier")
def main(cfg: DictConfig) -> None:
    train_classifier(cfg)


if __name__ == "__main__":
    main()
