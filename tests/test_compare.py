"""Sweeps and their comparison: a toy multirun with wandb offline, dmd-compare over seeds, a
failed job reported without losing the others, and provenance in every results.json."""

import json
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT

from dmd.compare import compare

TOY = ["experiment=gmm_dmd2", "max_iterations=4", "data.num_samples=256", "data.batch_size=32",
       "eval.num_samples=200", "trainer.enable_progress_bar=false"]


def _fake_run(folder, ratio, seed, fid=None, status="completed"):
    folder.mkdir(parents=True)
    results = {"status": status, "overrides": ["experiment=x", f"algorithm.ttur_ratio={ratio}", f"seed={seed}"]}
    if fid is not None:
        results["metrics"] = {"fid": fid, "num_samples": 10}
        results["evaluations"] = [{"generator_step": s, "metrics": {"fid": fid + 10 / s}} for s in (1, 2)]
    else:
        results["error"] = "ValueError: boom"
    (folder / "results.json").write_text(json.dumps(results))


def test_compare_aggregates_over_seeds_and_reports_failures(tmp_path):
    _fake_run(tmp_path / "0", 1, 0, 2.0)
    _fake_run(tmp_path / "1", 1, 1, 4.0)
    _fake_run(tmp_path / "2", 5, 0, 1.0)
    _fake_run(tmp_path / "3", 5, 1, None, status="failed")
    c = compare([tmp_path])
    assert c.swept == ["algorithm.ttur_ratio"] and c.metrics == ["fid"]
    by_ratio = {g["params"]["algorithm.ttur_ratio"]: g for g in c.groups}
    assert by_ratio["1"]["n"] == 2 and by_ratio["1"]["stats"]["fid"][:2] == pytest.approx((3.0, 2 ** 0.5))
    assert by_ratio["5"]["n"] == 1 and by_ratio["5"]["failed"] == 1
    md = c.markdown()
    assert "| 1 | 2 | 3 ± 1.4 | 0 |" in md and "| 5 | 1 | 1 ± 0 | 1 |" in md
    assert "ValueError: boom" in md
    plots = c.plot(tmp_path / "cmp")
    assert {p.name for p in plots} == {"fid_vs_algorithm.ttur_ratio.png", "fid_vs_generator_step.png"}


