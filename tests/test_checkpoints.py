"""Checkpoints that a kill cannot destroy: atomic saves on the run dir's own filesystem, and
resumes that fall back to the previous whole save (or say exactly what is wrong)."""

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli
from safetensors.torch import load_file

from dmd.callbacks.checkpoint import AtomicCheckpointIO, previous_save, whole_checkpoint
from dmd.runs import resolve_ckpt_path

TINY_GMM = ["experiment=gmm_dmd2", "data.num_samples=256", "data.batch_size=32", "eval.num_samples=200",
            "logger=none", "trainer.enable_progress_bar=false", "callbacks.checkpoint.every_n_iterations=1"]

# Runs dmd.train with torch.save patched: the KILL_AT-th checkpoint written to a file gets only
# KILL_FRACTION of its bytes, then the process kills itself (SIGKILL: no cleanup runs).
KILLING_TRAIN = """
import io, os, runpy, signal, sys, torch
real, count = torch.save, [0]
def save(obj, f, *args, **kwargs):
    if not isinstance(f, io.BytesIO) and hasattr(f, "write"):
        count[0] += 1
        if count[0] == int(os.environ["KILL_AT"]):
            buf = io.BytesIO()
            real(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            f.write(data[: int(len(data) * float(os.environ["KILL_FRACTION"]))])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    return real(obj, f, *args, **kwargs)
torch.save = save
sys.argv = ["dmd.train", *sys.argv[1:]]
runpy.run_module("dmd.train", run_name="__main__")
"""


def _other_filesystem_dir(tmp_path: Path) -> Path:
    """A folder on another filesystem than $TMPDIR's (RAM-backed /dev/shm) where there is one."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and os.stat(shm).st_dev != os.stat(tmp_path).st_dev:
        return shm / f"dmd-test-{uuid.uuid4().hex}"
    return tmp_path / "other"


@pytest.mark.slow
@pytest.mark.parametrize("kill_at,fraction", [(1, 0.05), (3, 0.5), (6, 0.95)])
def test_a_kill_during_a_save_leaves_a_whole_checkpoint_and_the_resume_is_exact(tmp_path, kill_at, fraction):
    straight = tmp_path / "straight"
    run_cli("dmd.train", *TINY_GMM, "max_iterations=9", f"hydra.run.dir={straight}")
    run = _other_filesystem_dir(tmp_path) / "run"
    try:
        env = {**os.environ, "KILL_AT": str(kill_at), "KILL_FRACTION": str(fraction), "WANDB_MODE": "offline"}
        killed = subprocess.run([sys.executable, "-c", KILLING_TRAIN, *TINY_GMM, "max_iterations=9",
                                 f"hydra.run.dir={run}"], cwd=ROOT, env=env, capture_output=True, timeout=600)
        assert killed.returncode == -9, killed.stderr.decode()[-2000:]
        last = run / "checkpoints" / "last.ckpt"
        if kill_at > 1:  # the save before the killed one is whole, in place
            assert whole_checkpoint(last)
            assert torch.load(last, weights_only=True)["dmd_counters"]["iteration"] == kill_at - 1
        else:  # killed during the first save: nothing to resume from but nothing half-written either
            assert not last.exists()
        # The resume continues to the same weights as the uninterrupted run, and removes the
        # killed save's temporary.
        assert list((run / "checkpoints").glob("last.ckpt.tmp-*"))
        run_cli("dmd.train", *TINY_GMM, "max_iterations=9", f"hydra.run.dir={run}")
        assert not list((run / "checkpoints").glob("last.ckpt.tmp-*"))
        a = load_file(straight / "generator" / "unet" / "diffusion_pytorch_model.safetensors")
        b = load_file(run / "generator" / "unet" / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    finally:
        shutil.rmtree(run.parent, ignore_errors=True)


def _save(io, path, value):
    io.save_checkpoint({"value": torch.tensor(value)}, path)


def test_saves_replace_the_checkpoint_atomically_and_keep_the_previous_one(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    _save(io, path, 1)
    _save(io, path, 2)
    assert torch.load(path, weights_only=True)["value"] == 2
    assert torch.load(previous_save(path), weights_only=True)["value"] == 1

    def fails_midway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", fails_midway)
    with pytest.raises(OSError, match=r"Writing the checkpoint .*last.ckpt failed \(\[Errno 28\] No space left on "
                                      r"device\); its filesystem has [\d.]+ MiB free. The previous save is intact"):
        _save(io, path, 3)
    assert torch.load(path, weights_only=True)["value"] == 2  # untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt", "last.ckpt.prev"]  # no temporary left


def test_a_truncated_last_checkpoint_falls_back_to_the_previous_save_or_is_named(tmp_path):
    ckpts = tmp_path / "checkpoints"
    io = AtomicCheckpointIO()
    _save(io, ckpts / "last.ckpt", 1)
    _save(io, ckpts / "last.ckpt", 2)
    whole = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(whole[: len(whole) // 2])  # e.g. written in place by another tool
    assert resolve_ckpt_path("last", tmp_path) == str(ckpts / "last.ckpt.prev")
    _save(io, ckpts / "last.ckpt", 3)  # the next save replaces the truncated file, keeps the good one
    assert torch.load(ckpts / "last.ckpt.prev", weights_only=True)["value"] == 1

    (ckpts / "last.ckpt").write_bytes(b"")
    (ckpts / "last.ckpt.prev").write_bytes(whole[:100])
    with pytest.raises(ValueError, match=r"last.ckpt is truncated or corrupt \(0 bytes.*no previous whole save"):
        resolve_ckpt_path("last", tmp_path)
    with pytest.raises(ValueError, match=r"last.ckpt.prev is truncated or corrupt \(100 bytes"):
        resolve_ckpt_path(str(ckpts / "last.ckpt.prev"), tmp_path)
    assert (ckpts / "last.ckpt").exists() and (ckpts / "last.ckpt.prev").exists()  # nothing deleted


def test_a_folder_that_is_not_a_sharded_checkpoint_is_named(tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(ValueError, match="notes is a folder but not a whole sharded checkpoint"):
        resolve_ckpt_path(str(tmp_path / "notes"), tmp_path)
