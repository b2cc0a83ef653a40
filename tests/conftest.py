"""Shared helpers: run entry points as a user would (subprocess) and build tiny models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(module: str, *overrides: str, cwd: Path | None = None, check: bool = True,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m <module> <overrides>`` and return the finished process."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", module, *overrides], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(overrides)} failed:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def tiny_unet_kwargs():
    """A class-conditional UNet2DModel small enough to run a step in milliseconds."""
    return dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                attention_head_dim=8, num_class_embeds=3)
