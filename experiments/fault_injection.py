"""Fault injection: does any kill, full disk or concurrent start lose a checkpoint or leave a
record that says something that did not happen?

    python experiments/fault_injection.py [--trials 24] [--seed 0]

Each trial trains the tiny 2-D preset (``gmm_dmd2``, ITERATIONS iterations, a checkpoint every
EVERY) into a fresh run dir, injects one fault, then reruns the same command until the run
completes (at most 3 reruns). The faults, in turn:

* ``kill-training``: SIGKILL at a random moment of the run (a random time after a random number
  of saves; same filesystem as $TMPDIR, or another one: /dev/shm), then resume;
* ``kill-saving``: SIGKILL in the middle of writing a random checkpoint, a random fraction of
  its bytes written (torch.save patched in the child), same or other filesystem;
* ``full-disk``: the run dir on a small tmpfs that fills up during training (or, where mounting
  is not allowed, a file-size limit that makes large writes fail); then space is freed and the
  run resumed;
* ``concurrent``: two identical trainings started into one dir at once.

Every completed save is journaled by the child (outside the run dir). A trial counts

* a lost checkpoint when a rerun resumes (results.json ``resumes``) from an earlier iteration
  than the last save that completed before it (or starts afresh although one had completed);
* a wrong record when the final results.json is not ``completed`` at ITERATIONS iterations, the
  released generator differs
  from an uninterrupted run's (resumes are exact), a temporary file is left behind, or a
  concurrent start was not refused.

Writes ``experiments/results/fault_injection.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ITERATIONS, EVERY = 40, 4
COMMAND = ["experiment=gmm_dmd2", f"max_iterations={ITERATIONS}", "data.num_samples=256", "data.batch_size=32",
           "eval.num_samples=200", "eval.every_n_generator_steps=1000", "logger=none",
           "trainer.enable_progress_bar=false", f"callbacks.checkpoint.every_n_iterations={EVERY}"]
FAULTS = ["kill-training", "kill-saving", "full-disk", "concurrent"]

# The child: dmd.train with every completed checkpoint save journaled (iteration per line) and,
# when asked, a SIGKILL in the middle of the KILL_AT-th save or a file-size limit.
CHILD = """
import io, os, resource, runpy, signal, sys, torch
from dmd.callbacks import checkpoint as ckpt
if os.environ.get("FSIZE_LIMIT"):
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(os.environ["FSIZE_LIMIT"]),) * 2)
real_save, saves = torch.save, [0]
def save(obj, f, *args, **kwargs):
    if not isinstance(f, io.BytesIO) and hasattr(f, "write"):
        saves[0] += 1
        if saves[0] == int(os.environ.get("KILL_AT", 0)):
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            f.write(data[: int(len(data) * float(os.environ["KILL_FRACTION"]))])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
real_write = ckpt.AtomicCheckpointIO.save_checkpoint
def journaled(self, checkpoint, path, storage_options=None):
    real_write(self, checkpoint, path, storage_options)
    with open(os.environ["JOURNAL"], "a") as j:
        j.write(f"{checkpoint['dmd_counters']['iteration']}\\n")
