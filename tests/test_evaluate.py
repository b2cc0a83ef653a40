"""``python -m dmd.evaluate`` and the paper-style table command, on tiny settings."""

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import ROOT

# A small teacher reference (10k Heun samples would take half an hour on a CPU).
TINY_EVAL = ["eval.num_samples=40", "eval.evaluator.references.teacher.num_samples=40",
             "eval.evaluator.references.teacher.sampler=ddim",
             "eval.evaluator.references.teacher.steps=2", "eval.evaluator.kid_subsets=2",
             "latency.batch_sizes=[1,8]", "latency.repeats=2", "latency.warmup=1"]
STUDENT = ROOT / "experiments" / "checkpoints" / "fmnist_dmd2_1step"


@pytest.mark.slow
def test_evaluate_a_teacher_setting_and_a_generator(cli, tmp_path):
    cache = f"paths.cache_dir={tmp_path}/cache"
    cli("dmd.evaluate", *TINY_EVAL, "sampler.name=ddim", "sampler.steps=2", cache,
        f"hydra.run.dir={tmp_path}/teacher")
    teacher = json.loads((tmp_path / "teacher" / "results.json").read_text())
    assert teacher["nfe"] == 4 and teacher["model"] == "teacher ddim 2 steps, CFG 2"
    assert set(teacher["latency_ms_per_image"]) == {"1", "8"}
    assert all(v > 0 for v in teacher["network_forward_ms_per_image"].values())
    # The teacher at its reference setting (another seed) is close to its own reference.
    assert teacher["metrics"]["fid_fmnist_vs_teacher"] < teacher["metrics"]["fid_fmnist_vs_data"]
    assert "teacher/class_consistency" in teacher["teacher_metrics"]
    row = (tmp_path / "teacher" / "results.md").read_text().splitlines()
    assert row[0].startswith("| model | NFE | fid_fmnist_vs_data") and "teacher ddim 2 steps" in row[2]

    refs = sorted((tmp_path / "cache" / "references").glob("*.safetensors"))
    written = [p.stat().st_mtime_ns for p in refs]
    cli("dmd.evaluate", *TINY_EVAL, f"ckpt={STUDENT}", cache, f"hydra.run.dir={tmp_path}/student")
    student = json.loads((tmp_path / "student" / "results.json").read_text())
    assert student["nfe"] == 1 and (tmp_path / "student" / "samples.png").is_file()
    # The references were computed once, by the first run, and reused (not rewritten) by the second.
    # (data and teacher, each in both feature spaces: fmnist and fmnist_resnet)
    assert sorted((tmp_path / "cache" / "references").glob("*.safetensors")) == refs and len(refs) == 4
    assert [p.stat().st_mtime_ns for p in refs] == written
    # The teacher's yardstick is measured on as many samples as the model's.
    assert student["teacher_metrics"] == teacher["teacher_metrics"]
    assert all(v > 0 for v in student["latency_ms_per_image"].values())  # speed: benchmarks only


@pytest.mark.slow
def test_evaluate_a_2d_teacher_with_the_mixture_oracle(cli, tmp_path):
    cli("dmd.evaluate", "data=gmm8", "teacher=gmm8", "eval=mixture", "sampler=ddim",
        "sampler.steps=8", "eval.num_samples=2000", "latency.batch_sizes=[1]", "latency.repeats=2",
        f"hydra.run.dir={tmp_path}/gmm")
    r = json.loads((tmp_path / "gmm" / "results.json").read_text())
    assert r["nfe"] == 8 and len(r["metrics"]["mode_shares"]) == 8
    assert r["metrics"]["min_mode_share"] > 0.08 and r["metrics"]["energy_distance"] < 0.05


