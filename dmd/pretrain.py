"""``python -m dmd.pretrain``: train a diffusion teacher (class-conditional UNet, or a 2-D MLP).

Saves the EMA weights as a diffusers folder (``<run dir>/teacher/unet`` via
``save_pretrained`` and ``<run dir>/teacher/scheduler``) that loads exactly like a hub model.
Rerunning the same command with the same ``hydra.run.dir`` resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from dmd.denoisers import DiffusersUNetDenoiser
from dmd.diffusion_module import DiffusionModule
from dmd.draw import sample_teacher
from dmd.rundir import claim_run_dir
from dmd.runs import build_trainer, require, resolve_ckpt_path
from dmd.schedule import prediction_type_of, schedule_from_diffusers
from dmd.teachers import load_teacher
from dmd.validation import validate
from dmd.visualize import save_sample_grid

log = logging.getLogger(__name__)


def has_trained_state(folder: Path) -> bool:
    return (folder / "checkpoints").is_dir() or (folder / "teacher").is_dir()


def pretrain(cfg: DictConfig) -> Path:
    """Train, save the EMA teacher, reload it from disk and draw a sample grid."""
    validate(cfg, "pretrain")
    with claim_run_dir(cfg, "pretrain", resumable=True, started=has_trained_state) as (out_dir, _):
        return _pretrain(cfg, out_dir)


def _pretrain(cfg: DictConfig, out_dir: Path) -> Path:
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    scheduler = instantiate(cfg.noise_scheduler)
    net = instantiate(cfg.network, _convert_="all")  # plain lists: config.json must serialise
    num_classes = getattr(datamodule, "num_classes", 0)
    expected = num_classes + 1 if num_classes else None
    require((net.config.num_class_embeds or None) == expected,
            f"network.num_class_embeds must be {expected} for this data ({num_classes} classes"
            f"{' + the null class for classifier-free guidance' if num_classes else ''}), "
            f"got {net.config.num_class_embeds}.")
    denoiser = DiffusersUNetDenoiser(net, schedule_from_diffusers(scheduler), prediction_type_of(scheduler))
    module = DiffusionModule(denoiser, num_classes, cfg.label_dropout, cfg.lr, cfg.weight_decay,
                             cfg.warmup_steps, cfg.ema_decay, cfg.grad_clip)
    checkpoint = ModelCheckpoint(dirpath=out_dir / "checkpoints", save_last=True, save_top_k=0,
                                 every_n_train_steps=cfg.checkpoint_every_n_steps)
    trainer = build_trainer(cfg, out_dir, [checkpoint])
    trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg.ckpt_path, out_dir),
                weights_only=True)

    teacher_dir = out_dir / "teacher"
    module.ema_denoiser().unet.save_pretrained(teacher_dir / "unet")
    scheduler.save_pretrained(teacher_dir / "scheduler")
    provenance = {
        "command": " ".join(["python -m dmd.pretrain", *sys.argv[1:]]),
        "optimizer_steps": trainer.global_step,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    (teacher_dir / "training.json").write_text(json.dumps(provenance, indent=2))

    teacher = load_teacher(str(teacher_dir))  # round trip: what users will load
    g = cfg.grid
    samples, _ = sample_teacher(teacher, g.num_samples, g.sampler, g.steps, g.guidance_scale,
                                seed=cfg.seed)
    save_sample_grid(samples, out_dir / "samples.png")
    log.info("Saved teacher to %s", teacher_dir)
    return teacher_dir


@hydra.main(version_base="1.3", config_path="../conf", config_name="pretrain")
def main(cfg: DictConfig) -> None:
    pretrain(cfg)


if __name__ == "__main__":
    main()
