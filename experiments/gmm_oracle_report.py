"""Oracle report on the 2-D mixtures: DMD/DMD2 and the baseline methods' students against the
exact target.

For gmm8 it measures, on 10k samples each: the teacher's ODE sampler (exact mixture denoiser
and the bundled MLP teacher), the one-step generator at initialisation (the MLP teacher
evaluated once on pure noise at t = 999), and the one-step students of ``gmm_dmd2``,
``gmm_dmd`` and the baselines ``gmm_kd``, ``gmm_sid``, ``gmm_cd``, ``gmm_pd`` (each preset's
own length);
for gmm8_unequal, DMD without regression, GAN or TTUR (``gmm_dmd_unequal``), whose light
modes are where mode dropping would show. Figures: share of samples per mode (nearest mean),
median distance to the nearest mean, energy distance to 4000 mixture draws.

    python experiments/gmm_oracle_report.py            # trains the seven presets (~25 min)
    python experiments/gmm_oracle_report.py --runs-only --out outputs/...   # reuse finished runs

Writes experiments/results/gmm_oracle.{json,md} and a scatter plot per model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from dmd import ROOT_DIR
from dmd.data import GaussianMixture
from dmd.draw import sample_generator, sample_teacher
from dmd.generator import Generator, load_generator
from dmd.metrics.mixture import mixture_report
from dmd.teachers import gaussian_mixture_teacher, load_teacher
from dmd.visualize import save_sample_grid

RESULTS = ROOT_DIR / "experiments" / "results"
CHECKPOINTS = ROOT_DIR / "experiments" / "checkpoints"
PRESETS = {"gmm_dmd2": "gmm8", "gmm_dmd": "gmm8", "gmm_dmd_unequal": "gmm8_unequal",
           "gmm_kd": "gmm8", "gmm_sid": "gmm8", "gmm_cd": "gmm8", "gmm_pd": "gmm8"}
UNEQUAL = [8, 1, 4, 1, 2, 1, 4, 1]
N = 10_000


def train(preset: str, out_root: Path) -> Path:
    run = out_root / preset
    subprocess.run([sys.executable, "-m", "dmd.train", f"experiment={preset}", "logger=csv",
                    "trainer.enable_progress_bar=false", f"hydra.run.dir={run}"], check=True)
    return run


def row(name: str, data: str, samples: torch.Tensor, mixture, nfe: int, extra: str = "") -> dict:
    save_sample_grid(samples, RESULTS / "gmm_oracle" / f"{name}.png")
    return {"model": name, "data": data, "nfe": nfe, "note": extra, **mixture_report(samples, mixture)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/gmm_oracle", help="where the preset runs go")
    parser.add_argument("--runs-only", action="store_true", help="reuse finished runs under --out")
    args = parser.parse_args()
    out_root = Path(args.out)
    mixtures = {"gmm8": GaussianMixture.ring(), "gmm8_unequal": GaussianMixture.ring(weights=UNEQUAL)}
    rows = []

    exact = gaussian_mixture_teacher(mixtures["gmm8"], DDPMScheduler())
    samples, _ = sample_teacher(exact, N, "heun", 25, seed=0, progress=False)
    rows.append(row("teacher_exact_heun25", "gmm8", samples, mixtures["gmm8"], 49, "exact mixture denoiser"))
    mlp = load_teacher(str(CHECKPOINTS / "gmm8_mlp"))
    samples, _ = sample_teacher(mlp, N, "heun", 25, seed=0, progress=False)
    rows.append(row("teacher_mlp_heun25", "gmm8", samples, mixtures["gmm8"], 49, "bundled MLP teacher"))
    samples, _ = sample_generator(Generator(mlp.denoiser, [999]), mlp, N, seed=0, progress=False)
    rows.append(row("init_one_step", "gmm8", samples, mixtures["gmm8"], 1, "MLP teacher, one step at t=999"))

    for preset, data in PRESETS.items():
        run = out_root / preset if args.runs_only else train(preset, out_root)
        generator, info = load_generator(run)
        samples, _ = sample_generator(generator, info, N, seed=0, progress=False)
        results = json.loads((run / "results.json").read_text())
        method = results["config"]["algorithm"].get("method", "dmd")
        note = f"algorithm.method={method}, {results['iterations']} iterations, {results['wall_seconds']:.0f} s"
        rows.append(row(preset, data, samples, mixtures[data], generator.num_steps, note))

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gmm_oracle.json").write_text(json.dumps(rows, indent=2))
    lines = ["| model | data | NFE | min / max mode share | median dist. to mode | energy distance | note |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['data']} | {r['nfe']} | {r['min_mode_share']:.3f} / "
                     f"{r['max_mode_share']:.3f} | {r['median_dist_to_mode']:.3f} | "
                     f"{r['energy_distance']:.4f} | {r['note']} |")
    shares = [f"| {r['model']} | " + " | ".join(f"{s:.3f}" for s in r["mode_shares"]) + " |" for r in rows]
    lines += ["", "Share of samples per mode (modes 0..7 counter-clockwise from angle 0; gmm8_unequal "
              "weights 8:1:4:1:2:1:4:1 = " + ", ".join(f"{w / 22:.3f}" for w in UNEQUAL) + "):", "",
              "| model | " + " | ".join(str(k) for k in range(8)) + " |", "|---" * 9 + "|", *shares]
    (RESULTS / "gmm_oracle.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
