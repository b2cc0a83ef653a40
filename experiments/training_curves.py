"""Training curves of dmd.train runs: a metric at every in-training evaluation, against the
teacher's yardstick at the same sample count (results.json ``teacher_metrics``).

    python experiments/training_curves.py "DMD2 1-step=outputs/L1" "DMD2 4-step=outputs/L4" \\
        --metric fid_fmnist_vs_data --out experiments/results/fmnist_gpu_tuning

Writes ``<out>.md`` (one row per run and evaluation: generator step, the metric, recall,
class consistency), ``<out>.json`` (the runs' commands, costs and evaluations) and ``<out>.png``
(the metric against generator steps, the teacher's value as a dashed line). ``--yardstick TABLE_JSON
ROW`` adds a row of an ``experiments/fmnist_table.py`` record (e.g. the teacher's best sampler) as a
dotted line; it should be scored on the same sample count as the runs' evaluations.

A branch (a run dir copied from another at some step and resumed with a change) holds its parent's
evaluations too: ``LABEL=RUN_DIR@STEP`` draws only its evaluations from generator step STEP on.
An evaluation repeated at one step (a release resume scores the last step again) counts once.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLUMNS = ("precision_fmnist_vs_data", "recall_fmnist_vs_data", "class_consistency")


def load(spec: str) -> dict:
    label, _, where = spec.partition("=")
    where, _, first = where.rpartition("@") if "@" in where else (where, "", "0")
    path = Path(where) / "results.json"
    if not label or not path.is_file() or not first.isdigit():
        raise SystemExit(f"{spec!r}: expected LABEL=RUN_DIR[@FIRST_STEP] with a results.json in RUN_DIR.")
    r = json.loads(path.read_text())
    evaluations = {}
    for e in r.get("evaluations", []):
        if e["generator_step"] >= int(first):
            evaluations.setdefault(e["generator_step"], e)
    return {"label": label, "dir": where, "from_step": int(first), "command": r.get("command"),
            "overrides": r.get("overrides"), "resumes": r.get("resumes", []),
            "wall_seconds": r.get("wall_seconds"), "generator_steps": r.get("generator_steps"),
            "evaluations": list(evaluations.values()), "teacher_metrics": r.get("teacher_metrics", {})}


def yardstick(table: str, row: str, metric: str) -> tuple[str, float]:
    """The label and ``metric`` of the row named ``row`` (its ``label`` or ``model``) of a table record."""
    path = Path(table)
    if not path.is_file():
        raise SystemExit(f"--yardstick {table!r}: no such file (an experiments/fmnist_table.py .json record).")
    rows = json.loads(path.read_text()).get("rows", [])
    names = [r.get("label") or r.get("model") for r in rows]
    match = [r for r, name in zip(rows, names) if name == row]
    if not match:
        raise SystemExit(f"--yardstick {table}: no row {row!r}; its rows are {names}.")
    value = match[0]["metrics"].get(metric)
    if value is None:
        raise SystemExit(f"--yardstick {table}: row {row!r} has no {metric}.")
    return f"{row} (n={match[0]['metrics'].get('num_samples')})", value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR[@FIRST_STEP]")
    p.add_argument("--metric", default="fid_fmnist_vs_data")
    p.add_argument("--out", default="experiments/results/training_curves")
    p.add_argument("--yardstick", nargs=2, action="append", default=[], metavar=("TABLE_JSON", "ROW"),
                   help="a row of an fmnist_table.py record drawn as a line (e.g. the teacher's best)")
    args = p.parse_args()
    sticks = [yardstick(table, row, args.metric) for table, row in args.yardstick]
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
    for (label, value), style in zip(sticks, itertools.cycle(("dotted", "dashdot", (0, (1, 3))))):
        ax.axhline(value, ls=style, color="gray", label=label)
        lines.append(f"{label}: {args.metric} {value:.3f}.")
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
