"""``dmd-compare``: compare runs of a sweep, aggregated over seeds.

    dmd-compare <multirun dir | run dirs ...> [--metrics fid_fmnist_vs_data ...] [--out DIR]
    dmd-compare --wandb <entity>/<project> --group <name> --out DIR      (online runs)

Reads each run's ``results.json`` (never wandb's binary files): its ``metrics`` (the last
evaluation), its ``evaluations`` (metrics per generator step) and its ``overrides`` (the
command-line values, from results.json or Hydra's ``.hydra/overrides.yaml``). Runs are grouped
by the overrides that differ between runs, ``seed`` excepted; each group gets mean ± std and n
per metric. A job that failed (``status: failed``) or left no results.json is counted in its
group's ``failed`` column and never lost among the others. Writes ``comparison.md`` and PNG
plots (each metric against each swept value with std error bars; each metric against the
generator step for every run) to ``--out`` (default: ``<first path>/comparison``).
With ``--wandb``, the runs of a wandb group are read through the public API instead
(``dmd.wandb_runs``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

IGNORED = ("seed", "hydra.", "paths.", "trainer.enable_progress_bar", "logger")


def find_runs(paths) -> list[Path]:
    """Run dirs under the given paths: dirs with a results.json or a Hydra job record."""
    runs = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist: give a multirun dir or run dirs.")
        if (p / "results.json").is_file() or (p / ".hydra").is_dir():
            runs.append(p)
            continue
        found = {f.parent for f in p.rglob("results.json")} | {f.parent for f in p.rglob(".hydra")}
        runs += sorted(found - {p / "comparison"})
    if not runs:
        raise FileNotFoundError(f"No run dirs (results.json or .hydra/) under {list(map(str, paths))}.")
    return runs


def run_record(where: str, overrides, status: str, metrics: dict | None, evaluations=(),
               error: str | None = None) -> dict:
    """One run as compare groups it: its overrides as {key: value} params (``+``/``~`` prefixes
    dropped), status, last metrics and per-step evaluations. Built from a results.json
    (:func:`load_run`) or a wandb run (:mod:`dmd.wandb_runs`)."""
    params = dict(o.lstrip("+~").split("=", 1) for o in overrides or [] if "=" in o)
    return {"dir": where, "params": params, "status": status, "seed": params.get("seed"),
            "metrics": metrics or {}, "evaluations": list(evaluations), "error": error}


def load_run(run: Path) -> dict:
    """A run dir's record; one whose files cannot be read is kept as ``unreadable`` with the
    reason (compare lists it and goes on with the others)."""
    path = run / "results.json"
    try:
        results = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(results, dict):
            raise ValueError(f"expected a JSON object, found a {type(results).__name__}")
        overrides = results.get("overrides")
        if overrides is None and (run / ".hydra" / "overrides.yaml").is_file():
            overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) or []
    except (OSError, ValueError, yaml.YAMLError) as err:  # JSONDecodeError, UnicodeDecodeError too
        return run_record(str(run), [], "unreadable", None, error=f"{path}: {err}")
    metrics = results.get("metrics") if isinstance(results.get("metrics"), dict) else {}
    evaluations = [e for e in results.get("evaluations") or [] if isinstance(e, dict)
                   and "generator_step" in e and isinstance(e.get("metrics"), dict)]
    status = results.get("status", "completed" if metrics else "missing")
    return run_record(str(run), overrides if isinstance(overrides, list) else [], status, metrics,
                      evaluations, results.get("error"))


def is_number(v) -> bool:
    """A finite int or float (not a bool): what compare aggregates."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class Comparison:
    runs: list[dict]
    swept: list[str]
    metrics: list[str]
    groups: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # runs whose records could not be read

    def markdown(self) -> str:
        head = [*self.swept, "n", *(f"{m} (mean ± std)" for m in self.metrics), "failed"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for g in self.groups:
            cells = [_cell(g["params"].get(k)) for k in self.swept] + [str(g["n"])]
            for m in self.metrics:
                mean, std, n = g["stats"].get(m, (None, None, 0))
                cells.append("-" if mean is None else f"{mean:.4g} ± {std:.2g}")
            cells.append(str(g["failed"]))
            lines.append("| " + " | ".join(cells) + " |")
        for r in [r for r in self.runs if r["status"] != "completed"]:
            lines.append(f"\nFailed: {r['dir']} ({r['status']}): {r['error'] or 'no results.json'}")
        for r in self.skipped:
            lines.append(f"\nSkipped: {r['dir']} (unreadable): {r['error']}")
        return "\n".join(lines) + "\n"

    def plot(self, out_dir: str | Path) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for m in self.metrics:
            for k in self.swept:  # metric vs swept value, one line per value of the other params
                fig, ax = plt.subplots(figsize=(4.5, 3.5), dpi=100)
                others = [o for o in self.swept if o != k]
                series: dict[tuple, list] = {}
                for g in self.groups:
                    if m in g["stats"]:
                        key = tuple(g["params"].get(o) for o in others)
                        series.setdefault(key, []).append((g["params"].get(k), *g["stats"][m][:2]))
                for key, pts in series.items():
                    pts.sort(key=lambda p: _sort_key(p[0]))
                    xs = [_cell(p[0]) for p in pts]
                    ax.errorbar(xs, [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                                capsize=3, label=", ".join(f"{o}={v}" for o, v in zip(others, key)) or None)
                ax.set_xlabel(k)
                ax.set_ylabel(m)
                if any(others):
                    ax.legend(fontsize=6)
                written.append(_save(fig, out_dir / f"{m}_vs_{k.replace('/', '_')}.png"))
            fig, ax = plt.subplots(figsize=(4.5, 3.5), dpi=100)  # metric vs generator step per run
            for r in self.runs:
                pts = [(e["generator_step"], e["metrics"][m]) for e in r["evaluations"]
                       if is_number(e["metrics"].get(m))]
                if pts:
                    label = ", ".join(f"{k}={r['params'].get(k)}" for k in [*self.swept, "seed"])
                    ax.plot(*zip(*pts), marker=".", label=label)
            ax.set_xlabel("generator step")
            ax.set_ylabel(m)
            ax.legend(fontsize=5)
            written.append(_save(fig, out_dir / f"{m}_vs_generator_step.png"))
        return written


def _cell(value) -> str:
    """A swept value as a table cell ('-' where a run did not set the key)."""
    return "-" if value is None else str(value)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _sort_key(v):
    try:
        return (0, float(v), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


def compare(paths=(), metrics: list[str] | None = None, runs: list[dict] | None = None) -> Comparison:
    """Group the runs under ``paths`` (or the given run records, e.g. ``wandb_runs.group_runs``)
    by their swept overrides and aggregate over seeds."""
    runs = [load_run(r) for r in find_runs(paths)] if runs is None else runs
    skipped = [r for r in runs if r["status"] == "unreadable"]
    runs = [r for r in runs if r["status"] != "unreadable"]
    keys = sorted({k for r in runs for k in r["params"]})
    swept = [k for k in keys if not k.startswith(IGNORED)
             and len({r["params"].get(k) for r in runs}) > 1]
    if metrics is None:
        done = [r for r in runs if r["status"] == "completed"]
        metrics = sorted({k for r in done for k, v in r["metrics"].items() if is_number(v)}
                         - {"num_samples"})
    groups: dict[tuple, dict] = {}
    for r in runs:
        key = tuple(r["params"].get(k) for k in swept)
        g = groups.setdefault(key, {"params": dict(zip(swept, key)), "runs": [], "failed": 0})
        if r["status"] == "completed":
            g["runs"].append(r)
        else:
            g["failed"] += 1
    out = []
    for key in sorted(groups, key=lambda t: [_sort_key(v) for v in t]):
        g = groups[key]
        stats = {}
        for m in metrics:
            vals = [r["metrics"][m] for r in g["runs"] if is_number(r["metrics"].get(m))]
            if vals:
                stats[m] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0,
                            len(vals))
        out.append({"params": g["params"], "n": len(g["runs"]), "failed": g["failed"], "stats": stats})
    return Comparison(runs, swept, list(metrics), out, skipped)


def stat_cells(group: dict, metrics) -> list[str]:
    """'mean ± std' cells (3 decimals) of one group of ``compare``, '-' where a metric is missing."""
    cells = []
    for m in metrics:
        mean, std, _ = group["stats"].get(m, (None, None, 0))
        cells.append("-" if mean is None else f"{mean:.3f} ± {std:.3f}")
    return cells


def sweep_report_args(description: str, metrics) -> tuple[Comparison, Path]:
    """The command line of the experiments' sweep reports (``<sweep dir> [--out DIR]``): the
    sweep compared on ``metrics`` and the output folder."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("sweep", help="the sweep's multirun dir")
    p.add_argument("--out", default="experiments/results")
    args = p.parse_args()
    return compare([args.sweep], metrics), Path(args.out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="*", help="a multirun dir, or run dirs")
    p.add_argument("--metrics", nargs="*", default=None, help="metrics to show (default: all)")
    p.add_argument("--out", default=None, help="where comparison.md and the plots go")
    p.add_argument("--wandb", metavar="ENTITY/PROJECT", help="pull runs from wandb (online) instead")
    p.add_argument("--group", help="the wandb group to pull (with --wandb)")
    args = p.parse_args(argv)
    if bool(args.wandb) == bool(args.paths) or bool(args.wandb) != bool(args.group):
        p.error("give run paths, or --wandb ENTITY/PROJECT --group NAME (and --out).")
    if args.wandb:
        from dmd.wandb_runs import group_runs

        if not args.out:
            p.error("--wandb needs --out DIR (where comparison.md and the plots go).")
        c = compare(metrics=args.metrics, runs=group_runs(args.wandb, args.group))
    else:
        try:
            c = compare(args.paths, args.metrics)
        except FileNotFoundError as err:  # a mistyped path: say so, no traceback
            p.error(str(err))
    out = Path(args.out) if args.out else Path(args.paths[0]) / "comparison"
    out.mkdir(parents=True, exist_ok=True)
    md = c.markdown()
    (out / "comparison.md").write_text(md)
    plots = c.plot(out)
    print(md)
    print(f"Wrote {out / 'comparison.md'} and {len(plots)} plots in {out}.")


if __name__ == "__main__":
    main()
