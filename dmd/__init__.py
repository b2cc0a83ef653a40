"""dmd: Distribution Matching Distillation (DMD, DMD2) with Hydra and PyTorch Lightning."""

from pathlib import Path

from omegaconf import OmegaConf

ROOT_DIR = Path(__file__).resolve().parents[1]
"""The repository root (bundled checkpoints live under ``experiments/checkpoints``)."""

# ${dmd_root:} in configs points at the repository, wherever the command is run from.
if not OmegaConf.has_resolver("dmd_root"):
    OmegaConf.register_new_resolver("dmd_root", lambda: str(ROOT_DIR))

__version__ = "0.1.0"