@pytest.mark.slow
def test_table_command_writes_rows_and_the_targets(tmp_path):
    out = tmp_path / "table"
    overrides = [o.replace("eval.num_samples=40", "eval.num_samples=10") for o in TINY_EVAL[1:5]]
    command = [sys.executable, "experiments/fmnist_table.py", "--num-samples", "40", "--teacher-steps",
               "1", "--teacher-heun", "--generator", f"DMD2 1-step={STUDENT}", "--repeats", "1",
               "--large-batch", "4", "--out", str(out), "--override", f"paths.cache_dir={tmp_path}/c",
               *overrides]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = out.with_suffix(".md").read_text()
    assert "| teacher ddim 1, CFG 1 |" in md and "| DMD2 1-step" in md
    assert "Targets (issue 13):" in md and md.count("- met:") + md.count("- MISSED:") == 7
    report = json.loads(out.with_suffix(".json").read_text())
    assert [r["label"] for r in report["rows"]] == ["teacher ddim 1, CFG 1", "teacher ddim 1, CFG 2",
                                                    "DMD2 1-step"]
    assert report["rows"][-1]["training"]["generator_steps"] > 0
    assert len(list((tmp_path / "table_samples").glob("*.png"))) == 3

    # Rerun (e.g. after an interruption): every saved row is reused, not measured again.
    saved = {p: p.stat().st_mtime_ns for p in (tmp_path / "table_rows").glob("*.json")}
    assert len(saved) == 3
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads(out.with_suffix(".json").read_text())
    assert again["rows_reused"] == [r["label"] for r in report["rows"]]
    assert [r["metrics"] for r in again["rows"]] == [r["metrics"] for r in report["rows"]]
    assert again["rows"][-1]["training"] == report["rows"][-1]["training"]
    assert {p: p.stat().st_mtime_ns for p in saved} == saved


