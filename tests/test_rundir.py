"""Run directories: claimed before anything is written, locked, never overwritten by another
command, and resumed only with settings that keep the run's meaning (dmd.rundir)."""

import hashlib
import json
import subprocess
import sys
from contextlib import contextmanager

import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict, read_write

from dmd import provenance
from dmd.provenance import run_provenance
from dmd.rundir import (
    RunDirError,
    claim_run_dir,
    completed_as_configured,
    config_changes,
    refused_changes,
)

TRAINED = lambda folder: True  # noqa: E731 - the dir holds training progress


@contextmanager
def hydra_job(name, run, *overrides):
    """The task config of ``python -m dmd.<name> <overrides> hydra.run.dir=<run>`` with Hydra's
    job state set as Hydra's run_job sets it before calling the task (the dir exists)."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(name, overrides=[*overrides, f"hydra.run.dir={run}"], return_hydra_config=True)
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.runtime.output_dir = str(run)
        cfg.hydra.job.name = name
    HydraConfig.instance().set_config(cfg)
    run.mkdir(parents=True, exist_ok=True)
    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    try:
        yield task
    finally:
        HydraConfig.instance().cfg = None


def digests(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def make_train_run(run, *overrides):
    """A train run dir as dmd.train leaves it (config records + a completed results.json)."""
    with hydra_job("train", run, "experiment=gmm_dmd2", *overrides) as cfg:
        with claim_run_dir(cfg, "train", resumable=True) as (folder, resume):
            assert resume is None
            (folder / "results.json").write_text(json.dumps({"status": "completed", "iterations": 40}))
            (folder / "checkpoints").mkdir()
            (folder / "checkpoints" / "last.ckpt").write_bytes(b"state")
    return run


def test_a_fresh_dir_gets_the_config_records(tmp_path):
    run = make_train_run(tmp_path / "run", "seed=3")
    assert OmegaConf.load(run / "config_resolved.yaml").seed == 3
    assert OmegaConf.load(run / ".hydra" / "hydra.yaml").hydra.runtime.choices.experiment == "gmm_dmd2"
    assert "seed=3" in OmegaConf.load(run / ".hydra" / "overrides.yaml")
    assert "pid" in (run / ".lock").read_text()


@pytest.mark.parametrize("name", ["evaluate", "sample", "pretrain", "train_classifier"])
def test_other_commands_never_write_into_a_train_run(tmp_path, name):
    run = make_train_run(tmp_path / "run")
    before = digests(run)
    extra = ["out=x.npz"] if name == "sample" else []
    with hydra_job(name, run, *extra) as cfg:
        with pytest.raises(RunDirError, match=rf"run dir of a `python -m dmd.train` job: dmd.{name} would"):
            with claim_run_dir(cfg, name, resumable=name == "pretrain"):
                pass
    assert digests(run) == before


def test_a_second_evaluation_into_an_evaluation_dir_is_refused(tmp_path):
    run = tmp_path / "eval"
    with hydra_job("evaluate", run) as cfg, claim_run_dir(cfg, "evaluate"):
        (run / "results.json").write_text("{}")
    before = digests(run)
    with hydra_job("evaluate", run, "seed=1") as cfg:
        with pytest.raises(RunDirError, match="records of an earlier dmd.evaluate job"):
            with claim_run_dir(cfg, "evaluate"):
                pass
    assert digests(run) == before


def test_a_dir_of_files_no_dmd_command_wrote_is_refused(tmp_path):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "notes.txt").write_text("months of work")
    with hydra_job("train", run, "experiment=gmm_dmd2") as cfg:
        with pytest.raises(RunDirError, match=r"already holds files no dmd command wrote \(notes.txt\)"):
            with claim_run_dir(cfg, "train", resumable=True):
                pass
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]  # not even a lock file


def test_a_resume_with_settings_that_change_the_runs_meaning_is_refused(tmp_path):
    run = make_train_run(tmp_path / "run")
    before = digests(run)
    cases = {("seed=5",): "seed: 0 -> 5", ("experiment=fmnist_dmd2",): "teacher._target_",
             ("algorithm.ttur_ratio=2",): "algorithm.ttur_ratio: 5 -> 2",
             ("max_iterations=10",): "max_iterations: 8000 -> 10 (shorter than recorded)"}
    for overrides, named in cases.items():
        experiment = [] if overrides[0].startswith("experiment") else ["experiment=gmm_dmd2"]
        with hydra_job("train", run, *experiment, *overrides) as cfg:
            with pytest.raises(RunDirError, match="allow_changes_on_resume") as err:
                with claim_run_dir(cfg, "train", resumable=True, started=TRAINED):
                    pass
        assert named in str(err.value)
    assert digests(run) == before


def test_a_resume_records_what_it_changed(tmp_path):
    run = make_train_run(tmp_path / "run")
    with hydra_job("train", run, "experiment=gmm_dmd2", "max_iterations=9000", "eval.num_samples=50",
                   "optim.lr_generator=1e-4", "allow_changes_on_resume=[optim.lr_generator]") as cfg:
        with claim_run_dir(cfg, "train", resumable=True, started=TRAINED) as (_, resume):
            pass
    assert resume["changed"]["max_iterations"] == [8000, 9000]
    assert resume["changed"]["optim.lr_generator"] == [pytest.approx(2e-4), 1e-4]
    assert resume["changed"]["eval.num_samples"] == [10000, 50]
    assert "optim.lr_generator=1e-4" in resume["overrides"]
    assert resume["git"] == run_provenance()["git"]  # which code ran from the resume on
    assert OmegaConf.load(run / "config_resolved.yaml").max_iterations == 9000  # the latest settings


def test_a_run_recorded_before_a_key_existed_resumes_with_the_value_that_trains_as_it_did(tmp_path):
    run = make_train_run(tmp_path / "run")
    recorded = OmegaConf.load(run / "config_resolved.yaml")  # as older code wrote it: no such keys
    del recorded.algorithm["method"], recorded.algorithm["timestep_distribution"], recorded.optim["fused"]
    OmegaConf.save(recorded, run / "config_resolved.yaml")
    with hydra_job("train", run, "experiment=gmm_dmd2") as cfg:
        with claim_run_dir(cfg, "train", resumable=True, started=TRAINED) as (_, resume):
            pass
    assert resume["changed"]["algorithm.method"] == [None, "dmd"]  # accepted, and recorded
    assert resume["changed"]["optim.fused"] == [None, False]
    OmegaConf.save(recorded, run / "config_resolved.yaml")
    before = digests(run)
    with hydra_job("train", run, "experiment=gmm_dmd2", "algorithm.timestep_distribution=sigma") as cfg:
        with pytest.raises(RunDirError, match="algorithm.timestep_distribution: None -> 'sigma'"):
            with claim_run_dir(cfg, "train", resumable=True, started=TRAINED):
                pass
    assert digests(run) == before


def test_provenance_is_read_once_at_the_start_of_the_process(monkeypatch):
    """A commit made while a long job runs is not recorded as the code that job ran."""
    heads = iter(["a" * 40, "b" * 40])
    monkeypatch.setattr(provenance, "git_state", lambda: {"commit": next(heads), "dirty": False})
    provenance._snapshot.cache_clear()
    try:
        first = run_provenance()
        first["git"]["commit"] = "changed by a caller"  # callers get copies
        assert run_provenance()["git"]["commit"] == "a" * 40
    finally:
        provenance._snapshot.cache_clear()


def test_a_dir_with_nothing_trained_takes_new_settings(tmp_path):
    run = make_train_run(tmp_path / "run")  # e.g. an attempt that failed before its first checkpoint
    with hydra_job("train", run, "experiment=gmm_dmd2", "seed=5") as cfg:
        with claim_run_dir(cfg, "train", resumable=True, started=lambda d: False) as (_, resume):
            assert resume["changed"]["seed"] == [0, 5]


def test_a_run_recorded_in_another_checkout_is_the_same_run_here(tmp_path):
    """Committed sweep records name the paths of the checkout that trained them; a rerun of the
    sweep in another checkout skips them (completed) or resumes them (started), and a change of
    meaning is still seen."""
    elsewhere = "/elsewhere/dmd"
    run = tmp_path / "run"
    with hydra_job("train", run, "experiment=gmm_dmd2", f"paths.root_dir={elsewhere}") as cfg:
        with claim_run_dir(cfg, "train", resumable=True):
            record = {"status": "completed", "config": OmegaConf.to_container(cfg, resolve=True)}
            (run / "results.json").write_text(json.dumps(record))
    assert record["config"]["init"] == elsewhere + "/experiments/checkpoints/gmm8_mlp"
    before = digests(run)
    with hydra_job("train", run, "experiment=gmm_dmd2") as cfg:  # this checkout's root
        assert completed_as_configured(run, cfg)
        with claim_run_dir(cfg, "train", resumable=True, started=TRAINED) as (_, resume):
            pass
    assert resume["changed"]["init"][0].startswith(elsewhere)  # the move is recorded
    for change in ("seed=5", f"init={tmp_path}/other_init"):
        with hydra_job("train", run, "experiment=gmm_dmd2", change) as cfg:
            assert not completed_as_configured(run, cfg)
            with pytest.raises(RunDirError, match="allow_changes_on_resume"):
                with claim_run_dir(cfg, "train", resumable=True, started=TRAINED):
                    pass
    assert digests(run)["results.json"] == before["results.json"]


def test_change_rules():
    changes = config_changes({"a": {"b": 1, "c": [1, 2]}, "max_iterations": 10},
                             {"a": {"b": 2, "c": [1, 2]}, "max_iterations": 20, "eval": {"n": 1}})
    assert changes == {"a.b": [1, 2], "max_iterations": [10, 20], "eval.n": [None, 1]}
    assert refused_changes(changes) == ["a.b: 1 -> 2"]
    assert refused_changes(changes, allowed=["a"]) == []
    assert refused_changes({"generator_steps": [300, 100]}) == ["generator_steps: 300 -> 100 (shorter than recorded)"]
    assert refused_changes({"trainer.precision": ["32-true", "bf16-mixed"]}) != []
    assert refused_changes({"trainer.max_steps": [4000, 8000]}) == []  # extending a teacher
    assert refused_changes({"trainer.max_steps": [4000, 2000]}) != []
    assert refused_changes({"trainer.devices": [1, 2], "callbacks.checkpoint.every_n_iterations": [500, 1]}) == []


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.lockf(fd, fcntl.LOCK_EX)
os.pwrite(fd, f"pid {os.getpid()} on the test host".encode(), 0)
print("locked", flush=True)
time.sleep(120)
"""


