"""Baseline methods in the same harness (algorithm.method): knowledge distillation, SiD,
consistency and progressive distillation train from the CLI, resume exactly and
release a generator dmd.sample uses, and every method beats the teacher's one-step sample on the
2-D mixture's oracle (SiD's loss by hand: tests/test_losses.py; CD's and PD's: tests/test_cd_pd.py)."""

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

from dmd.data import GaussianMixture
from dmd.draw import sample_teacher
from dmd.metrics.mixture import energy_distance
from dmd.teachers import gaussian_mixture_teacher

TINY_KD = ["experiment=gmm_kd", "data.num_samples=256", "data.batch_size=32", "eval.num_samples=200",
           "algorithm.regression.num_pairs=512", "algorithm.regression.steps=5", "logger=none",
           "trainer.enable_progress_bar=false", "callbacks.checkpoint.every_n_iterations=4"]


def _weights(run):
    return load_file(run / "generator" / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["gmm_kd", "gmm_sid", "gmm_cd", "gmm_pd"])
def test_resumes_exactly_and_releases_a_generator(cli, tmp_path, preset):
    tiny = [f"experiment={preset}", *TINY_KD[1:], f"paths.cache_dir={tmp_path}/cache"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cli("dmd.train", *tiny, "max_iterations=13", f"hydra.run.dir={straight}")
    # Stopped after 6 iterations (PD's rounds are planned over max_iterations, so its length stays;
    # 6 rounds of 2 iterations, the last 3: the resume starts round 3, whose teacher is the student).
    # Lightning counts optimizer steps: SiD's iteration updates the generator and the fake score.
    updates = 2 if preset == "gmm_sid" else 1
    cli("dmd.train", *tiny, "max_iterations=13", f"trainer.max_steps={6 * updates}", f"hydra.run.dir={resumed}")
    assert json.loads((resumed / "results.json").read_text())["iterations"] == 6
    cli("dmd.train", *tiny, "max_iterations=13", f"hydra.run.dir={resumed}")
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # EMA weights if on, released
    init = load_file(ROOT / "experiments/checkpoints/gmm8_mlp/unet/diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(a[k], init[k]) for k in a)
    results = json.loads((resumed / "results.json").read_text())
    # One generator update per iteration; a fake score (SiD's, updated as often at TTUR 1) or none.
    assert (results["iterations"], results["generator_steps"], results["fake_steps"]) == (13, 13, 13 * (updates - 1))
    ckpt = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    saved = {k.split(".")[0] for k in ckpt["state_dict"]}
    assert not saved & {"gan_head", "real_score"} and ("fake_score" in saved) == (preset == "gmm_sid")
    if preset == "gmm_kd":  # the pairs were made once and reused
        assert len(list((tmp_path / "cache" / "pairs").glob("*.safetensors"))) == 1
    if preset == "gmm_pd":  # every round's student, the same whether resumed or not; the plan is fixed
        proc = cli("dmd.train", *tiny, "max_iterations=20", f"hydra.run.dir={resumed}", check=False)
        assert proc.returncode != 0 and "max_iterations: 13 -> 20" in proc.stderr
        rounds = sorted(p.name for p in (resumed / "rounds").iterdir())
        assert rounds == ["16step", "1step", "2step", "32step", "4step", "8step"]
        for name in rounds:
            x = load_file(straight / "rounds" / name / "unet" / "diffusion_pytorch_model.safetensors")
            y = load_file(resumed / "rounds" / name / "unet" / "diffusion_pytorch_model.safetensors")
            assert all(torch.equal(x[k], y[k]) for k in x)
        meta = json.loads((resumed / "rounds" / "4step" / "generator.json").read_text())
        assert meta["timesteps"] == [999, 749, 499, 249] and meta["sampling"] == "ddim"
    out = tmp_path / "g.npz"
    cli("dmd.sample", f"ckpt={resumed}", "num_samples=32", f"out={out}", f"hydra.run.dir={tmp_path}/sample")
    assert np.load(out)["arr_0"].shape == (32, 2)


@pytest.mark.slow
def test_a_consistency_model_trained_once_scores_at_2_steps_as_one_trained_for_2_steps(cli, tmp_path):
    """CD never reads the generator's timesteps in training (conf/sweep/methods_cd_steps.yaml
    relies on it): its 1- and 2-step runs of one seed release identical networks, and dmd.evaluate
    of the 1-step run at timesteps=[999,499] reproduces the 2-step run's final evaluation."""
    tiny = ["experiment=gmm_cd", *TINY_KD[1:], "max_iterations=13", "algorithm.ema_decay=0.9",
            f"paths.cache_dir={tmp_path}/cache"]
    one, two, scored = tmp_path / "one", tmp_path / "two", tmp_path / "scored"
    cli("dmd.train", *tiny, "algorithm.generator_timesteps=[999]", f"hydra.run.dir={one}")
    cli("dmd.train", *tiny, "algorithm.generator_timesteps=[999,499]", f"hydra.run.dir={two}")
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cli("dmd.evaluate", f"ckpt={one}", "timesteps=[999,499]", "eval.num_samples=200", "latency.batch_sizes=[8]",
        "latency.repeats=2", "latency.warmup=1", f"paths.cache_dir={tmp_path}/cache", f"hydra.run.dir={scored}")
    trained = json.loads((two / "results.json").read_text())
    result = json.loads((scored / "results.json").read_text())
    assert result["nfe"] == 2 and trained["metrics"]["num_samples"] == result["num_samples"] == 200
    assert result["generator"] == {"path": str(one.resolve()), "timesteps": [999, 499], "training": {
        "status": "completed", "iterations": 13, "network_passes": json.loads((one / "results.json").read_text())[
            "network_passes"]}}
    assert result["metrics"] == trained["metrics"]
    one_step = json.loads((one / "results.json").read_text())["metrics"]
    assert one_step["energy_distance"] != result["metrics"]["energy_distance"]  # 2 steps were drawn


def test_kd_refuses_a_multi_step_student(cli, tmp_path):
    proc = cli("dmd.train", *TINY_KD, "algorithm.generator_timesteps=[999,499]", f"hydra.run.dir={tmp_path}/run",
               check=False)
    assert proc.returncode != 0 and "knowledge distillation trains a one-step student" in proc.stderr
    assert not (tmp_path / "run" / "config_resolved.yaml").exists()


@pytest.mark.slow
@pytest.mark.parametrize("preset,iterations", [("gmm_kd", 400), ("gmm_sid", 800), ("gmm_cd", 1000),
                                               ("gmm_pd", 300)])
def test_one_step_students_beat_the_teachers_one_step_sample(cli, tmp_path, preset, iterations):
    """Oracle check on gmm8: a short run brings each method's student's energy distance to the
    mixture far below the exact teacher's own one-step (Euler) sample's (measured: kd 0.003 after
    400 updates, sid 0.016 after 800, cd 0.003 after 1000, pd 0.010 after 300 (6 rounds of 50);
    the teacher's one step 1.44; 10k samples)."""
    run = tmp_path / "run"
    cli("dmd.train", f"experiment={preset}", f"max_iterations={iterations}", "logger=none",
        "trainer.enable_progress_bar=false", f"paths.cache_dir={tmp_path}/cache", f"hydra.run.dir={run}")
    student = json.loads((run / "results.json").read_text())["metrics"]
    mixture = GaussianMixture.ring()
    from diffusers import DDPMScheduler

    teacher = gaussian_mixture_teacher(mixture, DDPMScheduler(beta_schedule="linear"))  # conf/teacher/gmm8.yaml
    one_step, _ = sample_teacher(teacher, 4000, "ddim", 1, 1.0, seed=0, progress=False)
    reference, _ = mixture.sample(4000, generator=torch.Generator().manual_seed(1))
    teacher_energy = energy_distance(one_step, reference)
    assert student["energy_distance"] < 0.1 * teacher_energy, (student, teacher_energy)
    assert student["min_mode_share"] > 0.08 and student["median_dist_to_mode"] < 0.3


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["fmnist_kd", "fmnist_sid", "fmnist_cd", "fmnist_pd"])
def test_fmnist_presets_of_the_baselines_train(cli, tmp_path, preset):
    run = tmp_path / "run"
    cli("dmd.train", f"experiment={preset}", "max_iterations=3", "data.batch_size=4",
        *(["algorithm.pd.start_steps=4"] if preset == "fmnist_pd" else []),  # 2 rounds
        "algorithm.regression.num_pairs=8", "algorithm.regression.steps=2", "algorithm.regression.batch_size=4",
        "callbacks.evaluation=null", "logger=none", "trainer.enable_progress_bar=false",
        f"paths.cache_dir={tmp_path}/cache", f"hydra.run.dir={run}")
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed" and results["nfe"] == 1 and results["generator_steps"] == 3


GMM_TINY = ["data.num_samples=256", "data.batch_size=32", "callbacks.evaluation=null", "logger=none",
            "trainer.enable_progress_bar=false", "algorithm.regression.num_pairs=256", "algorithm.regression.steps=2"]


@pytest.mark.parametrize("preset,overrides,passes", [
    # DMD2, TTUR 5, batch 32: a generator iteration runs generator, real score, fake score (DM) and the
    # GAN head's fake-score pass, then the fake step's denoising pass and the discriminator's two
    # (7 x 32); each other iteration draws samples, denoises and discriminates (4 x 32).
    ("gmm_dmd2", ["max_iterations=5"], (7 + 4 * 4) * 32),
    ("gmm_kd", ["max_iterations=5", "algorithm.regression.batch_size=16"], 5 * 16),  # the generator alone
    ("gmm_cd", ["max_iterations=5"], 5 * 3 * 32),  # teacher, target network, student
    ("gmm_cd", ["max_iterations=100", "max_network_passes=500"], 6 * 3 * 32),  # stops once 500 are spent
    ("gmm_pd", ["max_iterations=5", "algorithm.pd.start_steps=4"], 5 * 3 * 32),  # student + 2 teacher steps
])
def test_network_passes_are_counted_and_budgeted(cli, tmp_path, preset, overrides, passes):
    run = tmp_path / "run"
    cli("dmd.train", f"experiment={preset}", *GMM_TINY, *overrides, f"paths.cache_dir={tmp_path}/cache",
        f"hydra.run.dir={run}")
    results = json.loads((run / "results.json").read_text())
    assert results["network_passes"] == passes and not results["stopped_early"]


@pytest.mark.slow
def test_pd_plans_its_rounds_from_a_pass_budget_counting_cfg_twice(cli, tmp_path):
    """fmnist_pd, batch 4, 2 rounds: round 0's guided teacher costs 2 passes per call (4 + 2 x 2 x 4 =
    20 per iteration), round 1's (the previous student, unguided) 1 (12): a budget of 96 buys 3
    iterations per round, spent exactly."""
    run = tmp_path / "run"
    cli("dmd.train", "experiment=fmnist_pd", "algorithm.pd.start_steps=4", "max_network_passes=96",
        "data.batch_size=4", "callbacks.evaluation=null", "logger=none", "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run}")
    results = json.loads((run / "results.json").read_text())
    assert (results["iterations"], results["network_passes"], results["stopped_early"]) == (6, 96, False)
    assert sorted(p.name for p in (run / "rounds").iterdir()) == ["1step", "2step"]


def _sweep_jobs(compose, config: str, sweep: str) -> list[dict]:
    """Every job of a sweep config's basic-sweeper grid, as {key: value} overrides."""
    import itertools

    params = compose(config, overrides=[f"+sweep={sweep}"], return_hydra_config=True).hydra.sweeper.params
    values = {k: v.replace("],[", "]|[").split("|") if "[" in v else v.split(",") for k, v in params.items()}
    return [dict(zip(values, combo)) for combo in itertools.product(*values.values())]


def test_every_job_of_the_methods_sweep_composes_and_validates():
    """conf/sweep/methods.yaml's 27 jobs, KD's and CD's one-step 3 + 3, are valid runs at the
    shared pass budget (PD's rounds are planned from it); conf/sweep/methods_cd_steps.yaml scores
    each seed's one-step CD run (the dir the training sweep names it) at 2 and 4 timesteps of its grid."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from dmd.methods.cd import grid_problems
    from dmd.validation import validate

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        jobs = _sweep_jobs(compose, "train", "methods")
        jobs += [{"experiment": e, "algorithm.generator_timesteps": "[999]", "seed": s}
                 for e in ("fmnist_kd", "fmnist_cd") for s in "012"]
        assert len(jobs) == 33
        for job in jobs:
            cfg = compose("train", overrides=["+sweep=methods", *(f"{k}={v}" for k, v in job.items())])
            validate(cfg, "train")
            assert cfg.max_network_passes == 150_000 and cfg.max_iterations >= 10**6, job
            assert OmegaConf.select(cfg, "algorithm.method") == job["experiment"].split("_")[1].replace("dmd2", "dmd")
        cd_grid = compose("train", overrides=["experiment=fmnist_cd"]).algorithm.cd.num_ode_steps
        scorings = _sweep_jobs(compose, "evaluate", "methods_cd_steps")
        assert sorted((j["train_seed"], j["timesteps"]) for j in scorings) == [
            (s, t) for s in "012" for t in ("[999,499]", "[999,749,499,249]")]
        for job in scorings:
            cfg = compose("evaluate", overrides=["+sweep=methods_cd_steps", *(f"{k}={v}" for k, v in job.items())])
            validate(cfg, "evaluate")
            assert cfg.ckpt == ("experiments/results/methods_sweep/algorithm.generator_timesteps=[999],"
                                f"experiment=fmnist_cd,seed={job['train_seed']}")
            assert grid_problems(list(cfg.timesteps), cd_grid) == [] and cfg.eval.num_samples == 1000


@pytest.mark.parametrize("preset, module, fake_score, sampling", [
    ("gmm_dmd2", "DMDModule", True, "fresh"), ("gmm_sid", "SiDModule", True, "fresh"),
    ("gmm_kd", "KDModule", False, "fresh"), ("gmm_cd", "CDModule", False, "fresh"),
    ("gmm_pd", "PDModule", False, "ddim")])
def test_each_method_builds_its_own_module_from_the_registry(tmp_path, preset, module, fake_score, sampling):
    """algorithm.method picks its LightningModule (dmd.methods.METHODS), which says what the shared
    builder makes for it: a fake score or none, the generator's sampling, the lengths it plans."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from dmd.build import build_module, student_init
    from dmd.rundir import planned_lengths

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={preset}", "algorithm.regression.num_pairs=64",
                                          "algorithm.regression.steps=2", f"paths.cache_dir={tmp_path}"])
    teacher = instantiate(cfg.teacher)
    built = build_module(cfg, teacher, student_init(teacher, cfg.init))
    assert type(built).__name__ == module
    assert (getattr(built, "fake_score", None) is not None) == fake_score
    assert built.generator.sampling == sampling
    assert bool(planned_lengths(cfg)) == (preset == "gmm_pd")
    if preset == "gmm_sid":  # SiD's loss and no GAN (algorithm/sid.yaml; gmm_dmd2, its base, sets none)
        assert built.alpha == cfg.algorithm.sid.alpha and not built.use_gan and built.gan_head is None