def test_a_table_row_is_reused_only_for_the_same_model_and_protocol(tmp_path):
    spec = importlib.util.spec_from_file_location("fmnist_table", ROOT / "experiments" / "fmnist_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    load_row, row_key = table.load_row, table.row_key

    teacher = {"label": "teacher ddim 8, CFG 2", "sampler": "ddim", "steps": 8, "cfg": 2.0, "weights": "a"}
    protocol = {"num_samples": 10000, "seed": 0, "eval": {"evaluator": {"kid_subsets": 100}}}
    key = row_key(teacher, protocol)
    path = tmp_path / "row.json"
    path.write_text(json.dumps({"key": key, "row": {"label": teacher["label"], "nfe": 16}}))
    assert load_row(path, row_key(dict(teacher), dict(protocol))) == {"label": teacher["label"], "nfe": 16}
    for changed_model in ({"steps": 16}, {"cfg": 1.0}, {"weights": "b"}):
        assert load_row(path, row_key({**teacher, **changed_model}, protocol)) is None
    for changed_protocol in ({"num_samples": 1000}, {"seed": 1}, {"eval": {"evaluator": {"kid_subsets": 2}}}):
        assert load_row(path, row_key(teacher, {**protocol, **changed_protocol})) is None
    path.write_text("{trunc")  # an unreadable row (e.g. a disk filled) is measured again
    assert load_row(path, key) is None and load_row(tmp_path / "missing.json", key) is None
    path.write_text("[1, 2]")
    assert load_row(path, key) is None

    # What main() keys rows with: the teacher (its reference set is every row's 'vs teacher'),
    # the seed, the evaluation config; a generator's every file.
    import shutil
    from types import SimpleNamespace


    evaluator = SimpleNamespace(weights_digests=lambda: {"fmnist": "e"})
    args = SimpleNamespace(num_samples=40, seed=0, large_batch=4, repeats=1)
    base = table.protocol_of(args, table.compose_evaluate(), evaluator, "w")
    assert table.protocol_of(args, table.compose_evaluate(), evaluator, "w") == base
    assert table.protocol_of(SimpleNamespace(**{**vars(args), "seed": 1}), table.compose_evaluate(), evaluator, "w") != base
    assert table.protocol_of(args, table.compose_evaluate(), evaluator, "other teacher weights") != base
    for override in ("teacher.path=/elsewhere/teacher", "eval.evaluator.kid_subsets=2"):
        assert table.protocol_of(args, table.compose_evaluate([override]), evaluator, "w") != base
    folder = tmp_path / "student"
    shutil.copytree(STUDENT, folder)
    identity = table.generator_identity(folder)
    meta = json.loads((folder / "generator.json").read_text())
    (folder / "generator.json").write_text(json.dumps({**meta, "timesteps": [999, 499]}))
    assert table.generator_identity(folder) != identity


@pytest.mark.slow
def test_table_command_refuses_a_missing_generator(tmp_path):
    proc = subprocess.run([sys.executable, "experiments/fmnist_table.py", "--generator",
                           f"DMD=/{tmp_path}/nope"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "LABEL=RUN_DIR" in proc.stderr


def test_every_evaluation_path_scores_samples_against_the_labels_they_were_drawn_for(tmp_path):
    """A generator that answers each label with a real test image of that class scores class
    consistency 1 through dmd.sample/evaluate's draw, evaluate_model and the training callback;
    a label shifted by one anywhere on the way would score 0."""
    from types import SimpleNamespace

    import torch
    from diffusers import DDPMScheduler

    from dmd.callbacks.evaluation import EvaluationCallback
    from dmd.data.fmnist import load_fashion_mnist
    from dmd.denoisers import Denoiser
    from dmd.draw import sample_generator
    from dmd.evaluation import evaluate_model, generator_model
    from dmd.generator import Generator
    from dmd.metrics.extractors import FMNISTFeatures
    from dmd.schedule import VPSchedule
    from dmd.teachers import Teacher

    images, labels = load_fashion_mnist("test")
    images = images[:300].float() / 127.5 - 1  # samples are images in [-1, 1]
    classifier = FMNISTFeatures()
    predicted = classifier(images)[1].argmax(1)
    # One real image per class that the classifier gets right: the sample drawn for that class.
    prototypes = torch.stack([images[(labels[:300] == c) & (predicted == c)][0] for c in range(10)])

    class Prototypes(Denoiser):
        def network_output(self, x_t, t, cond):
            return prototypes[cond] + 0 * x_t

    info = Teacher(Prototypes(VPSchedule.from_diffusers(DDPMScheduler()), "sample"), (1, 28, 28), num_classes=10)
    generator = Generator(info.denoiser, (999,))

    def consistency(samples, drawn_for, prompts=None):
        return {"class_consistency": (classifier(samples)[1].argmax(1) == drawn_for).float().mean().item()}

    samples, drawn_for = sample_generator(generator, info, 60, batch_size=25, device="cpu", progress=False)
    assert torch.equal(drawn_for, torch.arange(60) % 10)
    assert consistency(samples, drawn_for)["class_consistency"] == 1.0
    result, _ = evaluate_model(generator_model(generator, info), consistency, 60, batch_size=25,
                               latency_batch_sizes=(1,), repeats=1, warmup=0, device="cpu", progress=False)
    assert result["metrics"]["class_consistency"] == 1.0

    class Evaluator:  # the callback's view of an evaluator
        teacher = info
        __call__ = staticmethod(consistency)

        def teacher_metrics(self, n):
            return {}

    callback = EvaluationCallback(Evaluator(), num_samples=60, grid_size=10, batch_size=25)
    module = SimpleNamespace(generator_steps=1, iteration=1, teacher=info, device=torch.device("cpu"),
                             release_generator=lambda: generator)
    trainer = SimpleNamespace(global_rank=0, default_root_dir=str(tmp_path), loggers=[], global_step=1)
    assert callback.evaluate(trainer, module)["class_consistency"] == 1.0


def test_a_score_records_the_training_it_belongs_to_or_refuses_an_unreadable_record(tmp_path):
    """dmd.evaluate of a run dir records the run's status, iterations and passes beside the score
    (methods_table tells a score of the run as it stands from a stale one); a bare generator
    folder has none; a run whose results.json is unreadable is refused before any sampling,
    naming the file and the fix, rather than scored as if it had no training."""
    from dmd.evaluate import scored_generator

    assert "training" not in scored_generator(tmp_path, [999])
    (tmp_path / "results.json").write_text(json.dumps({"status": "completed", "iterations": 7,
                                                       "network_passes": 96, "metrics": {}}))
    scored = scored_generator(tmp_path, [999, 499])
    assert scored == {"path": str(tmp_path.resolve()), "timesteps": [999, 499],
                      "training": {"status": "completed", "iterations": 7, "network_passes": 96}}
    (tmp_path / "results.json").write_text('{"status": "compl')
    with pytest.raises(ValueError, match=r"results.json is unreadable .*ckpt=.*generator"):
        scored_generator(tmp_path, [999])
