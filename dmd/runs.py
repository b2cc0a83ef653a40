"""Run-directory helpers shared by every entry point."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dmd.validation import ConfigError

if TYPE_CHECKING:  # Lightning takes seconds to import: commands that only sample never do
    import pytorch_lightning as pl

log = logging.getLogger(__name__)


def run_dir() -> Path:
    """The current Hydra run (or multirun job) directory."""
    return Path(HydraConfig.get().runtime.output_dir)


def require(condition: bool, message: str) -> None:
    """Fail early on a bad config value with a message that names the key and the fix."""
    if not condition:
        raise ConfigError(f"Bad config: {message}")


def saved_states(out_dir: Path) -> list[Path]:
    """The run dir's training saves that exist: ``last.ckpt``, then the previous whole save
    beside it (``last.ckpt.prev``; a sharded save's ``last.ckpt.old``)."""
    from dmd.callbacks.checkpoint import previous_save

    last = Path(out_dir) / "checkpoints" / "last.ckpt"
    return [c for c in (last, previous_save(last), previous_save(last, sharded=True)) if c.exists()]


def resolve_ckpt_path(ckpt_path: str | None, out_dir: Path) -> str | None:
    """``ckpt_path=last`` resumes from ``<run dir>/checkpoints/last.ckpt`` when it exists, or
    else from the previous whole save beside it (``last.ckpt.prev``; a sharded save's
    ``last.ckpt.old``) when the latest is missing or truncated. Nothing is deleted."""
    from dmd.callbacks.checkpoint import whole_checkpoint

    if ckpt_path in (None, "", "none"):
        return None
    if ckpt_path == "last":
        last = Path(out_dir) / "checkpoints" / "last.ckpt"
        existing = saved_states(out_dir)
        if not existing:
            log.info("ckpt_path=last but %s does not exist yet: starting fresh.", last)
            return None
        whole = [c for c in existing if whole_checkpoint(c)]
        if not whole:
            raise ValueError(f"{_not_whole(existing[0])} and there is no previous whole save beside "
                             f"it. {LEFT_IN_PLACE}")
        if whole[0] != last:
            log.warning("%s: resuming from %s, the previous whole save.",
                        _not_whole(last) if last.exists() else f"{last} is missing", whole[0])
        log.info("Resuming from %s", whole[0])
        return str(whole[0])
    if not Path(ckpt_path).exists():  # a file, or a folder of shards (trainer=fsdp)
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist; use 'last' or a .ckpt file.")
    if not whole_checkpoint(ckpt_path):
        raise ValueError(f"{_not_whole(Path(ckpt_path))} and cannot be resumed from. {LEFT_IN_PLACE}")
    return ckpt_path


LEFT_IN_PLACE = ("It is left in place: move it aside to start this run dir afresh, or resume from "
                 "another checkpoint with ckpt_path=<file>.")


def _not_whole(path: Path) -> str:
    if path.is_dir():
        return f"{path} is a folder but not a whole sharded checkpoint (no meta.pt)"
    size = path.stat().st_size if path.is_file() else 0
    return f"{path} is truncated or corrupt ({size} bytes: not a whole torch checkpoint)"


def build_trainer(cfg: DictConfig, out_dir: Path, callbacks=()) -> pl.Trainer:
    """Instantiate ``cfg.trainer`` with the configured logger and extra callbacks."""
    logger = instantiate(cfg.logger) if cfg.logger else False  # logger=none gives an empty node
    if logger:  # the resolved config + this run's overrides (dmd-compare --wandb groups by them)
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "overrides": job_overrides()})
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=list(callbacks),
                          default_root_dir=str(out_dir))
    from dmd.callbacks.checkpoint import AtomicCheckpointIO
    from dmd.sharding import FullyShardedStrategy

    # Single-file checkpoints are written atomically on the run dir's filesystem (sharded ones
    # are: FullyShardedStrategy swaps whole folders).
    if not isinstance(trainer.strategy, FullyShardedStrategy):
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    return trainer


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