EVALUATOR = {"_target_": "dmd.metrics.Evaluator", "kid_subsets": 100, "cache_dir": "/cache/references"}


def _record(folder, method, seed, fid, status="completed", stopped_early=False, nfe=1, ttur_ratio=1):
    folder.mkdir(parents=True)
    folder.joinpath("results.json").write_text(json.dumps({
        "status": status, "stopped_early": stopped_early, "nfe": nfe, "iterations": 100, "network_passes": 480,
        "wall_seconds": 60.0, "metrics": {"fid_fmnist_vs_data": fid, "num_samples": 1000},
        "config": {"algorithm": {"method": method, "ttur_ratio": ttur_ratio}, "seed": seed, "eval": {"seed": 0, "evaluator": EVALUATOR}}}))


def _scored(folder, trained, nfe, fid, num_samples=1000, iterations=100, ckpt="run"):
    """A dmd.evaluate record of ``trained``'s generator at ``nfe`` timesteps (its seed is the eval stream's)."""
    folder.mkdir(parents=True)
    folder.joinpath("results.json").write_text(json.dumps({
        "model": "generator", "nfe": nfe, "num_samples": num_samples, "seed": 0, "wall_seconds": 5.0,
        "metrics": {"fid_fmnist_vs_data": fid, "num_samples": num_samples},
        "generator": {"path": str(trained), "timesteps": [999, 749, 499, 249][:nfe], "training": {
            "status": "completed", "iterations": iterations, "network_passes": 480}},
        "config": {"task_name": "evaluate", "ckpt": ckpt, "seed": 0,
                   "eval": {"evaluator": {**EVALUATOR, "cache_dir": "/elsewhere"}}}}))


