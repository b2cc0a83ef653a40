"""The methods comparison table (conf/sweep/methods.yaml): DMD2 against SiD, knowledge,
consistency and progressive distillation at 1, 2 and 4 steps, mean +- std over seeds.

    python experiments/methods_table.py outputs/sweeps/methods [more sweep or run dirs] \
        [--out experiments/results/methods_fmnist] [--latency-batch 64] [--latency-rounds 3]

Reads every finished run's results.json under the given dirs (its final evaluation: FID in the
Inception-free Fashion-MNIST classifier's feature space and in the independent ResNet's,
precision/recall against the data, class consistency; the run's network passes, iterations and
wall time), and every dmd.evaluate record of such a run's generator at other timesteps (CD's 2-
and 4-step rows, conf/sweep/methods_cd_steps.yaml), and groups them by (algorithm.method,
generator steps), one record per training seed. Latency: one released
generator per group, ms/image at ``--latency-batch`` (warm median, dmd.latency) on this
machine, measured in ``--latency-rounds`` rounds that each time every group once, and the
median over rounds reported (so a drift of the machine's speed during the measurement
spreads over all groups instead of favouring the ones timed first). Runs that failed or
stopped before their budget are listed, never averaged in.
Writes ``<out>.md``, ``<out>.json`` and ``<out>.png`` (each FID against the number of steps, one
line per method through the seeds' means, every seed's value as a dot).
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
from dmd.rundir import relocated

ROOT = Path(__file__).resolve().parents[1]

COLUMNS = {"fid_fmnist_vs_data": "FID (fmnist)", "fid_fmnist_resnet_vs_data": "FID (resnet)",
           "precision_fmnist_vs_data": "precision", "recall_fmnist_vs_data": "recall",
           "class_consistency": "class consistency"}
METHOD_ORDER = ("dmd", "dmd2", "sid", "kd", "cd", "pd")


def method_name(algorithm: dict) -> str:
    """The row's method: algorithm.method, with DMD's loop named dmd2 when it runs DMD2's two
    time-scale update rule (several fake-score updates per generator update)."""
    method = algorithm.get("method", "dmd")
    return "dmd2" if method == "dmd" and algorithm.get("ttur_ratio", 1) > 1 else method


def load(run: Path) -> tuple[dict | None, str | None]:
    """(the run dir's results.json, None) or (None, why it cannot be read)."""
    try:
        return json.loads((run / "results.json").read_text()), None
    except FileNotFoundError:
        return None, f"{run}: no results.json (still running, or stopped before its first record)"
    except (OSError, ValueError) as err:
        return None, f"{run}: unreadable results.json ({err})"


def unfinished(run: Path, results: dict) -> str | None:
    """Why a training record is not a finished run (None: it is)."""
    if "status" not in results:
        return f"{run}: no final record yet (still running, or stopped after an evaluation)"
    if results["status"] != "completed" or results.get("stopped_early"):
        return f"{run}: {results['status']}{' (stopped early)' * bool(results.get('stopped_early'))}"
    return None


def locate(path: str, config: dict) -> Path:
    """A recorded absolute path on this machine: as recorded if it exists, else moved from the
    recording checkout (``paths.root_dir``) to this one (committed records)."""
    if Path(path).exists():
        return Path(path)
    return Path(relocated({"paths": config.get("paths"), "at": path}, {"paths": {"root_dir": str(ROOT)}})["at"])


def comparable_evaluator(config: dict) -> dict:
    evaluator = dict(config["eval"]["evaluator"])
    evaluator.pop("cache_dir", None)  # where references are cached, not what they are
    return evaluator


def row(run: Path, results: dict, trained: dict, generator: tuple, evaluation: tuple) -> dict:
    return {"dir": str(run), "method": method_name(trained["config"]["algorithm"]),
            "steps": results["nfe"], "seed": trained["config"]["seed"],
            "network_passes": trained.get("network_passes"), "iterations": trained["iterations"],
            "wall_seconds": trained["wall_seconds"], "metrics": results["metrics"],
            "evaluation": evaluation, "generator": generator}


def scored_row(run: Path, results: dict) -> tuple[dict | None, str | None]:
    """A dmd.evaluate record of a training run's generator at other timesteps as a row of that
    run's method and seed, or why it is not one: it scores no training run here, a run extended
    since, or under another protocol than the run's own final evaluation."""
    config, scored = results["config"], results.get("generator")
    if not config.get("ckpt"):
        return None, f"{run}: an evaluation of the teacher, not of a method's run"
    if scored is None or "training" not in scored:
        return None, f"{run}: records no scored training run (score it again with this version's dmd.evaluate)"
    path = locate(scored["path"], config)
    trained, why = load(path)
    why = why or unfinished(path, trained)
    if why:
        return None, f"{run}: scores {why}"
    now = {k: trained.get(k) for k in scored["training"]}
    if now != scored["training"]:
        return None, f"{run}: scored {path} as {scored['training']}; it now records {now}: score it again"
    evaluation = (results["num_samples"], results["seed"])
    own = (trained["metrics"].get("num_samples"), trained["config"]["eval"]["seed"])
    moved = relocated(config, trained["config"])
    if evaluation != own or comparable_evaluator(moved) != comparable_evaluator(trained["config"]):
        return None, (f"{run}: scored on {evaluation[0]} samples, seed {evaluation[1]}, not under the run's own "
                      f"evaluation ({own[0]} samples, seed {own[1]}, its evaluator): not comparable")
    return row(run, results, trained, (path, scored["timesteps"]), evaluation), None


def read_runs(paths) -> tuple[list[dict], list[str]]:
    """One row per completed training run, then one per dmd.evaluate record of a training run's
    generator at other timesteps (conf/sweep/methods_cd_steps.yaml: its method, seed, passes and
    wall time are the training run's, its metrics and steps its own)."""
    trained_rows, scored_rows, skipped = [], [], []
    for run in find_runs(paths):
        results, why = load(run)
        if results is not None and results.get("config", {}).get("task_name") == "evaluate":
            scored, why = scored_row(run, results)
            scored_rows += [scored] if scored else []
        elif results is not None:
            why = unfinished(run, results)
            if why is None:  # its generator (if on this machine) at its own timesteps
                evaluation = (results["metrics"].get("num_samples"), results["config"]["eval"]["seed"])
                trained_rows.append(row(run, results, results, (run, None), evaluation))
        if why:
            skipped.append(why)
    return trained_rows + scored_rows, skipped  # a seed's training record counts before its scorings


def cell(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    if len(set(values)) == 1:  # one seed, or every seed the same (e.g. the passes of a budget)
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def plot(rows: list[dict], path: Path) -> None:
    """FID in both feature spaces against NFE: a line per method through the means, a dot per seed
    (with 1-3 seeds the dots say more than an error bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [k for k in COLUMNS if k.startswith("fid_")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), dpi=110)
    for ax, metric in zip(axes, metrics):
        for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
            points = [(r["steps"], r[metric]) for r in rows if r["method"] == method and r[metric]]
            color = f"C{i}"
            ax.plot([s for s, _ in points], [statistics.mean(v) for _, v in points], marker="o", color=color,
                    label=method)
            for steps, values in points:
                ax.scatter([steps] * len(values), values, s=10, color=color, alpha=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4], ["1", "2", "4"])
        ax.set_xlabel("steps (NFE)")
        ax.set_ylabel(f"{COLUMNS[metric]}, lower is better")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def interleaved(measure, keys, rounds: int) -> dict:
    """``measure(key)`` ``rounds`` times for each key, every key once per round (k1, k2, ...,
    k1, k2, ...) rather than each key's rounds back to back: the values of each key, in order."""
    values = defaultdict(list)
    for _ in range(rounds):
        for key in keys:
            values[key].append(measure(key))
    return dict(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="sweep dirs or run dirs")
    parser.add_argument("--out", default="experiments/results/methods_fmnist")
    parser.add_argument("--latency-batch", type=int, default=64)
    parser.add_argument("--latency-rounds", type=int, default=3,
                        help="rounds over all groups; each group's latency is its median over rounds")
    parser.add_argument("--skip-latency", action="store_true",
                        help="leave ms/image out (e.g. when other jobs share the machine: it would not be a measurement)")
    args = parser.parse_args()
    if args.latency_rounds < 1 or args.latency_batch < 1:
        parser.error(f"--latency-rounds {args.latency_rounds} / --latency-batch {args.latency_batch}: both must be "
                     ">= 1 (to leave latency out, pass --skip-latency)")
    runs, skipped = read_runs(args.paths)
    groups = defaultdict(list)
    for r in runs:
        same = [m for m in groups[(r["method"], r["steps"])] if m["seed"] == r["seed"]]
        if same:  # e.g. a trained 2-step CD run and its seed's 1-step run scored at 2 steps
            skipped.append(f"{r['dir']}: seed {r['seed']} of {r['method']} at {r['steps']} steps again "
                           f"(counted once: {same[0]['dir']})")
            continue
        groups[(r["method"], r["steps"])].append(r)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    order = sorted(groups, key=lambda key: (METHOD_ORDER.index(key[0]), key[1]))
    # any member's released generator will do (one UNet per group); a sweep's committed
    # records keep no weights, so a group may have none on this machine
    generators = {}
    for key in [] if args.skip_latency else order:
        released = [m["generator"] for m in groups[key] if (Path(m["generator"][0]) / "generator").is_dir()]
        if released:
            generator, info = load_generator(*released[0])
            generators[key] = (generator.to(device), info)

    def measure(key):
        generator, info = generators[key]
        return latency_ms_per_image(lambda noise, cond, uncond: generator(noise, cond), info,
                                    args.latency_batch, device)

    rounds = interleaved(measure, list(generators), args.latency_rounds)
    rows = []
    for key in order:
        (method, steps), members = key, groups[key]
        row = {"method": method, "steps": steps, "n": len(members), "seeds": sorted(m["seed"] for m in members),
               "runs": [m["dir"] for m in members],
               "latency_ms_per_image": statistics.median(rounds[key]) if key in rounds else None,
               "latency_ms_per_image_rounds": rounds.get(key, [])}
        for column in (*COLUMNS, "network_passes", "iterations", "wall_seconds"):
            values = [m["metrics"].get(column) if column in COLUMNS else m[column] for m in members]
            row[column] = [v for v in values if v is not None]
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
               f"warm median ms per image at batch {args.latency_batch} on {device_name(device)}, "
               f"median of {args.latency_rounds} rounds over all groups"
               + ("; '-': no released generator of the group on this machine (records only)"
                  if any(r["latency_ms_per_image"] is None for r in rows) else ""))
    evaluations = sorted({m["evaluation"] for members in groups.values() for m in members}, key=str)
    lines += ["", "Scored on each run's final evaluation: " + "; ".join(
        f"{n} held-out samples of the eval stream, seed {seed}" for n, seed in evaluations) +
        " (training seeds in the last column; FIDs in the two Fashion-MNIST feature networks, "
        "which no run trained with).", f"Latency: {latency}.",
              *(["", f"Not averaged in ({len(skipped)}):", *[f"- {s}" for s in skipped]] if skipped else [])]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, out.with_suffix(".png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
