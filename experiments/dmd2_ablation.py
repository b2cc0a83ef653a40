"""The DMD2 ablation on Fashion-MNIST, as a paper-style table beside the papers' ImageNet-64 rows.

    OMP_NUM_THREADS=1 python -m dmd.train -m +sweep=dmd2_ablation hydra/launcher=local_parallel \\
        hydra.sweep.dir=outputs/ablation/dmd2_ablation
    python experiments/dmd2_ablation.py outputs/ablation/dmd2_ablation

Reads the sweep's results.json files with ``dmd.compare`` (mean ± std over the seeds), orders
the rows as DMD2's ablation does, and writes ``experiments/results/dmd2_ablation.{md,json}``
plus the comparison plots (``experiments/results/dmd2_ablation/``). The ImageNet column is for
reference only: another dataset, another metric scale, and runs thousands of times longer.
"""

from __future__ import annotations

import json
from pathlib import Path

from dmd.compare import stat_cells, sweep_report_args

# (experiment, row label, ImageNet-64 FID reported by the DMD2 authors or "-" when not quoted here)
ROWS = [
    ("fmnist_dmd", "DMD (ratio 1, regression)", "2.62"),
    ("abl_no_regression", "w/o regression", "-"),
    ("abl_ttur", "w/o regression + TTUR 5", "2.61"),
    ("fmnist_dmd2", "w/o regression + TTUR 5 + GAN (DMD2)", "1.51"),
    ("abl_gan_only", "GAN loss only (no distribution matching), TTUR 5", "-"),
]
METRICS = ["fid_fmnist_vs_data", "fid_fmnist_resnet_vs_data", "fid_fmnist_vs_teacher", "kid_fmnist_vs_data",
           "precision_fmnist_vs_data", "recall_fmnist_vs_data", "class_consistency"]


def main() -> None:
    c, out = sweep_report_args(__doc__.split("\n\n")[0], METRICS)
    by_experiment = {g["params"]["experiment"]: g for g in c.groups}
    head = ["row", "experiment", "n", *(f"{m} (mean ± std)" for m in METRICS), "failed", "ImageNet-64 FID (paper)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for experiment, label, paper in ROWS:
        g = by_experiment.get(experiment, {"n": 0, "failed": 0, "stats": {}})
        cells = [label, f"`{experiment}`", str(g["n"]), *stat_cells(g, METRICS)]
        lines += ["| " + " | ".join([*cells, str(g["failed"]), paper]) + " |"]
    table = "\n".join(lines)
    runs = [json.loads((Path(r["dir"]) / "results.json").read_text()) for r in c.runs
            if (Path(r["dir"]) / "results.json").is_file()]
    summary = [{"experiment": r.get("experiment"), "overrides": r.get("overrides"), "status": r.get("status"),
                "metrics": r.get("metrics"), "evaluations": r.get("evaluations"),
                "teacher_metrics": r.get("teacher_metrics"), "iterations": r.get("iterations"),
                "generator_steps": r.get("generator_steps"), "wall_seconds": r.get("wall_seconds"),
                "provenance": r.get("provenance")} for r in runs]
    yardstick = next((r["teacher_metrics"] for r in runs if r.get("teacher_metrics")), {})
    text = (f"{table}\n\nTeacher (Heun 8, CFG 2) at the same 1000 samples: fid_fmnist_vs_data "
            f"{yardstick.get('teacher/fid_fmnist_vs_data', float('nan')):.3f}, class consistency "
            f"{yardstick.get('teacher/class_consistency', float('nan')):.3f}.\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "dmd2_ablation.md").write_text(text)
    (out / "dmd2_ablation.json").write_text(json.dumps({"rows": ROWS, "groups": c.groups, "runs": summary}, indent=1))
    c.plot(out / "dmd2_ablation")
    print(text)


if __name__ == "__main__":
    main()
