"""Run directories that no command can damage.

Every entry point claims its run dir with :func:`claim_run_dir` before it writes anything there:

* the dir is locked for the job's lifetime (``.lock``, a POSIX record lock the kernel releases
  when the process dies, also across NFS), so two jobs never write into one dir side by side;
* a dir holding another command's records (``dmd.evaluate hydra.run.dir=<a train run>``), or
  files no dmd command wrote, is refused with the way out;
* a resume (the same resumable command into its own dir) may change only what does not alter
  the run's meaning (length, logging, checkpoint and evaluation cadence, devices); any other
  change is refused naming the key, its old and its new value, unless the command lists it in
  ``allow_changes_on_resume``. Every resume is returned for the run's record.

Only then are the run's config records written: ``config_resolved.yaml`` and Hydra's
``.hydra/{config,hydra,overrides}.yaml`` (Hydra's own write is switched off in
``conf/hydra/default.yaml``: it happens before any of our code could look at the dir).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from dmd.files import atomic_path
from dmd.methods import METHODS
from dmd.provenance import run_provenance
from dmd.runs import job_overrides, run_dir

log = logging.getLogger(__name__)

LOCK = ".lock"
# What may be in a dir before any record is written: Hydra's job log, our lock file.
NOT_RECORDS = (LOCK,)
# Settings a resume may change without changing what the run trains (prefixes of dotted keys).
OPERATIONAL = ("max_iterations", "generator_steps", "max_network_passes", "ckpt_path", "allow_changes_on_resume",
               "logger", "callbacks", "eval", "paths", "grid", "checkpoint_every_n_steps",
               "trainer.max_steps", "trainer.devices", "trainer.num_nodes", "trainer.accelerator", "trainer.strategy",
               "trainer.enable_progress_bar", "trainer.log_every_n_steps", "data.num_workers",
               "gradient_checkpointing", "finite_check_every", "compile")
# Keys added to the config after runs were recorded without them, with the value that trains as
# those runs did: a resume of an older run dir accepts a key it lacks when its value is this one
# (recorded in the resume's `changed`); any other value is a change of meaning like any other.
ADDED_LATER = {
    "algorithm.method": "dmd",                     # 9a58dc3 (algorithm=kd): until then every run was DMD
    "algorithm.timestep_distribution": "uniform",  # 96d7125: DMD/DMD2's uniform t
    "optim.fused": False,                          # the foreach AdamW that ran before
    "algorithm.gan.balance": "fixed",              # 6406296: w = generator_weight, as before
    "algorithm.gan.reference_dim": 12288,          # (inert under balance=fixed)
    "algorithm.gan.grad_ratio": 1.0,               # (inert under balance=fixed)
}
# Of those, the ones that may only grow (a shorter run than recorded would contradict the record).
LENGTHS = ("max_iterations", "generator_steps", "trainer.max_steps", "max_network_passes")


def completed_as_configured(folder: Path, cfg: DictConfig) -> bool:
    """Whether ``folder`` holds a run that completed (not stopped early) with exactly the
    settings of ``cfg``: rerunning it would train nothing (e.g. a sweep rerun after an
    interruption). Any change, even an operational one (e.g. ``eval.*``), is a resume as before,
    recorded in results.json. Read from results.json, which every rank sees alike."""
    try:
        record = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        return False
    if record.get("status") != "completed" or record.get("stopped_early") or "config" not in record:
        return False
    new = OmegaConf.to_container(cfg, resolve=True)
    return not config_changes(relocated(record["config"], new), new)


def relocated(old: dict, new: dict) -> dict:
    """A recorded config ``old`` with every path under its checkout (``paths.root_dir``) moved
    under ``new``'s, so that a run recorded in another checkout of the project (committed sweep
    records, a copied run dir) compares by its settings, not by where the repository lay."""
    src = (old.get("paths") or {}).get("root_dir")
    dst = (new.get("paths") or {}).get("root_dir")
    if not isinstance(src, str) or not isinstance(dst, str) or src == dst:
        return old

    def move(value):
        if isinstance(value, dict):
            return {key: move(item) for key, item in value.items()}
        if isinstance(value, list):
            return [move(item) for item in value]
        if isinstance(value, str) and (value == src or value.startswith(src + "/")):
            return dst + value[len(src):]
        return value

    return move(old)


class RunDirError(CompactHydraException, ValueError):
    """The run dir cannot be used by this command; nothing in it was changed (Hydra prints the
    message alone)."""


def is_leader() -> bool:
    """False in the extra processes of a multi-process job (they share the leader's run dir)."""
    return all(int(os.environ.get(k, 0) or 0) == 0 for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def recorded_task(folder: Path) -> str | None:
    """The ``task_name`` of the dmd command whose records ``folder`` holds (None: none)."""
    for record in (folder / "config_resolved.yaml", folder / ".hydra" / "config.yaml"):
        if record.is_file():
            try:
                return OmegaConf.load(record).get("task_name")
            except Exception:  # noqa: BLE001 - an unreadable record still marks the dir as taken
                return "unknown (unreadable record)"
    try:  # a job refused before its config records were written leaves only its failure record
        return json.loads((folder / "results.json").read_text()).get("task")
    except (OSError, ValueError, AttributeError):
        return None


def records_in(folder: Path) -> list[str]:
    """The entries of ``folder`` beyond the lock and Hydra's job logs."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name not in NOT_RECORDS and p.suffix != ".log")


def flatten(tree, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are values)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_changes(old: dict, new: dict) -> dict:
    """``{key: [old, new]}`` for every dotted key whose value differs (missing: None)."""
    a, b = flatten(old), flatten(new)
    return {k: [a.get(k), b.get(k)] for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _limit(value) -> float:
    """A length setting as a number (-1, Lightning's "no limit", and unset: unlimited)."""
    return math.inf if value is None or value == -1 or not isinstance(value, (int, float)) else value


def planned_lengths(cfg: DictConfig) -> tuple[str, ...]:
    """Length settings that are part of what a run trains, as its method declares them (e.g.
    progressive distillation splits max_iterations into its rounds)."""
    method = OmegaConf.select(cfg, "algorithm.method")
    return METHODS[method].planned_lengths if method in METHODS else ()


def refused_changes(changes: dict, allowed=(), planned=(), absent=()) -> list[str]:
    """The changes a resume may not make, as ``key: old -> new`` lines (``planned``: lengths that
    are not operational in this run; ``absent``: keys the recorded config lacks)."""
    bad = []
    for key, (old, new) in changes.items():
        if _under(key, allowed) or (key in absent and key in ADDED_LATER and new == ADDED_LATER[key]):
            continue
        shorter = key in LENGTHS and _limit(new) < _limit(old)
        if shorter or key in planned or not _under(key, OPERATIONAL):
            bad.append(f"{key}: {old!r} -> {new!r}" + (" (shorter than recorded)" if shorter else ""))
    return bad


class _Lock:
    """An exclusive, non-blocking POSIX lock on ``<dir>/.lock`` naming its holder."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirError(f"{self.path.parent} is in use by {holder}. Two jobs in one run dir "
                              "would overwrite each other: wait for it to end, or pick another "
                              "hydra.run.dir.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock; the file stays (deleting it would race)
            self.fd = None


def check_reuse(folder: Path, task: str, cfg: DictConfig, resumable: bool, started: bool,
                compare: bool = True) -> dict | None:
    """Refuse a dir this command may not write into. Returns None for a fresh dir, else the
    changes a resume makes (``{key: [old, new]}``, maybe empty; not compared: ``{}``)."""
    entries = records_in(folder)
    if not entries:
        return None
    owner = recorded_task(folder)
    fresh_dir = "leave out hydra.run.dir (every run gets a new dir) or name a new one"
    if owner is None:
        raise RunDirError(f"hydra.run.dir={folder} already holds files no dmd command wrote "
                          f"({', '.join(entries[:6])}{', ...' if len(entries) > 6 else ''}): "
                          f"{fresh_dir}.")
    if owner != task:
        raise RunDirError(f"hydra.run.dir={folder} is the run dir of a `python -m dmd.{owner}` job: "
                          f"dmd.{task} would overwrite its records. To use that run, pass it as "
                          f"ckpt={folder}; for this command's own records, {fresh_dir}.")
    if not resumable:
        raise RunDirError(f"hydra.run.dir={folder} already holds the records of an earlier "
                          f"dmd.{task} job, which this one would overwrite: {fresh_dir}.")
    recorded = folder / "config_resolved.yaml"
    if not compare:
        return {}
    if not recorded.is_file():  # only Hydra's unresolved record (hydra.output_subdir set by hand)
        log.warning("%s has no config_resolved.yaml: the resume's settings cannot be compared.", folder)
        return {}
    old = OmegaConf.to_container(OmegaConf.load(recorded), resolve=False)
    new = OmegaConf.to_container(cfg, resolve=True)
    changes = config_changes(old, new)  # recorded as they are (a moved checkout included)
    if not started:  # nothing was trained there yet: nothing for the new settings to contradict
        return changes
    absent = changes.keys() - flatten(old).keys()  # keys newer code added (ADDED_LATER)
    meaning = config_changes(relocated(old, new), new)  # where the checkout lies is not a setting
    bad = refused_changes(meaning, cfg.get("allow_changes_on_resume") or (), planned_lengths(cfg), absent)
    if bad:
        raise RunDirError(
            f"{folder} holds a {task} run with other settings; resuming it with these would record "
            "its earlier iterations under settings they did not have:\n  " + "\n  ".join(bad) +
            "\nRerun with the run's own values, or start a new run dir (leave out hydra.run.dir), "
            "or, to change them on purpose from here on, list the keys in "
            "allow_changes_on_resume=[...] (the change is recorded in results.json `resumes`).")
    return changes


def write_config_records(cfg: DictConfig, folder: Path) -> None:
    """``config_resolved.yaml`` (every value resolved) and Hydra's ``.hydra/`` records."""
    records = {folder / "config_resolved.yaml": OmegaConf.to_yaml(cfg, resolve=True),
               folder / ".hydra" / "config.yaml": OmegaConf.to_yaml(cfg),
               folder / ".hydra" / "overrides.yaml": OmegaConf.to_yaml(OmegaConf.create(job_overrides()))}
    try:
        records[folder / ".hydra" / "hydra.yaml"] = OmegaConf.to_yaml({"hydra": HydraConfig.get()})
    except ValueError:  # not under Hydra
        pass
    for path, text in records.items():
        with atomic_path(path) as tmp:
            tmp.write_text(text)


def _drop_empty_job_log(folder: Path) -> None:
    """Hydra opens ``<job name>.log`` in the run dir before any of our code runs; a refused job
    removes it when it is still empty (it would only clutter another run's dir)."""
    try:
        log_file = folder / f"{HydraConfig.get().job.name}.log"
    except ValueError:  # not under Hydra
        return
    if log_file.is_file() and log_file.stat().st_size == 0:
        log_file.unlink()


@contextmanager
def claim_run_dir(cfg: DictConfig, task: str, resumable: bool = False, started=lambda d: False,
                  prepare=None, on_error=None, refuse=None):
    """Claim the current run dir for command ``task`` and yield ``(run dir, resume)``.

    In order: ``prepare(cfg)`` (validation; it may complete the config), refusal of a dir this
    command may not use (before the lock file is made: such a dir gets nothing), the lock, the
    same check under the lock (with ``refuse(dir, cfg)``, the command's own refusals, which raise
    :class:`RunDirError`), and the config records. ``resume`` is None for a fresh dir, else
    ``{"time", "overrides", "changed": {key: [old, new]}, "git"}``; ``started(dir)`` says whether the dir
    holds trained state (then only operational settings may change). ``on_error(dir, err)``
    records a failure (a refused config included, so that a sweep's bad job is reported) in the
    job's own dir, never in a dir this command was refused."""
    folder = run_dir()
    provenance = run_provenance()  # the code this process runs, before a commit can move HEAD
    try:
        if prepare is not None:
            prepare(cfg)
        invalid = None
    except Exception as err:  # reported below, once the dir is known to be this job's
        invalid = err
    if not is_leader():
        if invalid is not None:
            raise invalid
        yield folder, None
        return
    def check():  # the reuse rules, then the command's own refusals
        changes = check_reuse(folder, task, cfg, resumable, started(folder), compare=invalid is None)
        if refuse is not None and invalid is None:
            refuse(folder, cfg)
        return changes

    try:
        check()
    except RunDirError:
        _drop_empty_job_log(folder)
        raise
    lock = _Lock(folder)
    lock.acquire()
    try:
        changes = check()
        resume = None if changes is None else {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "overrides": job_overrides(),
            "changed": changes, "git": provenance["git"]}  # which code ran from here on
        try:
            if invalid is not None:
                raise invalid
            write_config_records(cfg, folder)
            yield folder, resume
        except Exception as err:
            if on_error is not None:
                on_error(folder, err)
            raise
    finally:
        lock.release()
