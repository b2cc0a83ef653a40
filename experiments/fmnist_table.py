"""The DMD/DMD2-style table on Fashion-MNIST: the teacher at many NFE against the distilled students.

    python experiments/fmnist_table.py --num-samples 10000 \
        --generator "DMD 1-step=outputs/table/fmnist_dmd" \
        --generator "DMD2 1-step=outputs/table/fmnist_dmd2" \
        --generator "DMD2 4-step=outputs/table/fmnist_dmd2_4step"

Rows: the teacher with DDIM (Euler for a flow-matching teacher) at 1, 2, 4, 8, 16, 32 steps at
each CFG scale of ``--cfg`` (default 1 and 2), the
Heun settings of ``--teacher-heun`` (its best is taken over all teacher rows), and each
generator. Columns: NFE, fid_fmnist vs the test split and vs the teacher's reference samples
(Heun 8, CFG 2, 10k; conf/eval/fmnist.yaml), kid_fmnist vs data, class consistency, ms/image
at batch 1 and at a large batch (warm median), speed-up against the teacher's best row. The
issue's targets are checked and written below the table. Everything comes from
:func:`dmd.evaluation.evaluate_model` with the evaluator composed from ``conf/evaluate.yaml``.
Writes ``<out>.json`` and ``<out>.md`` (and a picture of each row's first samples).

Each finished row is also saved in ``<out>_rows/`` with a key of what its numbers depend on
(:func:`protocol_of`, :func:`generator_identity`): rerunning an interrupted table (a 10k teacher
grid takes hours on a CPU) reuses the rows whose key matches and computes the rest. Code is not in
the key (each row records the commit that measured it): after a change to sampling or metric code,
``--fresh`` recomputes every row.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dmd import ROOT_DIR
from dmd.draw import default_device
from dmd.evaluation import evaluate_model, generator_model, teacher_model
from dmd.files import atomic_path
from dmd.generator import GENERATOR_FILE, load_generator
from dmd.latency import device_name
from dmd.provenance import run_provenance
from dmd.teachers import weights_digest
from dmd.visualize import save_sample_grid

FID_DATA, FID_TEACHER = "fid_fmnist_vs_data", "fid_fmnist_vs_teacher"
FID2_DATA = "fid_fmnist_resnet_vs_data"  # the second, independent feature space
KID_DATA, CC = "kid_fmnist_vs_data", "class_consistency"
PRECISION, RECALL = "precision_fmnist_vs_data", "recall_fmnist_vs_data"


def compose_evaluate(overrides=()):
    with initialize_config_dir(str(ROOT_DIR / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


def teacher_settings(steps, cfg_scales, heun):
    rows = [("ddim", k, w) for w in cfg_scales for k in steps]
    return rows + [(n, int(k), float(w)) for n, k, w in (h.split(":") for h in heun)]


def row_key(identity: dict, protocol: dict) -> str:
    """sha256 of what a row's numbers depend on: the model (``identity``: network weights and
    sampler or generator settings) and the measurement (``protocol``)."""
    return hashlib.sha256(json.dumps([identity, protocol], sort_keys=True).encode()).hexdigest()


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", label).strip("_")


def load_row(path: Path, key: str) -> dict | None:
    """The saved row at ``path`` if it was measured under ``key`` (else None: compute it again)."""
    try:
        saved = json.loads(path.read_text())
        return saved["row"] if saved.get("key") == key else None
    except (OSError, ValueError, AttributeError, KeyError):  # missing or unreadable: measured again
        return None


def within_root(tree):
    """A config tree with the checkout's paths written ``<root>`` (a clone elsewhere resumes too)."""
    return json.loads(json.dumps(tree).replace(str(ROOT_DIR), "<root>"))


def protocol_of(args, cfg, evaluator, teacher_weights: str) -> dict:
    """What every row's numbers depend on besides its own model: sample count, seed, the latency
    settings and machine, the evaluation config and networks, and the teacher (its reference set
    is what every row's 'vs teacher' columns compare with)."""
    return {"num_samples": args.num_samples, "seed": args.seed, "large_batch": args.large_batch,
            "repeats": args.repeats,
            "machine": {"device": device_name(default_device()), "torch": torch.__version__},
            "eval": within_root(OmegaConf.to_container(cfg.eval, resolve=True)),
            "evaluators": evaluator.weights_digests(),
            "teacher": within_root(OmegaConf.to_container(cfg.teacher, resolve=True)),
            "teacher_weights": teacher_weights}