def test_methods_table_averages_completed_runs_over_seeds_and_lists_the_rest(tmp_path, monkeypatch):
    """The table of the methods sweep: one row per (method, steps) with mean ± std over the
    completed runs' seeds; a run stopped early or failed is listed, never averaged in; a group
    whose generators are not on this machine (a sweep's committed records) gets no latency; a
    dmd.evaluate record of a run at other steps is a row of that run's method and seed, once,
    only while it scores the run as it stands under the run's own evaluation protocol. Latency
    is timed in rounds over the groups with a generator here, each group's median over rounds."""
    spec = importlib.util.spec_from_file_location("methods_table", ROOT / "experiments" / "methods_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    sweep = tmp_path / "sweep"
    _record(sweep / "sid_0", "sid", 0, 1.0)
    _record(sweep / "sid_1", "sid", 1, 2.0)
    _record(sweep / "dmd_0", "dmd", 0, 3.0)
    _record(sweep / "dmd_1", "dmd", 1, 9.0, stopped_early=True)
    _record(sweep / "dmd_2", "dmd", 2, 9.0, status="failed")
    _record(sweep / "dmd2_0", "dmd", 0, 2.5, ttur_ratio=5)  # DMD's loop at TTUR 5: DMD2's row
    (sweep / "cd_0" / ".hydra").mkdir(parents=True)  # a job still running: no results.json yet
    (sweep / "dmd_3").mkdir()  # one evaluated during training, not finished: no status yet
    (sweep / "dmd_3" / "results.json").write_text(json.dumps({"evaluations": [], "teacher_metrics": {}}))
    # CD trained once per seed, scored at 2 steps by dmd.evaluate: the training's seed and passes,
    # the evaluation's metrics; seed 1 also trained at 2 steps (the same network): its training
    # record counts, though the scoring sorts first.
    _record(sweep / "cd_1", "cd", 1, 7.0)
    _record(sweep / "cd_2", "cd", 2, 7.5)
    _record(sweep / "cd_2step_1", "cd", 1, 4.0, nfe=2)
    _scored(sweep / "a_scored" / "seed_1", sweep / "cd_1", 2, 3.5)
    _scored(sweep / "cd_steps" / "seed_2", sweep / "cd_2", 2, 6.0)
    _scored(sweep / "cd_steps" / "seed_2_4", sweep / "cd_2", 4, 5.0, iterations=50)  # the run was extended since
    _scored(sweep / "cd_steps" / "seed_2_4_10k", sweep / "cd_2", 4, 5.0, num_samples=10000)  # another protocol
    _scored(sweep / "cd_steps" / "seed_3", sweep / "cd_3", 2, 1.0)  # its training run is not here
    _scored(sweep / "cd_steps" / "teacher", sweep / "cd_2", 4, 1.0, ckpt=None)  # dmd.evaluate of the teacher
    (sweep / "dmd_0" / "generator").mkdir()  # released generators of two groups (loading faked)
    (sweep / "dmd2_0" / "generator").mkdir()
    monkeypatch.setattr(table, "load_generator", lambda *released: (torch.nn.Identity(), None))
    timings = iter([6.0, 10.0, 1.0, 20.0, 2.0, 30.0])  # in call order: dmd, dmd2, dmd, dmd2, ...
    monkeypatch.setattr(table, "latency_ms_per_image", lambda *args: next(timings))
    out = tmp_path / "table"
    monkeypatch.setattr(sys, "argv", ["methods_table.py", str(sweep), "--out", str(out)])
    table.main()
    rows = {r["method"] if r["steps"] == 1 else (r["method"], r["steps"]): r
            for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    cd2 = rows[("cd", 2)]
    assert cd2["seeds"] == [1, 2] and cd2["fid_fmnist_vs_data"] == [4.0, 6.0] and cd2["network_passes"] == [480, 480]
    assert rows["cd"]["seeds"] == [1, 2] and rows["cd"]["fid_fmnist_vs_data"] == [7.0, 7.5]
    assert rows["sid"]["fid_fmnist_vs_data"] == [1.0, 2.0] and rows["sid"]["seeds"] == [0, 1]
    assert rows["dmd"]["fid_fmnist_vs_data"] == [3.0] and rows["dmd"]["seeds"] == [0]
    assert rows["dmd2"]["fid_fmnist_vs_data"] == [2.5]
    assert rows["sid"]["latency_ms_per_image"] is None
    assert rows["dmd"]["latency_ms_per_image_rounds"] == [6.0, 1.0, 2.0] and rows["dmd"]["latency_ms_per_image"] == 2.0
    assert rows["dmd2"]["latency_ms_per_image"] == 20.0
    assert out.with_suffix(".png").stat().st_size > 0
    text = out.with_suffix(".md").read_text()
    assert "| sid | 1 | 1.500 ± 0.707 |" in text and "| dmd | 1 | 3.000 |" in text
    assert text.index("| dmd |") < text.index("| dmd2 |") < text.index("| sid |")
    assert "| 480 | 100 |" in text and "± 0 " not in text  # equal passes: no "± 0"
    assert "Not averaged in (9)" in text and "dmd_1: completed (stopped early)" in text and "dmd_2: failed" in text
    assert "cd_0: no results.json (still running" in text and "dmd_3: no final record yet" in text
    assert f"seed_1: seed 1 of cd at 2 steps again (counted once: {sweep / 'cd_2step_1'})" in text
    assert "seed_3: scores " in text and "cd_3: no results.json" in text
    assert ("cd", 4) not in rows and "seed_2_4: scored" in text and "score it again" in text
    assert "seed_2_4_10k: scored on 10000 samples, seed 0, not under the run's own evaluation (1000" in text
    assert "teacher: an evaluation of the teacher" in text