def test_a_locked_run_dir_is_refused_until_its_holder_dies(tmp_path):
    run = make_train_run(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = digests(run)
        with hydra_job("train", run, "experiment=gmm_dmd2") as cfg:
            with pytest.raises(RunDirError, match=rf"is in use by pid {holder.pid} on the test host"):
                with claim_run_dir(cfg, "train", resumable=True, started=TRAINED):
                    pass
        assert digests(run) == before
    finally:
        holder.kill()  # kill -9: the kernel releases the lock
        holder.wait()
    with hydra_job("train", run, "experiment=gmm_dmd2") as cfg:
        with claim_run_dir(cfg, "train", resumable=True, started=TRAINED) as (_, resume):
            assert resume["changed"] == {}


def test_a_failure_after_the_claim_is_recorded_in_the_claimed_dir_only(tmp_path):
    run, seen = tmp_path / "run", []
    with hydra_job("train", run, "experiment=gmm_dmd2") as cfg:
        with pytest.raises(KeyError):
            with claim_run_dir(cfg, "train", resumable=True, on_error=lambda d, e: seen.append((d, e))):
                raise KeyError("boom")
    assert [(d, type(e)) for d, e in seen] == [(run, KeyError)]
    other = make_train_run(tmp_path / "other")
    with hydra_job("evaluate", other) as cfg:
        with pytest.raises(RunDirError):
            with claim_run_dir(cfg, "evaluate", on_error=lambda d, e: seen.append(d)):
                pass
    assert len(seen) == 1


def test_a_refused_config_is_recorded_in_a_fresh_dir_only(tmp_path):
    from dmd.validation import ConfigError, validate

    seen = []
    record = lambda d, e: (d / "results.json").write_text(json.dumps({"status": "failed", "task": "train"}))  # noqa: E731
    run = tmp_path / "sweep" / "0"
    with hydra_job("train", run, "experiment=gmm_dmd2", "algorithm.ttur_ratio=0") as cfg:
        with pytest.raises(ConfigError, match="algorithm.ttur_ratio=0"):
            with claim_run_dir(cfg, "train", resumable=True, prepare=lambda c: validate(c, "train"),
                               on_error=record):
                seen.append("ran")
    assert not seen and sorted(p.name for p in run.iterdir()) == [".lock", "results.json"]  # no config records
    # The job's dir stays its own: the corrected job reruns into it.
    with hydra_job("train", run, "experiment=gmm_dmd2") as cfg:
        with claim_run_dir(cfg, "train", resumable=True, prepare=lambda c: validate(c, "train")) as (_, resume):
            assert resume == {**resume, "changed": {}}
    other = make_train_run(tmp_path / "other")
    before = digests(other)
    with hydra_job("evaluate", other, "eval.num_samples=1") as cfg:
        with pytest.raises(RunDirError):
            with claim_run_dir(cfg, "evaluate", prepare=lambda c: validate(c, "evaluate"), on_error=record):
                pass
    assert digests(other) == before


def test_a_completed_record_without_its_training_state_refuses_a_change(tmp_path):
    """dmd.train over a completed run's record whose checkpoints are not here (committed sweep
    records on another machine): the same settings train nothing, other settings are refused
    (they would train again from iteration 0 over the record), unless the state is given
    (ckpt_path=) or is here, or the run stopped early (it may restart)."""
    from dmd.train import refuse_a_bare_record

    run = tmp_path / "run"
    with hydra_job("train", run, "experiment=gmm_dmd2") as cfg:
        record = {"status": "completed", "config": OmegaConf.to_container(cfg, resolve=True)}
    (run / "results.json").write_text(json.dumps(record))
    with hydra_job("train", run, "experiment=gmm_dmd2") as cfg:
        refuse_a_bare_record(run, cfg)
    with hydra_job("train", run, "experiment=gmm_dmd2", "seed=5") as cfg:
        with pytest.raises(RunDirError, match="a completed run's record but not its training state"):
            refuse_a_bare_record(run, cfg)
    with hydra_job("train", run, "experiment=gmm_dmd2", "seed=5", f"ckpt_path={tmp_path}/state.ckpt") as cfg:
        refuse_a_bare_record(run, cfg)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"state")
    with hydra_job("train", run, "experiment=gmm_dmd2", "seed=5") as cfg:
        refuse_a_bare_record(run, cfg)
    (run / "checkpoints" / "last.ckpt").unlink()
    (run / "results.json").write_text(json.dumps({**record, "stopped_early": True}))
    with hydra_job("train", run, "experiment=gmm_dmd2", "seed=5") as cfg:
        refuse_a_bare_record(run, cfg)
