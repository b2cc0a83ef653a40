"""What a result was produced with: code version, packages, hardware (recorded in every results.json)."""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import os
import platform
import subprocess

import torch

from dmd import ROOT_DIR

PACKAGES = ("torch", "torchvision", "pytorch-lightning", "diffusers", "hydra-core", "torchmetrics",
            "clean-fid", "transformers", "wandb", "numpy")


def git_state(root=ROOT_DIR) -> dict:
    """The commit and whether tracked files differ from it (None outside a git checkout)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip() != ""
        return {"commit": head.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}


def package_versions(names=PACKAGES) -> dict:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def hardware() -> dict:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "gpus": gpus,
            "python": platform.python_version(), "platform": platform.platform()}


@functools.cache
def _snapshot() -> dict:
    return {"git": git_state(), "packages": package_versions(), "hardware": hardware()}


def run_provenance() -> dict:
    """{git: {commit, dirty}, packages: {...}, hardware: {...}} of this process, read once: at its
    first call (every entry point makes it when it claims its run dir, before any work), so that
    a commit made while a long job runs is not recorded as the code that job ran."""
    return copy.deepcopy(_snapshot())
