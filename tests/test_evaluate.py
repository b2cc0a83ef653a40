"""``python -m dmd.evaluate`` and the paper-style table command, on tiny settings."""

import json
import subprocess
import sys

from conftest import ROOT

# A small teacher reference (10k Heun samples would take half an hour on a CPU).
TINY_EVAL = ["eval.num_samples=40", "eval.evaluator.references.teacher.num_samples=40",
             "eval.evaluator.references.teacher.sampler=ddim",
             "eval.evaluator.references.teacher.steps=2", "eval.evaluator.kid_subsets=2",
             "latency.batch_sizes=[1,8]", "latency.repeats=2", "latency.warmup=1"]
STUDENT = ROOT / "experiments" / "checkpoints" / "fmnist_dmd2_1step"


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


def test_evaluate_a_2d_teacher_with_the_mixture_oracle(cli, tmp_path):
    cli("dmd.evaluate", "data=gmm8", "teacher=gmm8", "eval=mixture", "sampler=ddim",
        "sampler.steps=8", "eval.num_samples=2000", "latency.batch_sizes=[1]", "latency.repeats=2",
        f"hydra.run.dir={tmp_path}/gmm")
    r = json.loads((tmp_path / "gmm" / "results.json").read_text())
    assert r["nfe"] == 8 and len(r["metrics"]["mode_shares"]) == 8
    assert r["metrics"]["min_mode_share"] > 0.08 and r["metrics"]["energy_distance"] < 0.05


def test_table_command_writes_rows_and_the_targets(tmp_path):
    out = tmp_path / "table"
    overrides = [o.replace("eval.num_samples=40", "eval.num_samples=10") for o in TINY_EVAL[1:5]]
    proc = subprocess.run(
        [sys.executable, "experiments/fmnist_table.py", "--num-samples", "40", "--teacher-steps",
         "1", "--teacher-heun", "--generator", f"DMD2 1-step={STUDENT}", "--repeats", "1",
         "--large-batch", "4", "--out", str(out), "--override", f"paths.cache_dir={tmp_path}/c",
         *overrides], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = out.with_suffix(".md").read_text()
    assert "| teacher ddim 1, CFG 1 |" in md and "| DMD2 1-step" in md
    assert "Targets (issue 13):" in md and md.count("- met:") + md.count("- MISSED:") == 7
    report = json.loads(out.with_suffix(".json").read_text())
    assert [r["label"] for r in report["rows"]] == ["teacher ddim 1, CFG 1", "teacher ddim 1, CFG 2",
                                                    "DMD2 1-step"]
    assert report["rows"][-1]["training"]["generator_steps"] > 0
    assert len(list((tmp_path / "table_samples").glob("*.png"))) == 3


def test_table_command_refuses_a_missing_generator(tmp_path):
    proc = subprocess.run([sys.executable, "experiments/fmnist_table.py", "--generator",
                           f"DMD=/{tmp_path}/nope"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "LABEL=RUN_DIR" in proc.stderr