def generator_identity(path: str | Path) -> dict:
    """A generator row's model: every file of its folder (weights, generator.json's timesteps,
    labels and shape, the scheduler config)."""
    folder = Path(path)
    if (folder / "generator" / GENERATOR_FILE).is_file():
        folder = folder / "generator"
    files = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "training.json"):
        files.update(str(f.relative_to(folder)).encode() + f.read_bytes())
    return {"files": files.hexdigest()}  # the weights file among them: no second hash of the loaded weights


def targets(rows: list[dict], best: dict, student: str, large: str) -> list[str]:
    s = next((r for r in rows if r["label"] == student), None)
    if s is None:
        return [f"No row named {student!r}: targets not checked."]
    m, b = s["metrics"], best["metrics"]
    checks = [  # issue 13: the one-step student matches the teacher's best setting
        (f"{student} fid_fmnist vs data <= teacher's best", m[FID_DATA], b[FID_DATA],
         m[FID_DATA] <= b[FID_DATA]),
        (f"{student} fid_fmnist_resnet vs data <= teacher's best", m[FID2_DATA], b[FID2_DATA],
         m[FID2_DATA] <= b[FID2_DATA]),
        (f"{student} class consistency >= teacher's best - 0.01", m[CC], b[CC] - 0.01,
         m[CC] >= b[CC] - 0.01),
        (f"{student} recall (fmnist, vs data) >= teacher's best - 0.05", m[RECALL],
         b[RECALL] - 0.05, m[RECALL] >= b[RECALL] - 0.05),
        (f"teacher's best NFE / {student} NFE >= 50", best["nfe"] / s["nfe"], 50,
         best["nfe"] / s["nfe"] >= 50),
    ]
    for bs in ("1", large):
        lat, fwd = s["latency_ms_per_image"][bs], best["network_forward_ms_per_image"][bs]
        checks.append((f"{student} ms/image <= 1.1 x one teacher forward (batch {bs})", lat,
                       1.1 * fwd, lat <= 1.1 * fwd))
    return [f"- {'met' if ok else 'MISSED'}: {what}: {val:.4g} vs {bound:.4g}"
            for what, val, bound, ok in checks]


