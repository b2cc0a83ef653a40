"""Training curves of dmd.train runs: a metric at every in-training evaluation, against the
teacher's yardstick at the same sample count (results.json ``teacher_metrics``).

    python experiments/training_curves.py "DMD2 1-step=outputs/L1" "DMD2 4-step=outputs/L4" \\
        --metric fid_fmnist_vs_data --out experiments/results/fmnist_gpu_tuning

Writes ``<out>.md`` (one row per run and evaluation: generator step, the metric, recall,
class consistency), ``<out>.json`` (the runs' commands, costs and evaluations) and ``<out>.png``
(the metric against generator steps, the teacher's value as a dashed line).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLUMNS = ("precision_fmnist_vs_data", "recall_fmnist_vs_data", "class_consistency")


def load(spec: str) -> dict:
    label, _, where = spec.partition("=")
    path = Path(where) / "results.json"
    if not label or not path.is_file():
        raise SystemExit(f"{spec!r}: expected LABEL=RUN_DIR with a results.json in RUN_DIR.")
    r = json.loads(path.read_text())
    return {"label": label, "dir": where, "command": r.get("command"), "overrides": r.get("overrides"),
            "wall_seconds": r.get("wall_seconds"), "generator_steps": r.get("generator_steps"),
            "evaluations": r.get("evaluations", []), "teacher_metrics": r.get("teacher_metrics", {})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    p.add_argument("--metric", default="fid_fmnist_vs_data")
    p.add_argument("--out", default="experiments/results/training_curves")
    args = p.parse_args()
    runs = [load(s) for s in args.runs]
    out = Path(args.out)
    head = ["run", "generator step", args.metric, *COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        steps = [e["generator_step"] for e in r["evaluations"]]
        values = [e["metrics"].get(args.metric) for e in r["evaluations"]]
        ax.plot(steps, values, marker="o", label=r["label"])
        for e in r["evaluations"]:
            m = e["metrics"]
            lines.append("| " + " | ".join([r["label"], str(e["generator_step"]),
                                            *(f"{m[k]:.3f}" if k in m else "-" for k in (args.metric, *COLUMNS))]) + " |")
    teacher = next((r["teacher_metrics"].get(f"teacher/{args.metric}") for r in runs
                    if r["teacher_metrics"].get(f"teacher/{args.metric}") is not None), None)
    if teacher is not None:
        ax.axhline(teacher, ls="--", color="k", label="teacher reference (Heun 8, CFG 2), same n")
        lines += ["", f"Teacher reference (Heun 8, CFG 2) at the same sample count: {args.metric} {teacher:.3f}."]
    ax.set_xlabel("generator step")
    ax.set_ylabel(args.metric)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(runs, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
