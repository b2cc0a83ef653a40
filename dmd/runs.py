"""Run-directory helpers shared by every entry point."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:  # Lightning takes seconds to import: commands that only sample never do
    import pytorch_lightning as pl

log = logging.getLogger(__name__)


def run_dir() -> Path:
    """The current Hydra run (or multirun job) directory."""
    return Path(HydraConfig.get().runtime.output_dir)


def save_resolved_config(cfg: DictConfig, out_dir: Path) -> Path:
    """Write the fully resolved config (Hydra's own ``.hydra/config.yaml`` keeps interpolations)."""
    path = Path(out_dir) / "config_resolved.yaml"
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


def require(condition: bool, message: str) -> None:
    """Fail early on a bad config value with a message that names the key and the fix."""
    if not condition:
        raise ValueError(f"Bad config: {message}")


def resolve_ckpt_path(ckpt_path: str | None, out_dir: Path) -> str | None:
    """``ckpt_path=last`` resumes from ``<run dir>/checkpoints/last.ckpt`` when it exists."""
    if ckpt_path in (None, "", "none"):
        return None
    if ckpt_path == "last":
        last = Path(out_dir) / "checkpoints" / "last.ckpt"
        old = last.with_name(last.name + ".old")  # a sharded save stopped between its two renames
        if not last.exists() and old.exists():
            log.warning("%s is missing but %s (the previous save) is whole: resuming from it.", last, old)
            last = old
        if last.exists():
            log.info("Resuming from %s", last)
            return str(last)
        log.info("ckpt_path=last but %s does not exist yet: starting fresh.", last)
        return None
    if not Path(ckpt_path).exists():  # a file, or a folder of shards (trainer=fsdp)
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist; use 'last' or a .ckpt file.")
    return ckpt_path


def build_trainer(cfg: DictConfig, out_dir: Path, callbacks=()) -> pl.Trainer:
    """Instantiate ``cfg.trainer`` with the configured logger and extra callbacks."""
    logger = instantiate(cfg.logger) if cfg.logger else False  # logger=none gives an empty node
    if logger:  # the resolved config + this run's overrides (dmd-compare --wandb groups by them)
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "overrides": job_overrides()})
    return instantiate(cfg.trainer, logger=logger, callbacks=list(callbacks),
                       default_root_dir=str(out_dir))


def job_overrides() -> list[str]:
    """The command-line overrides of this run (a multirun job's own swept values included)."""
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not under Hydra
        return []


def finish_wandb(exit_code: int = 0) -> None:
    """End the active wandb run, if any (so that multirun jobs never merge into one run)."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)
