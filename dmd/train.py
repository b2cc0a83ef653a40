"""``python -m dmd.train experiment=<preset>``: distil a teacher with DMD / DMD2.

Composes the frozen teacher (real score), a generator and a fake score (both copies of the
teacher's network, or of ``init``), the data (real samples for the GAN), and trains them with
:class:`~dmd.module.DMDModule`. At the end the run dir holds

    checkpoints/last.ckpt   full training state, saved periodically and where training stops
                            (resume or extend: rerun with the same hydra.run.dir)
    generator/              the released generator (diffusers folder + generator.json);
                            ``python -m dmd.sample ckpt=<run dir>`` samples it
    samples.png             fixed-noise samples of the released generator
    samples/step_*.png      the same during training (EvaluationCallback)
    results.json            metrics at every evaluation, final metrics, provenance
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
import warnings
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dmd.build import build_module, student_init
from dmd.callbacks.checkpoint import checkpoint_iteration
from dmd.callbacks.evaluation import EvaluationCallback
from dmd.callbacks.rounds import RoundReleases
from dmd.distances import build_distance, digest
from dmd.draw import sample_generator
from dmd.files import read_results, update_results
from dmd.generator import load_generator, save_generator
from dmd.methods.pd import PDModule
from dmd.metrics.evaluator import check_independent
from dmd.provenance import run_provenance
from dmd.rundir import RunDirError, claim_run_dir, completed_as_configured
from dmd.runs import (
    build_trainer,
    finish_wandb,
    job_overrides,
    require,
    resolve_ckpt_path,
    saved_states,
)
from dmd.student import StudentModule
from dmd.teachers import Teacher, weights_digest
from dmd.validation import validate
from dmd.visualize import save_sample_grid

log = logging.getLogger(__name__)

# Periodic checkpoints hold the state after the iteration's updates, together with the counters
# and RNG state of that moment: exactly what an exact resume needs, so Lightning's note on
# manual optimisation does not apply.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


def rank_states(module: StudentModule) -> list[dict]:
    """What every rank ended with: a digest of its generator weights, of the backward-simulation
    steps it trained, and of its random stream (ranks must agree on the first two, not the last)."""
    import torch.distributed as dist

    # Under FSDP the digest is of this rank's shard of the generator.
    mine = {"rank": module.global_rank, "generator_sha256": weights_digest(module.generator),
            "backward_simulation_sha256": module.backward_simulation_trace.hexdigest(),
            "rng_state_sha256": hashlib.sha256(module.rng.get_state().numpy().tobytes()).hexdigest()}
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def final_metrics(callbacks) -> dict:
    """The last evaluation of the run's EvaluationCallback (empty without one)."""
    evals = [c for c in callbacks if isinstance(c, EvaluationCallback)]
    return evals[0].latest if evals else {}


def set_training_length(cfg: DictConfig) -> None:
    """Turns ``generator_steps`` (when set) into ``max_iterations``: at TTUR ratio r the generator
    steps on every r-th iteration, so N generator updates take N * r iterations."""
    steps = cfg.get("generator_steps")
    if steps is not None:
        require(steps >= 1, f"generator_steps must be >= 1 (or null to use max_iterations), got {steps}.")
        cfg.max_iterations = int(steps) * int(cfg.algorithm.ttur_ratio)
    require(cfg.max_iterations >= 1, f"max_iterations must be >= 1, got {cfg.max_iterations}.")


def check_training_signals(cfg: DictConfig) -> None:
    """Refuse a run whose regression distance uses an evaluator's network (same weights)."""
    reg = cfg.algorithm.regression
    if reg.weight <= 0 or reg.distance not in ("perceptual", "features") or not cfg.get("eval"):
        return
    evaluator = instantiate(cfg.eval.evaluator)
    check_independent({"algorithm.regression.network": digest(build_distance(reg.distance, reg.network))},
                      evaluator)


def completed_record(folder: Path) -> dict | None:
    """The run's results.json if it records a completed training, else None."""
    try:
        record = read_results(folder / "results.json")
    except (OSError, ValueError):  # an unreadable record: the checkpoints decide
        return None
    return record if record.get("status") == "completed" else None


def has_trained_state(folder: Path) -> bool:
    """Whether a train run dir holds training progress (a checkpoint or a completed record)."""
    return completed_record(folder) is not None or bool(saved_states(folder))


def refuse_a_bare_record(folder: Path, cfg: DictConfig) -> None:
    """Refuse to train in a dir holding a completed run's record without its training state
    (e.g. sweep records committed from another machine, weights ignored): with any change of
    settings it would train again from iteration 0 and replace the record of what completed.
    (A run stopped early, e.g. by trainer.max_time, before its first checkpoint may restart.)"""
    record = completed_record(folder)
    if record is None or record.get("stopped_early") or saved_states(folder):
        return
    if cfg.get("ckpt_path") not in (None, "", "none", "last"):  # its state is given from elsewhere
        return
    if not completed_as_configured(folder, cfg):
        raise RunDirError(
            f"{folder} holds a completed run's record but not its training state (no checkpoints/last.ckpt, "
            "e.g. records committed from another machine): with these settings it would train again from "
            "iteration 0 and replace that record. Rerun with the run's own settings (nothing to train), score "
            f"its generator with `python -m dmd.evaluate ckpt={folder}` (if generator/ is here), or train in a "
            "new run dir (leave out hydra.run.dir).")


