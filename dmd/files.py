"""Writes that never leave half a file: write a temporary sibling, then rename over the target
(a crash or a parallel job sees the old file or the new one, never a truncated one)."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary path beside ``path``; renamed onto ``path`` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{socket.gethostname()}-{os.getpid()}")  # unique on shared filesystems
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_safetensors(tensors: dict, path: str | Path) -> None:
    """safetensors ``save_file``, atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, tmp)
