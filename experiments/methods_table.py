"""The methods comparison table (conf/sweep/methods.yaml): DMD2 against SiD, knowledge,
consistency and progressive distillation at 1, 2 and 4 steps, mean +- std over seeds.

    python experiments/methods_table.py outputs/sweeps/methods outputs/sweeps/methods_kd \
        [--out experiments/results/methods_fmnist] [--latency-batch 64]

Reads every finished run's results.json under the given dirs (its final evaluation: FID in the
Inception-free Fashion-MNIST classifier's feature space and in the independent ResNet's,
precision/recall against the data, class consistency; the run's network passes, iterations and
wall time) and groups the runs by (algorithm.method, generator steps). Latency: one released
generator per group, ms/image at ``--latency-batch`` (warm median, dmd.latency) on this
machine. Runs that failed or stopped before their budget are listed, never averaged in.
Writes ``<out>.md`` and ``<out>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import torch

from dmd.compare import find_runs
from dmd.generator import load_generator
from dmd.latency import device_name, latency_ms_per_image

COLUMNS = {"fid_fmnist_vs_data": "FID (fmnist)", "fid_fmnist_resnet_vs_data": "FID (resnet)",
           "precision_fmnist_vs_data": "precision", "recall_fmnist_vs_data": "recall",
           "class_consistency": "class consistency"}
METHOD_ORDER = ("dmd", "sid", "kd", "cd", "pd")


def read_runs(paths) -> tuple[list[dict], list[str]]:
    runs, skipped = [], []
    for run in find_runs(paths):
        try:
            results = json.loads((run / "results.json").read_text())
        except FileNotFoundError:
            skipped.append(f"{run}: no results.json (still running, or stopped before its first record)")
            continue
        except (OSError, ValueError) as err:
            skipped.append(f"{run}: unreadable results.json ({err})")
            continue
        if results.get("status") != "completed" or results.get("stopped_early"):
            skipped.append(f"{run}: {results.get('status')}{' (stopped early)' * bool(results.get('stopped_early'))}")
            continue
        runs.append({"dir": str(run), "method": results["config"]["algorithm"].get("method", "dmd"),
                     "steps": results["nfe"], "seed": results["config"]["seed"],
                     "network_passes": results.get("network_passes"), "iterations": results["iterations"],
                     "wall_seconds": results["wall_seconds"], "metrics": results["metrics"],
                     "evaluation": (results["metrics"].get("num_samples"), results["config"]["eval"]["seed"])})
    return runs, skipped


def cell(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="sweep dirs or run dirs")
    parser.add_argument("--out", default="experiments/results/methods_fmnist")
    parser.add_argument("--latency-batch", type=int, default=64)
    parser.add_argument("--skip-latency", action="store_true",
                        help="leave ms/image out (e.g. when other jobs share the machine: it would not be a measurement)")
    args = parser.parse_args()
    runs, skipped = read_runs(args.paths)
    groups = defaultdict(list)
    for r in runs:
        groups[(r["method"], r["steps"])].append(r)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for (method, steps), members in sorted(groups.items(), key=lambda kv: (METHOD_ORDER.index(kv[0][0]), kv[0][1])):
        latency = None
        # any member's released generator will do (one UNet per group); a sweep's committed
        # records keep no weights, so a group may have none on this machine
        released = [m["dir"] for m in members if (Path(m["dir"]) / "generator").is_dir()]
        if not args.skip_latency and released:
            generator, info = load_generator(released[0])
            generator = generator.to(device)
            latency = latency_ms_per_image(lambda noise, cond, uncond, g=generator: g(noise, cond), info,
                                           args.latency_batch, device)
        row = {"method": method, "steps": steps, "n": len(members), "seeds": sorted(m["seed"] for m in members),
               "latency_ms_per_image": latency, "runs": [m["dir"] for m in members]}
        for key in (*COLUMNS, "network_passes", "iterations", "wall_seconds"):
            values = [m["metrics"].get(key) if key in COLUMNS else m[key] for m in members]
            row[key] = [v for v in values if v is not None]
        rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "skipped": skipped,
                                                    "latency_device": device_name(device)}, indent=2))
    lines = ["| method | steps (NFE) | " + " | ".join(COLUMNS.values()) +
             " | network passes | iterations | ms/image | seeds |", "|---" * (len(COLUMNS) + 6) + "|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['steps']} | " + " | ".join(
            cell(r[k], 3) for k in COLUMNS) +
            f" | {cell(r['network_passes'], 0)} | {cell(r['iterations'], 0)} | "
            f"{'-' if r['latency_ms_per_image'] is None else format(r['latency_ms_per_image'], '.2f')} | "
            f"{', '.join(map(str, r['seeds']))} |")
    latency = ("not measured (--skip-latency)" if args.skip_latency else
               f"warm median ms per image at batch {args.latency_batch} on {device_name(device)}"
               + ("; '-': no released generator of the group on this machine (records only)"
                  if any(r["latency_ms_per_image"] is None for r in rows) else ""))
    evaluations = sorted({r["evaluation"] for r in runs}, key=str)
    lines += ["", "Scored on each run's final evaluation: " + "; ".join(
        f"{n} held-out samples of the eval stream, seed {seed}" for n, seed in evaluations) +
        " (training seeds in the last column; FIDs in the two Fashion-MNIST feature networks, "
        "which no run trained with).", f"Latency: {latency}.",
              *(["", f"Not averaged in ({len(skipped)}):", *[f"- {s}" for s in skipped]] if skipped else [])]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
