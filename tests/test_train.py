"""``python -m dmd.train``: presets run end to end, resume exactly, and release a sampleable generator."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

# A few iterations of the 2-D preset on a small dataset, so that stops fall mid-epoch.
TINY_GMM = ["experiment=gmm_dmd2", "data.num_samples=256", "data.batch_size=32",
            "eval.num_samples=200", "logger=none", "trainer.enable_progress_bar=false",
            "callbacks.checkpoint.every_n_iterations=4"]


def _generator_weights(run):
    return load_file(run / "generator" / "unet" / "diffusion_pytorch_model.safetensors")


def _trained_state(run):
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if not k.startswith("real_score.")}


def test_resume_reproduces_an_uninterrupted_run_exactly(cli, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cli("dmd.train", *TINY_GMM, "max_iterations=23", f"hydra.run.dir={straight}")
    cli("dmd.train", *TINY_GMM, "max_iterations=11", f"hydra.run.dir={resumed}")  # stopped mid-epoch 2
    cli("dmd.train", *TINY_GMM, "max_iterations=23", f"hydra.run.dir={resumed}")  # resumes from last.ckpt
    a, b = _generator_weights(straight), _generator_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = _trained_state(straight), _trained_state(resumed)
    assert any(k.startswith("gan_head.") for k in sa)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # fake score and GAN head too
    ckpt = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    straight_passes = json.loads((straight / "results.json").read_text())["network_passes"]
    assert ckpt["dmd_counters"] == {"iteration": 23, "generator_steps": 5, "fake_steps": 23,
                                    "network_passes": straight_passes}  # counted on across the resume
    # results.json: the first part's end evaluation (generator step 3) is kept, then step 5's.
    steps = [[e["generator_step"] for e in json.loads((run / "results.json").read_text())["evaluations"]]
             for run in (straight, resumed)]
    assert steps == [[5], [3, 5]]
    # The weights moved away from the initialisation: the test compares trained models.
    init = load_file(ROOT / "experiments/checkpoints/gmm8_mlp/unet/diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(a[k], init[k]) for k in a)
    # Rerun as it was (e.g. a sweep rerun after an interruption): a completed run trains nothing
    # and no record changes (no new resume, no re-release, no re-evaluation).
    def records():  # (the lock file names its latest holder)
        return {p: p.read_bytes() for p in straight.rglob("*") if p.is_file() and p.suffix != ".log" and p.name != ".lock"}

    files = records()
    proc = cli("dmd.train", *TINY_GMM, "max_iterations=23", f"hydra.run.dir={straight}")
    assert "already completed this run" in proc.stdout + proc.stderr
    assert records() == files
    # A rerun with any change (here the evaluation's size) is a resume: scored again, recorded.
    proc = cli("dmd.train", *TINY_GMM, "max_iterations=23", "eval.num_samples=100", f"hydra.run.dir={straight}")
    assert "already completed this run" not in proc.stdout + proc.stderr
    record = json.loads((straight / "results.json").read_text())
    assert record["resumes"][-1]["changed"]["eval.num_samples"] == [200, 100]
    assert record["metrics"]["num_samples"] == 100
    # Its record without its training state (committed records on another machine): a rerun as it
    # was trains nothing; with a change it is refused, not trained again from iteration 0.
    shutil.rmtree(straight / "checkpoints")
    files = records()
    proc = cli("dmd.train", *TINY_GMM, "max_iterations=23", "eval.num_samples=100", f"hydra.run.dir={straight}")
    assert "already completed this run" in proc.stdout + proc.stderr
    proc = cli("dmd.train", *TINY_GMM, "max_iterations=23", f"hydra.run.dir={straight}", check=False)
    assert proc.returncode != 0 and "holds a completed run's record but not its training state" in proc.stderr
    assert records() == files


def test_released_generator_samples_through_the_cli(cli, tmp_path):
    run = tmp_path / "run"
    # The length in generator updates: at TTUR ratio 5, one generator step = 5 iterations.
    cli("dmd.train", *TINY_GMM, "generator_steps=1", "algorithm.ttur_ratio=5", f"hydra.run.dir={run}")
    assert (run / "samples.png").is_file() and (run / "results.json").is_file()
    results = json.loads((run / "results.json").read_text())
    assert (results["iterations"], results["generator_steps"], results["fake_steps"]) == (5, 1, 5)
    out = tmp_path / "g.npz"
    cli("dmd.sample", f"ckpt={run}", "num_samples=64", f"out={out}", "seed=3",
        f"hydra.run.dir={tmp_path}/sample")
    data = np.load(out)
    assert data["arr_0"].shape == (64, 2) and data["arr_0"].dtype == np.float32
    assert np.isfinite(data["arr_0"]).all() and (data["arr_1"] == -1).all()


@pytest.mark.slow
def test_sampling_a_run_without_a_generator_is_refused(cli, tmp_path):
    proc = cli("dmd.sample", f"ckpt={tmp_path}", "num_samples=4", f"out={tmp_path}/x.npz",
               f"hydra.run.dir={tmp_path}/sample", check=False)
    assert proc.returncode != 0 and "is not a distilled generator" in proc.stderr


FMNIST_TINY = ["max_iterations=6", "data.batch_size=4", "eval.num_samples=20",
               "eval.every_n_generator_steps=1", "eval.evaluator.kid_subsets=2",
               "eval.evaluator.references.teacher.num_samples=50", "eval.evaluator.references.teacher.steps=1",
               "logger=csv", "trainer.enable_progress_bar=false"]
# What the evaluation callback logs (README, dmd/callbacks/evaluation.py).
EVAL_KEYS = {"eval/fid_fmnist_vs_data", "eval/kid_fmnist_vs_data", "eval/fid_fmnist_vs_teacher",
             "eval/kid_fmnist_vs_teacher", "eval/class_consistency", "eval/generator_step",
             "eval/iteration", "eval/teacher/fid_fmnist_vs_data", "eval/teacher/class_consistency"}


@pytest.mark.parametrize("preset,nfe", [pytest.param("fmnist_dmd", 1, marks=pytest.mark.slow), ("fmnist_dmd2", 1),
                                        pytest.param("fmnist_dmd2_4step", 4, marks=pytest.mark.slow)])
def test_fmnist_presets_run_and_evaluate_during_training(cli, tmp_path, preset, nfe):
    run = tmp_path / preset
    cli("dmd.train", f"experiment={preset}", *FMNIST_TINY, "algorithm.regression.num_pairs=8",
        "algorithm.regression.steps=2", "algorithm.regression.batch_size=4",
        f"paths.cache_dir={tmp_path}/cache", f"hydra.run.dir={run}")
    results = json.loads((run / "results.json").read_text())
    assert results["nfe"] == nfe and results["iterations"] == 6
    # Class consistency well above chance (0.1) and far above a label shifted by one (~0): the 1-step
    # fmnist_dmd2 student measured 0.55 here (20 samples), its 1-step teacher reference 0.90 (50).
    assert results["metrics"]["class_consistency"] >= 0.3
    # The evaluation callback: every generator step here (ratio 1: 6 of them, TTUR 5: 2), in
    # results.json, in the logger and as fixed-noise grids.
    steps = [e["generator_step"] for e in results["evaluations"]]
    assert steps == list(range(1, results["generator_steps"] + 1)) and len(steps) >= 2
    assert results["metrics"] == results["evaluations"][-1]["metrics"]
    assert results["teacher_metrics"]["teacher/class_consistency"] >= 0.5
    (log,) = (run / "csv").glob("version_*/metrics.csv")
    header = log.read_text().splitlines()[0].split(",")
    assert EVAL_KEYS <= set(header), EVAL_KEYS - set(header)
    assert (run / "samples" / f"step_{steps[-1]:06d}.png").is_file()
    if preset == "fmnist_dmd":  # regression pairs were made once and cached with provenance
        assert len(list((tmp_path / "cache" / "pairs").glob("*.safetensors"))) == 1


@pytest.mark.slow
def test_mistyped_algorithm_key_is_refused(cli, tmp_path):
    proc = cli("dmd.train", "experiment=gmm_dmd2", "algorithm.ttur_ration=3",
               f"hydra.run.dir={tmp_path}/run", check=False)
    assert proc.returncode != 0 and "ttur_ration" in proc.stderr


def test_an_evaluator_that_cannot_score_the_samples_is_refused_before_training(cli, tmp_path):
    proc = cli("dmd.train", "data=gmm8", "teacher=gmm8", "init=${paths.checkpoints_dir}/gmm8_mlp",
               "max_iterations=2", "logger=none", f"hydra.run.dir={tmp_path}/run", check=False)
    assert proc.returncode != 0 and "eval=mixture for 2-D points" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_regression_distance_on_an_evaluators_network_is_refused_before_anything_is_written(cli, tmp_path):
    proc = cli("dmd.train", "experiment=fmnist_dmd", "algorithm.regression.distance=features",
               "algorithm.regression.network=${paths.checkpoints_dir}/fmnist_classifier",
               "logger=none", f"hydra.run.dir={tmp_path}/run", check=False)
    assert proc.returncode != 0
    assert "algorithm.regression.network uses the network of the evaluator's feature space 'fmnist'" in proc.stderr
    assert not (tmp_path / "run" / "config_resolved.yaml").exists()


@pytest.mark.slow
def test_resuming_keeps_the_csv_log_of_the_part_before(cli, tmp_path):
    run = tmp_path / "run"
    base = [o for o in TINY_GMM if o != "logger=none"] + ["logger=csv", "trainer.log_every_n_steps=1"]
    cli("dmd.train", *base, "max_iterations=4", f"hydra.run.dir={run}")
    cli("dmd.train", *base, "max_iterations=8", f"hydra.run.dir={run}")
    logs = sorted((run / "csv").glob("version_*/metrics.csv"))
    assert len(logs) == 2
    first = logs[0].read_text().splitlines()
    assert len(first) > 2 and "loss/fake" in first[0]


@pytest.mark.slow
def test_a_failed_rerun_of_a_completed_run_keeps_its_record(cli, tmp_path):
    run = tmp_path / "run"
    cli("dmd.train", *TINY_GMM, "max_iterations=4", f"hydra.run.dir={run}")
    before = json.loads((run / "results.json").read_text())
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.suffix != ".log"}
    # A resume that would change what the run trains is refused, and nothing in the dir changes.
    proc = cli("dmd.train", *TINY_GMM, "max_iterations=8", "init=/nonexistent/teacher",
               f"hydra.run.dir={run}", check=False)
    assert proc.returncode != 0 and "gmm8_mlp' -> '/nonexistent/teacher'" in proc.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.suffix != ".log"} == files
    # One that may run but fails keeps the completed record and lists the attempt.
    proc = cli("dmd.train", *TINY_GMM, "max_iterations=8", "eval.evaluator._target_=dmd.metrics.NoSuchEvaluator",
               f"hydra.run.dir={run}", check=False)
    assert proc.returncode != 0
    after = json.loads((run / "results.json").read_text())
    assert after["status"] == "completed" and after["command"] == before["command"]
    assert after["metrics"] == before["metrics"] and after["iterations"] == before["iterations"] == 4
    (attempt,) = after["failed_attempts"]
    assert "NoSuchEvaluator" in attempt["error"] and "NoSuchEvaluator" in attempt["command"]
    # A run that never completed is recorded as failed (dmd-compare reports it).
    fresh = tmp_path / "fresh"
    assert cli("dmd.train", *TINY_GMM, "init=/nonexistent/teacher", f"hydra.run.dir={fresh}",
               check=False).returncode != 0
    assert json.loads((fresh / "results.json").read_text())["status"] == "failed"


def test_a_learning_rate_changed_on_resume_is_the_one_that_trains(cli, tmp_path):
    """Lightning restores the optimisers' and schedulers' learning rates from the checkpoint: a
    change allowed on resume (allow_changes_on_resume) must still reach them, not only the record."""
    run = tmp_path / "run"
    cli("dmd.train", *TINY_GMM, "max_iterations=8", f"hydra.run.dir={run}")
    cli("dmd.train", *TINY_GMM, "max_iterations=12", f"hydra.run.dir={run}", "optim.lr_generator=3e-5",
        "optim.lr_fake=7e-5", "allow_changes_on_resume=[optim.lr_generator,optim.lr_fake]")
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["dmd_counters"]["iteration"] == 12
    for state, scheduler, lr in zip(ckpt["optimizer_states"], ckpt["lr_schedulers"], (3e-5, 7e-5)):
        assert scheduler["base_lrs"] == [pytest.approx(lr)]
        assert [g["initial_lr"] for g in state["param_groups"]] == [pytest.approx(lr)]
        assert [g["lr"] for g in state["param_groups"]] == scheduler["_last_lr"] == [pytest.approx(lr)]
    changed = json.loads((run / "results.json").read_text())["resumes"][0]["changed"]
    assert changed["optim.lr_generator"][1] == pytest.approx(3e-5)
