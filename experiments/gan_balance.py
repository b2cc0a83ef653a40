"""The GAN-balance sweep (conf/sweep/gan_balance.yaml) as a table: metrics (mean ± std over the
seeds, ``dmd.compare``) and the measured ratio of the GAN's to the DM term's gradient norm with
respect to the generator output (median over each run's generator steps, from its CSV log).

    python experiments/gan_balance.py outputs/sweeps/gan_balance [--out experiments/results]

Writes ``<out>/gan_balance.{md,json}`` and the comparison plots (``<out>/gan_balance/``).
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from dmd.compare import stat_cells, sweep_report_args

METRICS = ["fid_fmnist_vs_data", "fid_fmnist_resnet_vs_data", "fid_fmnist_vs_teacher",
           "precision_fmnist_vs_data", "recall_fmnist_vs_data", "class_consistency"]
KEY = "algorithm.gan.balance"


def gradient_ratio(run_dir: Path) -> float | None:
    """Median of grad_norm/x/gan / grad_norm/x/dm over the run's logged generator steps."""
    ratios = []
    for log in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with log.open() as f:
            for row in csv.DictReader(f):
                gan, dm = row.get("grad_norm/x/gan"), row.get("grad_norm/x/dm")
                if gan and dm and float(dm) > 0:
                    ratios.append(float(gan) / float(dm))
    return statistics.median(ratios) if ratios else None


def main() -> None:
    c, out = sweep_report_args(__doc__.split("\n\n")[0], METRICS)
    ratios: dict[str, list[float]] = {}
    for r in c.runs:
        ratio = gradient_ratio(Path(r["dir"]))
        if ratio is not None:
            ratios.setdefault(str(r["params"].get(KEY)), []).append(ratio)
    head = ["balance", "n", *(f"{m} (mean ± std)" for m in METRICS), "‖∇GAN‖/‖∇DM‖ (median)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in c.groups:
        cells = [str(g["params"].get(KEY)), str(g["n"]), *stat_cells(g, METRICS)]
        r = ratios.get(str(g["params"].get(KEY)))
        cells.append("-" if not r else f"{statistics.fmean(r):.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gan_balance.md").write_text(text)
    (out / "gan_balance.json").write_text(json.dumps(
        {"groups": c.groups, "gradient_ratio": ratios, "runs": [
            {k: r[k] for k in ("dir", "params", "status", "metrics")} for r in c.runs]}, indent=1))
    c.plot(out / "gan_balance")
    print(text)


if __name__ == "__main__":
    main()