ckpt.AtomicCheckpointIO.save_checkpoint = journaled
sys.argv = ["dmd.train", *sys.argv[1:]]
runpy.run_module("dmd.train", run_name="__main__")
"""


def start(run: Path, journal: Path, **env) -> subprocess.Popen:
    environ = {**os.environ, "JOURNAL": str(journal), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
               **{k: str(v) for k, v in env.items()}}
    return subprocess.Popen([sys.executable, "-c", CHILD, *COMMAND, f"hydra.run.dir={run}"], cwd=ROOT,
                            env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=900)
    return proc.returncode, err


def journaled(journal: Path) -> list[int]:
    return [int(x) for x in journal.read_text().split()] if journal.is_file() else []


def generator_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    path = run / "generator" / "unet" / "diffusion_pytorch_model.safetensors"
    return load_file(path) if path.is_file() else {}


def same_weights(a: dict, b: dict) -> bool:
    return bool(a) and a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def other_filesystem(base: Path) -> Path | None:
    shm = Path("/dev/shm")
    ok = shm.is_dir() and os.access(shm, os.W_OK) and os.stat(shm).st_dev != os.stat(base).st_dev
    return Path(tempfile.mkdtemp(prefix="dmd-faults-", dir=shm)) if ok else None


def mount_tmpfs(folder: Path, size: int) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def trial(kind: str, base: Path, rng: random.Random, reference: dict, dir_bytes: int) -> dict:
    """One fault and the reruns after it; returns what happened and what was checked."""
    run, journal = base / "run", base / "journal"
    out = {"fault": kind, "filesystem": "same as $TMPDIR", "detail": "", "reruns": 0}
    mounted = False
    if kind == "kill-training":  # after a random number of completed saves, a random moment later
        proc = start(run, journal)
        after, delay = rng.randint(0, ITERATIONS // EVERY - 1), rng.uniform(0, 0.5)
        while len(journaled(journal)) < after and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(delay)
        proc.kill()
        rc, _ = finish(proc)
        out["detail"] = f"SIGKILL {delay:.2f} s after save {after} (rc {rc})"
    elif kind == "kill-saving":
        kill_at, fraction = rng.randint(1, ITERATIONS // EVERY + 1), rng.uniform(0.01, 0.99)
        rc, _ = finish(start(run, journal, KILL_AT=kill_at, KILL_FRACTION=fraction))
        out["detail"] = f"SIGKILL in save {kill_at} at {fraction:.0%} of its bytes (rc {rc})"
    elif kind == "full-disk":
        size = int(dir_bytes * rng.uniform(0.35, 0.8))
        mounted = mount_tmpfs(run, size)
        env = {} if mounted else {"FSIZE_LIMIT": int(size * 0.4)}
        rc, err = finish(start(run, journal, **env))
        lines = [line for line in err.splitlines() if line.strip() and "HYDRA_FULL_ERROR" not in line]
        tail = lines[-1][:120] if lines else ""
        out["filesystem"] = f"tmpfs of {size // 1024} KiB" if mounted else "file-size limit (no mount)"
        out["detail"] = f"rc {rc}: {tail}"
        if mounted:  # free space: a larger tmpfs with the same files
            subprocess.run(["mount", "-o", f"remount,size={dir_bytes * 4}", str(run)], check=True)
    elif kind == "concurrent":
        a, b = start(run, journal), start(run, journal)
        (rc_a, err_a), (rc_b, err_b) = finish(a), finish(b)
        refused = [e for rc, e in ((rc_a, err_a), (rc_b, err_b)) if rc != 0 and "is in use by" in e]
        out["detail"] = f"return codes {rc_a}, {rc_b}; refused as in use: {len(refused)}"
        out["concurrent_refused"] = sorted((rc_a, rc_b)) == [0, 1] and len(refused) == 1
    saved_before = journaled(journal)
    starts = []
    for _ in range(3):  # rerun until completed
        record = read_json(run / "results.json")
        if record.get("status") == "completed" and record.get("iterations") == ITERATIONS:
            break
        before = len(record.get("resumes", []))
        done_saves = journaled(journal)
        rc, err = finish(start(run, journal))
        out["reruns"] += 1
        resumes = read_json(run / "results.json").get("resumes", [])
        if len(resumes) > before:
            starts.append((resumes[-1].get("from_iteration"), done_saves[-1] if done_saves else None))
        if rc != 0:
            lines = [line for line in err.splitlines() if line.strip() and "HYDRA_FULL_ERROR" not in line]
            out.setdefault("rerun_errors", []).append(lines[-1][:200] if lines else f"rc {rc}")
    record = read_json(run / "results.json")
    problems = []
    if record.get("status") != "completed" or record.get("iterations") != ITERATIONS:
        problems.append(f"status {record.get('status')} at {record.get('iterations')} iterations")
    if not same_weights(generator_weights(run), reference):
        problems.append("released generator differs from the uninterrupted run's")
    leftovers = [str(p.relative_to(run)) for p in run.rglob("*.tmp-*")]
    if leftovers:
        problems.append(f"temporaries left: {leftovers}")
    if kind == "concurrent" and not out["concurrent_refused"]:
        problems.append("the second start was not refused")
    lost = [f"resumed from {got} although save at {saved} had completed" for got, saved in starts
            if saved is not None and (got is None or got < saved)]
    completed = record.get("status") == "completed" and record.get("iterations") == ITERATIONS
    out.update(completed=completed, checkpoint_lost=lost,
               record_wrong=problems, saves_before_rerun=saved_before[-3:], resumed_from=[s[0] for s in starts])
    if mounted:
        subprocess.run(["umount", str(run)], check=False)
    return out


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    args = p.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="dmd-faults-"))
    shm = other_filesystem(work)
    started = time.time()
    ref_dir = work / "reference"
    rc, err = finish(start(ref_dir, work / "reference.journal"))
    if rc != 0:
        raise SystemExit(f"The uninterrupted reference run failed:\n{err[-3000:]}")
    reference = generator_weights(ref_dir)
    dir_bytes = sum(f.stat().st_size for f in ref_dir.rglob("*") if f.is_file())
    results = []
    for i in range(args.trials):
        kind = FAULTS[i % len(FAULTS)]
        on_other = kind in ("kill-training", "kill-saving") and (i // len(FAULTS)) % 2 == 1 and shm is not None
        base = (shm if on_other else work) / f"trial-{i:02d}"
        base.mkdir(parents=True)
        r = trial(kind, base, rng, reference, dir_bytes)
        if on_other:
            r["filesystem"] = "other than $TMPDIR (/dev/shm)"
        results.append(r)
        print(f"[{i + 1}/{args.trials}] {kind:14s} {r['filesystem']:32s} {r['detail'][:70]:70s} "
              f"completed={r['completed']} lost={len(r['checkpoint_lost'])} wrong={len(r['record_wrong'])}",
              flush=True)
        shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    if shm is not None:
        shutil.rmtree(shm, ignore_errors=True)
    write_report(results, args, time.time() - started, Path(args.out))


def write_report(results: list[dict], args, seconds: float, out: Path) -> None:
    lines = ["| fault | trials | completed after resume | checkpoints lost | records wrong |", "|---|---|---|---|---|"]
    for kind in FAULTS:
        rows = [r for r in results if r["fault"] == kind]
        lines.append(f"| {kind} | {len(rows)} | {sum(r['completed'] for r in rows)} | "
                     f"{sum(bool(r['checkpoint_lost']) for r in rows)} | {sum(bool(r['record_wrong']) for r in rows)} |")
    lines.append(f"| **all** | {len(results)} | {sum(r['completed'] for r in results)} | "
                 f"{sum(bool(r['checkpoint_lost']) for r in results)} | {sum(bool(r['record_wrong']) for r in results)} |")
    detail = ["| # | fault | filesystem | what happened | reruns | resumed from |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(results):
        detail.append(f"| {i} | {r['fault']} | {r['filesystem']} | {r['detail']} | {r['reruns']} | {r['resumed_from']} |")
    problems = [f"- trial {i}: {'; '.join(r['checkpoint_lost'] + r['record_wrong'])}" for i, r in enumerate(results)
                if r["checkpoint_lost"] or r["record_wrong"]]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    text = (f"`python experiments/fault_injection.py --trials {args.trials} --seed {args.seed}` at commit {commit} "
            f"({seconds / 60:.0f} min on this machine; gmm_dmd2, {ITERATIONS} iterations, a checkpoint every {EVERY}).\n\n"
            + "\n".join(lines) + "\n\n" + ("\n".join(problems) if problems else "No checkpoint lost, no record wrong.")
            + "\n\n" + "\n".join(detail) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "fault_injection.md").write_text(text)
    (out / "fault_injection.json").write_text(json.dumps({"trials": results, "seconds": round(seconds), "commit": commit,
                                                          "command": f"python experiments/fault_injection.py --trials {args.trials} --seed {args.seed}"},
                                                         indent=2))
    print(text)


if __name__ == "__main__":
    main()
