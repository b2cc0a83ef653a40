"""Writes that never leave half a file: write a temporary sibling, then rename over the target
(a crash or a parallel job sees the old file or the new one, never a truncated one)."""

from __future__ import annotations

import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path


def temporary_sibling(path: Path) -> Path:
    """A name beside ``path`` that no other process uses (unique on shared filesystems too)."""
    return path.with_name(path.name + f".tmp-{socket.gethostname()}-{os.getpid()}")


@contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary path beside ``path``; renamed onto ``path`` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def replace_folder(new: Path, path: Path, old: Path) -> None:
    """Put the complete folder ``new`` at ``path``; what was there moves to ``old`` and is
    removed last (a crash leaves the previous folder whole at ``path`` or at ``old``, never a
    mix of old and new files)."""
    import shutil

    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_folder(path: str | Path):
    """Yields a temporary folder beside ``path``; it replaces ``path`` whole when the block
    succeeds (:func:`replace_folder`), and is removed when it fails."""
    import shutil

    path = Path(path)
    tmp = temporary_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_folder(tmp, path, path.with_name(path.name + ".old"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_safetensors(tensors: dict, path: str | Path) -> None:
    """safetensors ``save_file``, atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, tmp)


def save_arrays(chunks, folder: str | Path, what: str = "rows") -> Path:
    """Write a stream of ``{name: tensor}`` batches as one raw row-major file per name (rows of
    all batches in order) + ``arrays.json`` (dtypes, shapes), holding one batch in memory at a
    time. Written into a temporary folder renamed when complete (a folder another process
    completed first is kept; an empty stream is an error naming ``what``). Read back with
    :func:`load_arrays`."""
    import json
    import shutil

    folder = Path(folder)
    tmp = temporary_sibling(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta: dict = {}
    try:
        for chunk in chunks:
            for name, tensor in chunk.items():
                array = tensor.detach().cpu().contiguous().numpy()
                with open(tmp / f"{name}.bin", "ab") as f:
                    array.tofile(f)
                seen = meta.get(name, {"dtype": array.dtype.str, "shape": [0, *array.shape[1:]]})
                if seen["dtype"] != array.dtype.str or seen["shape"][1:] != list(array.shape[1:]):
                    raise ValueError(f"{name}: a batch of {array.dtype} rows {tuple(array.shape[1:])} "
                                     f"after {seen['dtype']} rows {tuple(seen['shape'][1:])}.")
                meta[name] = {"dtype": array.dtype.str, "shape": [seen["shape"][0] + array.shape[0], *array.shape[1:]]}
        if not meta:
            raise ValueError(f"No {what} to cache at {folder}.")
        (tmp / "arrays.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, folder)
        except OSError:  # completed meanwhile by another process: same content
            if not (folder / "arrays.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_arrays(folder: str | Path) -> dict:
    """The tensors of :func:`save_arrays`, memory-mapped: rows are read from disk when indexed,
    and processes reading the same folder share the pages (no copy per rank or worker)."""
    import json

    import numpy as np
    import torch

    folder = Path(folder)
    meta = json.loads((folder / "arrays.json").read_text())
    return {name: torch.from_numpy(np.memmap(folder / f"{name}.bin", dtype=np.dtype(m["dtype"]), mode="c",
                                             shape=tuple(m["shape"])))
            for name, m in meta.items()}


def read_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def update_results(path: Path, **entries) -> dict:
    """Merge keys into a run's results.json (created if missing) and return its content."""
    return write_results(path, {**read_results(path), **entries})


def write_results(path: Path, results: dict) -> dict:
    """Write results.json through a temporary file and a rename (never half a file)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    return results