def markdown(report: dict) -> str:
    large = report["large_batch"]
    best = report["teacher_best"]
    head = ["model", "NFE", "fid_fmnist vs data", "fid_fmnist_resnet vs data", "fid_fmnist vs teacher",
            "kid_fmnist vs data", "precision", "recall", "class consistency", "ms/image (b=1)", f"ms/image (b={large})",
            "speed-up (b=1)", f"speed-up (b={large})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        m, lat = r["metrics"], r["latency_ms_per_image"]
        name = r["label"] + (" (teacher's best)" if r["label"] == best else "")
        if "training" in r:
            name += f" ({r['training']['generator_steps']} generator steps)"
        b_lat = next(x for x in report["rows"] if x["label"] == best)["latency_ms_per_image"]
        lines.append("| " + " | ".join([
            name, str(r["nfe"]), f"{m[FID_DATA]:.3f}", f"{m[FID2_DATA]:.3f}", f"{m[FID_TEACHER]:.3f}",
            f"{m[KID_DATA]:.4f}", f"{m[PRECISION]:.3f}", f"{m[RECALL]:.3f}", f"{m[CC]:.4f}", f"{lat['1']:.3f}", f"{lat[large]:.4f}",
            f"{b_lat['1'] / lat['1']:.1f}x", f"{b_lat[large] / lat[large]:.1f}x"]) + " |")
    lines += ["", f"{report['num_samples']} samples per row (seed {report['seed']}), on "
              f"{report['device']}. fid_fmnist/kid_fmnist use the project's Fashion-MNIST feature "
              "network (NOT Inception), fid_fmnist_resnet a second, independently trained one; "
              "precision/recall (k=3) in the fmnist space vs the test split; 'vs teacher' is "
              "against 10k teacher samples (Heun 8 steps, CFG 2, the teacher-reference stream). Speed-up = the teacher's best ms/image over the row's.",
              "", f"Command: `{report['command']}`", "", "Targets (issue 13):", *report["targets"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-samples", type=int, default=10_000)
    p.add_argument("--generator", action="append", default=[], metavar="LABEL=RUN_DIR",
                   help="a distilled generator (dmd.train run dir or generator folder)")
    p.add_argument("--teacher-steps", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 2.0], help="the CFG scales of the DDIM teacher rows")
    p.add_argument("--teacher-heun", nargs="*", default=["heun:8:2.0", "heun:16:2.0"],
                   help="extra teacher settings sampler:steps:cfg")
    p.add_argument("--student", default="DMD2 1-step", help="the row the targets are checked on")
    p.add_argument("--large-batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--override", nargs="*", default=[], help="Hydra overrides of conf/evaluate.yaml")
    p.add_argument("--out", default=str(ROOT_DIR / "experiments" / "results" / "fmnist_table"))
    p.add_argument("--fresh", action="store_true", help="recompute rows saved in <out>_rows/ by an earlier run")
    args = p.parse_args()
    gens = [g.split("=", 1) for g in args.generator]
    if any(len(g) != 2 or not Path(g[1]).exists() for g in gens):
        sys.exit(f"--generator takes LABEL=RUN_DIR with an existing run dir; got {args.generator}.")

    started = time.time()
    run_provenance()  # read now: a commit made while the table runs is not its rows' code
    cfg = compose_evaluate(args.override)
    teacher = instantiate(cfg.teacher)
    evaluator = instantiate(cfg.eval.evaluator)
    evaluator.teacher = teacher
    teacher_weights = weights_digest(teacher.denoiser)
    models = [(f"teacher {n} {k}, CFG {w:g}", teacher_model(teacher, n, k, w),
               {"sampler": n, "steps": k, "cfg": w, "weights": teacher_weights})
              for n, k, w in teacher_settings(args.teacher_steps, args.cfg, args.teacher_heun)]
    training = {}
    for label, path in gens:
        generator, info = load_generator(path)
        models.append((label, generator_model(generator, info, label, args.seed),
                       generator_identity(path)))
        found = [Path(path) / f for f in ("results.json", "training.json") if (Path(path) / f).is_file()]
        if found:  # how long the student trained (a run dir's results, a bundled training.json)
            r = json.loads(found[0].read_text())
            training[label] = {k: r.get(k) for k in ("iterations", "generator_steps", "wall_seconds")}

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    protocol = protocol_of(args, cfg, evaluator, teacher_weights)
    rows, reused = [], []
    for label, model, identity in models:
        saved = out.parent / f"{out.name}_rows" / f"{slug(label)}.json"
        key = row_key({"label": label, **identity}, protocol)
        r = None if args.fresh else load_row(saved, key)
        if r is not None:
            reused.append(label)
            print(f"{label}: reused from {saved} (same model and protocol)", flush=True)
        else:
            r, samples = evaluate_model(model, evaluator, args.num_samples, args.seed,
                                        latency_batch_sizes=(1, args.large_batch), repeats=args.repeats)
            r["label"], r["git"] = label, run_provenance()["git"]  # the code that measured it
            save_sample_grid(samples[:100], out.parent / f"{out.name}_samples" / f"{slug(label)}.png")
            with atomic_path(saved) as tmp:  # an interrupted table resumes after its last whole row
                tmp.write_text(json.dumps({"key": key, "row": r}, indent=1))
            print(json.dumps({k: r[k] for k in ("label", "nfe", "metrics", "latency_ms_per_image")}),
                  flush=True)
        if label in training:
            r["training"] = training[label]
        rows.append(r)
    teacher_rows = [r for r in rows if r["label"].startswith("teacher")]
    best = min(teacher_rows, key=lambda r: r["metrics"][FID_DATA])
    report = {"rows": rows, "teacher_best": best["label"], "num_samples": args.num_samples,
              "seed": args.seed, "large_batch": str(args.large_batch), "device": rows[0]["device"],
              "teacher_reference_metrics": evaluator.teacher_metrics(args.num_samples),
              "command": " ".join(["python", "experiments/fmnist_table.py", *sys.argv[1:]]),
              "torch": torch.__version__, "wall_seconds": round(time.time() - started, 1),
              "rows_reused": reused}  # measured by an earlier run of this command (see <out>_rows/)
    report["targets"] = targets(rows, best, args.student, str(args.large_batch))
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
