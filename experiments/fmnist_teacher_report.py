"""Measure the bundled Fashion-MNIST teacher and the offline-metric floor.

    python experiments/fmnist_teacher_report.py --num-samples 10000 \
        --settings heun:13:2.0 ddim:25:1.0 [--out experiments/results/fmnist_teacher]

For each sampler setting NAME:STEPS:CFG, draws ``--num-samples`` class-balanced samples
(seed 0) and reports fid_fmnist vs the test split and class consistency. Also reports the
feature network's test accuracy and the train-vs-test fid_fmnist floor (10k random train
images vs the 10k test images). Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from dmd import ROOT_DIR
from dmd.data.fmnist import load_fashion_mnist
from dmd.draw import sample_teacher
from dmd.metrics.features import extract
from dmd.metrics.fid import fid_from_features
from dmd.metrics.fmnist import DEFAULT_CLASSIFIER, data_evaluator, load_classifier
from dmd.sampling import nfe
from dmd.teachers import load_teacher

TEACHER = ROOT_DIR / "experiments" / "checkpoints" / "fmnist_teacher"


def floor(classifier, n: int = 10_000, seed: int = 0) -> dict:
    train, _ = load_fashion_mnist("train")
    test, test_labels = load_fashion_mnist("test")
    idx = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    train_feats, _ = extract(classifier, train[idx], progress=True)
    test_feats, logits = extract(classifier, test)
    return {"classifier_test_accuracy": (logits.argmax(-1) == test_labels).float().mean().item(),
            "fid_fmnist_train10k_vs_test": fid_from_features(train_feats, test_feats)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-samples", type=int, default=10_000)
    p.add_argument("--settings", nargs="+", default=["heun:13:2.0"],
                   help="sampler:steps:guidance_scale, e.g. heun:13:2.0")
    p.add_argument("--teacher", default=str(TEACHER))
    p.add_argument("--out", default=str(ROOT_DIR / "experiments" / "results" / "fmnist_teacher"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    classifier = load_classifier()
    evaluator = data_evaluator()
    teacher = load_teacher(args.teacher)
    report = {"teacher": args.teacher, "classifier": str(DEFAULT_CLASSIFIER),
              "classifier_sha256": classifier.weights_sha256, "hardware": platform.processor()
              or platform.machine(), "torch_threads": torch.get_num_threads(),
              "floor": floor(classifier), "teacher_results": []}
    for setting in args.settings:
        name, steps, w = setting.split(":")
        steps, w = int(steps), float(w)
        start = time.perf_counter()
        images, labels = sample_teacher(teacher, args.num_samples, name, steps, w, seed=args.seed)
        seconds = time.perf_counter() - start
        row = {"sampler": name, "steps": steps, "guidance_scale": w, "nfe": nfe(name, steps, w),
               "sampling_seconds": round(seconds, 1),
               **evaluator(images, labels)}
        report["teacher_results"].append(row)
        print(json.dumps(row))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    lines = ["| sampler | steps | CFG | NFE | fid_fmnist (vs test) | class consistency |",
             "|---|---|---|---|---|---|"]
    for r in report["teacher_results"]:
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['guidance_scale']} | {r['nfe']} | "
                     f"{r['fid_fmnist_vs_data']:.3f} | {r['class_consistency']:.4f} |")
    f = report["floor"]
    lines += ["", f"Feature network test accuracy: {f['classifier_test_accuracy']:.4f}; "
              f"fid_fmnist floor (10k train vs 10k test): {f['fid_fmnist_train10k_vs_test']:.3f}."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