@pytest.mark.slow
def test_toy_multirun_logs_to_wandb_offline_and_compares(cli, tmp_path):
    sweep = tmp_path / "sweep"
    cli("dmd.train", "-m", *TOY, "logger=wandb", "algorithm.ttur_ratio=1,2", "seed=0,1",
        f"hydra.sweep.dir={sweep}")
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(runs) == 4
    ids = set()
    for run in runs:
        results = json.loads((run / "results.json").read_text())
        assert results["status"] == "completed" and results["metrics"]
        prov = results["provenance"]
        assert len(prov["git"]["commit"]) == 40 and prov["packages"]["torch"]
        offline = list((run / "wandb").glob("offline-run-*"))
        assert len(offline) == 1  # every job finished its own wandb run
        media = offline[0] / "files" / "media"  # the callback's grid and metrics table
        assert list(media.glob("images/eval/samples_*.png")) and list(media.glob("table/eval/*.table.json"))
        ids.add(offline[0].name.rsplit("-", 1)[-1])
        # The run's config holds its overrides (what `dmd-compare --wandb` groups by). Offline,
        # wandb keeps the config only in its record file, where the JSON values are plain text.
        record = next(offline[0].glob("run-*.wandb")).read_bytes()
        assert b"overrides" in record and b"ttur_ratio" in record
        assert f'"seed={results["config"]["seed"]}"'.encode() in record
        logger = yaml.safe_load((run / "config_resolved.yaml").read_text())["logger"]
        assert logger["group"] == "gmm_dmd2" and logger["offline"] is True
    assert len(ids) == 4
    proc = subprocess.run([sys.executable, "-m", "dmd.compare", str(sweep)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| algorithm.ttur_ratio | n |" in proc.stdout and "| 2 | 2 |" in proc.stdout
    assert (sweep / "comparison" / "comparison.md").is_file()
    assert len(list((sweep / "comparison").glob("*_vs_generator_step.png"))) >= 1


class _FakeWandbRun:
    """What dmd.wandb_runs reads of a ``wandb.apis.public.Run``."""

    def __init__(self, ratio, seed, fid, state="finished"):
        self.path = ["me", "dmd", f"r{ratio}s{seed}"]
        self.state = state
        self.config = {"overrides": [f"algorithm.ttur_ratio={ratio}", f"seed={seed}"]}
        self.summary = {"eval/fid": fid, "eval/generator_step": 2, "eval/teacher/fid": 9.0, "loss": 1.0}
        self.rows = [{"loss": 1.0}, {"eval/generator_step": 1, "eval/fid": fid + 5},
                     {"eval/generator_step": 2, "eval/fid": fid}]

    def scan_history(self):
        return iter(self.rows)


class _FakeWandbApi:
    def __init__(self, runs):
        self._runs, self.asked = runs, []

    def runs(self, path, filters=None):
        self.asked.append((path, filters))
        return [r for r in self._runs if filters == {"group": "abl"}]


def test_compare_pulls_a_wandb_group_through_the_public_api():
    from dmd.wandb_runs import group_runs

    api = _FakeWandbApi([_FakeWandbRun(1, 0, 2.0), _FakeWandbRun(1, 1, 4.0),
                         _FakeWandbRun(5, 0, 1.0), _FakeWandbRun(5, 1, 0.0, state="crashed")])
    c = compare(runs=group_runs("me/dmd", "abl", api=api))
    assert api.asked == [("me/dmd", {"group": "abl"})]
    assert c.swept == ["algorithm.ttur_ratio"] and c.metrics == ["fid"]  # no teacher/counter keys
    md = c.markdown()
    assert "| 1 | 2 | 3 ± 1.4 | 0 |" in md and "| 5 | 1 | 1 ± 0 | 1 |" in md and "wandb state crashed" in md
    assert [e["generator_step"] for e in c.runs[0]["evaluations"]] == [1, 2]
    with pytest.raises(LookupError, match="No wandb runs in group 'other'"):
        group_runs("me/dmd", "other", api=api)


@pytest.mark.slow
def test_a_failed_job_is_recorded_and_the_sweep_goes_on(cli, tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli("dmd.train", "-m", *TOY, "logger=none", "algorithm.ttur_ratio=0,2",
               f"hydra.sweep.dir={sweep}", check=False)
    assert "algorithm.ttur_ratio=0: must be a whole number >= 1" in proc.stderr
    failed = json.loads((sweep / "0" / "results.json").read_text())
    assert failed["status"] == "failed" and "algorithm.ttur_ratio=0: must be" in failed["error"]
    assert json.loads((sweep / "1" / "results.json").read_text())["status"] == "completed"
    md = compare([sweep]).markdown()
    assert "| 0 | 0 |" in md and "| 2 | 1 |" in md and "Failed:" in md


@pytest.mark.slow
def test_the_same_toy_job_twice_gives_identical_metrics(cli, tmp_path):
    metrics = []
    for name in ("a", "b"):
        cli("dmd.train", *TOY, "logger=none", "seed=3", f"hydra.run.dir={tmp_path / name}")
        metrics.append(json.loads((tmp_path / name / "results.json").read_text())["metrics"])
    assert metrics[0] == metrics[1]


@pytest.mark.parametrize("sweep", ["ttur", "gan_weight", "guidance", "lr", "regression", "seeds",
                                   "dmd2_ablation"])
def test_sweep_presets_compose(sweep):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"+sweep={sweep}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert "seed" in params and len(params) >= 1
    if sweep == "dmd2_ablation":  # every experiment it names exists and has the intended recipe
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            recipes = {e: compose("train", overrides=[f"experiment={e}"]).algorithm
                       for e in params.experiment.split(",")}
        reg, ratio, gan = ({e: f(a) for e, a in recipes.items()} for f in (
            lambda a: a.regression.weight > 0, lambda a: a.ttur_ratio, lambda a: a.gan.generator_weight > 0))
        assert reg == {"fmnist_dmd": True, "abl_no_regression": False, "abl_ttur": False,
                       "fmnist_dmd2": False, "abl_gan_only": False}
        assert ratio["abl_no_regression"] == 1 and ratio["abl_ttur"] == 5 and gan["fmnist_dmd2"]
        assert not gan["abl_ttur"] and recipes["abl_gan_only"].dm_weight == 0


def test_launchers_compose_and_the_slurm_launcher_instantiates():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        slurm = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
        local = compose("train", overrides=["hydra/launcher=local_parallel"], return_hydra_config=True)
    assert type(instantiate(slurm.hydra.launcher)).__name__ == "SlurmLauncher"
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        multi = compose("train", overrides=["hydra/launcher=slurm_multi_gpu", "hydra.launcher.nodes=4"],
                        return_hydra_config=True).hydra.launcher
    assert type(instantiate(multi)).__name__ == "SlurmLauncher"
    assert (multi.nodes, multi.gpus_per_node, multi.tasks_per_node) == (4, 8, 8)  # one task per GPU
    assert slurm.hydra.launcher.gpus_per_node == 1
    assert local.hydra.launcher._target_.endswith("JoblibLauncher")


@pytest.mark.slow
def test_a_sweep_preset_runs_as_a_multirun(cli, tmp_path):
    cli("dmd.train", "-m", "+sweep=seeds", *TOY, "logger=none", f"hydra.sweep.dir={tmp_path}")
    seeds = sorted(json.loads((tmp_path / str(i) / "results.json").read_text())["config"]["seed"]
                   for i in range(3))
    assert seeds == [0, 1, 2]


def test_compare_goes_on_past_unreadable_records_and_runs_with_other_keys(tmp_path):
    _fake_run(tmp_path / "0", 1, 0, 2.0)
    _fake_run(tmp_path / "1", 1, 1, 4.0)
    (tmp_path / "2").mkdir()  # differs from the others by one more override
    (tmp_path / "2" / "results.json").write_text(json.dumps(
        {"status": "completed", "overrides": ["experiment=x", "algorithm.ttur_ratio=1", "seed=0", "optim.lr_fake=1e-3"],
         "metrics": {"fid": 1.0}}))
    _fake_run(tmp_path / "3", 5, 0, 3.0)
    whole = (tmp_path / "3" / "results.json").read_text()
    (tmp_path / "3" / "results.json").write_text(whole[: len(whole) // 2])  # cut off mid-write
    (tmp_path / "4").mkdir()
    (tmp_path / "4" / "results.json").write_text("[1, 2]")
    out = tmp_path / "cmp"
    from dmd.compare import main

    main([str(tmp_path), "--out", str(out)])
    md = (out / "comparison.md").read_text()
    assert "| - | 2 | 3 ± 1.4 | 0 |" in md and "| 1e-3 | 1 | 1 ± 0 | 0 |" in md
    assert f"Skipped: {tmp_path / '3'} (unreadable): {tmp_path / '3' / 'results.json'}: " in md
    assert f"Skipped: {tmp_path / '4'} (unreadable)" in md and "expected a JSON object, found a list" in md
