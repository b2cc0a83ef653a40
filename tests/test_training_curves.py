"""experiments/training_curves.py: the runs' curves and the lines drawn beside them."""

import importlib.util
import json
import sys

import pytest
from conftest import ROOT


@pytest.fixture(scope="module")
def curves():
    spec = importlib.util.spec_from_file_location("training_curves", ROOT / "experiments" / "training_curves.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path, curves, *argv):
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    evals = [{"generator_step": s, "metrics": {"fid_fmnist_vs_data": f, "recall_fmnist_vs_data": 0.5}}
             for s, f in ((100, 3.0), (200, 2.0))]
    (run / "results.json").write_text(json.dumps({"evaluations": evals, "teacher_metrics": {
        "teacher/fid_fmnist_vs_data": 1.5}}))
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"rows": [
        {"model": "teacher ddim 32, CFG 2", "label": "teacher ddim 32, CFG 2",
         "metrics": {"fid_fmnist_vs_data": 0.6, "num_samples": 1000}},
        {"model": "teacher heun 8, CFG 2", "metrics": {"fid_fmnist_vs_data": 1.4, "num_samples": 1000}}]}))
    out = tmp_path / "curves"
    old = sys.argv
    sys.argv = ["training_curves.py", f"A={run}", "--out", str(out), *(a.replace("TABLE", str(table)) for a in argv)]
    try:
        curves.main()
    finally:
        sys.argv = old
    return out


def test_a_table_row_is_drawn_and_written_beside_the_runs(tmp_path, curves):
    out = _run(tmp_path, curves, "--yardstick", "TABLE", "teacher ddim 32, CFG 2",
               "--yardstick", "TABLE", "teacher heun 8, CFG 2")
    md = out.with_suffix(".md").read_text()
    assert "| A | 200 | 2.000 |" in md
    assert "Teacher reference (Heun 8, CFG 2) at the same sample count: fid_fmnist_vs_data 1.500." in md
    assert "teacher ddim 32, CFG 2 (n=1000): fid_fmnist_vs_data 0.600." in md
    assert "teacher heun 8, CFG 2 (n=1000): fid_fmnist_vs_data 1.400." in md
    assert out.with_suffix(".png").stat().st_size > 0


def test_a_branch_is_drawn_from_its_branch_point_and_a_repeated_step_counts_once(tmp_path, curves):
    run = tmp_path / "branch"
    run.mkdir()
    evals = [{"generator_step": s, "metrics": {"fid_fmnist_vs_data": f}}
             for s, f in ((100, 3.0), (200, 2.0), (300, 1.5), (300, 1.5))]  # 100: the parent's
    (run / "results.json").write_text(json.dumps({"evaluations": evals}))
    r = curves.load(f"B={run}@200")
    assert [e["generator_step"] for e in r["evaluations"]] == [200, 300] and r["from_step"] == 200
    assert [e["generator_step"] for e in curves.load(f"B={run}")["evaluations"]] == [100, 200, 300]
    with pytest.raises(SystemExit, match="FIRST_STEP"):
        curves.load(f"B={run}@two")


def test_a_missing_row_names_the_rows_there_are(tmp_path, curves):
    with pytest.raises(SystemExit, match=r"no row 'teacher ddim 64, CFG 2'.*teacher ddim 32, CFG 2"):
        _run(tmp_path, curves, "--yardstick", "TABLE", "teacher ddim 64, CFG 2")