def prepare(cfg: DictConfig) -> None:
    """Everything that can refuse the config, before the run dir is touched."""
    validate(cfg, "train")  # first: set_training_length computes with values it has checked
    set_training_length(cfg)
    check_training_signals(cfg)


def train(cfg: DictConfig) -> Path:
    started = time.time()
    with claim_run_dir(cfg, "train", resumable=True, started=has_trained_state, prepare=prepare,
                       on_error=record_failure, refuse=refuse_a_bare_record) as (out_dir, resume):
        if completed_as_configured(out_dir, cfg):  # e.g. a sweep rerun: its finished jobs
            log.info("%s already completed this run (results.json): nothing to train. Raise "
                     "max_iterations or generator_steps to extend it; `python -m dmd.evaluate ckpt=%s` "
                     "scores it again.", out_dir, out_dir)
            return out_dir
        return _train(cfg, out_dir, resume, started)


def _train(cfg: DictConfig, out_dir: Path, resume: dict | None, started: float) -> Path:
    pl.seed_everything(cfg.seed, workers=True)
    teacher: Teacher = instantiate(cfg.teacher)
    init = student_init(teacher, cfg.init)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg, teacher, init)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c] if cfg.callbacks else []
    if isinstance(module, PDModule):  # every round's student, beside the final generator/
        callbacks.insert(0, RoundReleases(init, out_dir / "rounds"))
    trainer = build_trainer(cfg, out_dir, callbacks)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, out_dir)
    if resume is not None and trainer.is_global_zero:  # which iterations ran under which settings
        resume.update(command=command_line(), from_iteration=checkpoint_iteration(ckpt_path))
        update_results(out_dir / "results.json",
                       resumes=[*read_results(out_dir / "results.json").get("resumes", []), resume])
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if module.iteration == 0:  # e.g. a dataset smaller than one batch: never "completed"
        raise RuntimeError("Training ran no iteration (Lightning's reason is logged above, e.g. 'No "
                           "training batches': data smaller than one batch?). Nothing was released.")
    ranks = rank_states(module)  # collectives: every rank takes part
    released = module.release_generator()
    if not trainer.is_global_zero:  # rank 0 releases the generator and writes the record
        return out_dir
    # Replicas (DDP) must agree; FSDP's shards are one copy by construction.
    require(module.sharded or all(r["generator_sha256"] == ranks[0]["generator_sha256"] for r in ranks),
            f"The generator weights differ between ranks after training ({ranks}): gradients were "
            "not synchronised. Nothing was released; report this with the trainer strategy used.")

    folder = save_generator(released, init, out_dir / "generator")
    generator, info = load_generator(folder)  # round trip: what `dmd.sample ckpt=` will load
    samples, _ = sample_generator(generator, info, cfg.eval.grid_size, seed=cfg.eval.seed, progress=False)
    save_sample_grid(info.to_images(samples), out_dir / "samples.png")
    metrics = final_metrics(callbacks)
    results = {
        "status": "completed", "experiment": cfg.get("experiment_name"),
        "command": command_line(), "overrides": job_overrides(), "provenance": run_provenance(),
        "iterations": module.iteration, "generator_steps": module.generator_steps,
        "fake_steps": module.fake_steps, "network_passes": module.network_passes, "nfe": generator.num_steps,
        "metrics": metrics, "wall_seconds": round(time.time() - started, 1), "ranks": ranks,
        # e.g. trainer.max_time (PD under a pass budget plans its own max_iterations)
        "stopped_early": module.iteration < module.max_iterations and not module.budget_spent,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if results["stopped_early"]:
        log.warning("Training stopped at iteration %d of max_iterations=%d (see Lightning's reason "
                    "above); results.json records it as stopped_early.", module.iteration, module.max_iterations)
    update_results(out_dir / "results.json", **results)  # beside the callback's evaluations
    log.info("Run dir %s: samples.png, results.json, generator/ (sample it with "
             "`python -m dmd.sample ckpt=%s num_samples=N out=FILE.npz`). Final metrics: %s",
             out_dir, out_dir, metrics)
    return out_dir


def command_line() -> str:
    return " ".join(["python -m dmd.train", *sys.argv[1:]])


def record_failure(folder: Path, err: Exception) -> None:
    """A failed job of a sweep leaves a record that dmd-compare reports. A failed rerun of a
    completed run (e.g. a bad override) keeps that run's record -- its status, command and
    metrics describe what did complete -- and lists the attempt under ``failed_attempts``."""
    attempt = {"error": f"{type(err).__name__}: {err}"[:2000], "overrides": job_overrides(),
               "command": command_line(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = folder / "results.json"
    try:
        record = read_results(path)
        if record.get("status") == "completed":
            update_results(path, failed_attempts=[*record.get("failed_attempts", []), attempt])
        else:
            update_results(path, status="failed", task="train", **attempt)
    except (OSError, ValueError) as unreadable:  # never hide the error being reported
        log.warning("Could not record the failure in %s: %s", path, unreadable)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except Exception:
        finish_wandb(exit_code=1)
        raise
    finish_wandb()  # multirun jobs share a process: never let one wandb run continue into the next


if __name__ == "__main__":
    main()
