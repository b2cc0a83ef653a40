"""Mutation check of the fast test tier: does ``pytest -m "not slow"`` fail on plausible bugs in the method?

    python experiments/mutations.py                 # every mutation, writes experiments/results/mutations.{md,json}
    python experiments/mutations.py --only dm_negated cfg_dropped

Each mutation is one textual edit of the library (a sign flipped, an argument swapped, a term
dropped, an index shifted). For each, the working tree is copied to a temporary folder, the edit
applied there (the checkout itself is never touched), and the fast tier run in the copy with
``-x`` (it stops at the first failing test). A mutation is *caught* when the tier fails. The
unmutated copy is run first: a tier that fails without a bug would make every mutation look caught.
An edit whose text is no longer in the code stops the script with the mutation's name, so the list
follows the code.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The tests that exercise the method's wiring run first, so a caught mutation stops early.
FIRST = ["tests/test_wiring.py", "tests/test_module.py", "tests/test_losses.py", "tests/test_generator.py",
         "tests/test_pairs.py", "tests/test_evaluate.py", "tests/test_metrics.py", "tests/test_t2i.py"]


@dataclass(frozen=True)
class Mutation:
    name: str
    bug: str  # what a researcher might have done
    path: str
    old: str
    new: str


MUTATIONS = [
    # -- the list (issue 14) ----------------------------------------------------------
    Mutation("dm_negated", "DM term negated in the generator step", "dmd/module.py",
             "loss = self.dm_weight * loss_dm", "loss = -self.dm_weight * loss_dm"),
    Mutation("cfg_dropped", "real score unguided in training (guidance 1)", "dmd/module.py",
             "self.guidance_scale, t_range=self.dm_t_range", "1.0, t_range=self.dm_t_range"),
    Mutation("fake_on_real", "fake score trained on the real batch", "dmd/module.py",
             "denoising_loss(self.fake_score, x, cond", "denoising_loss(self.fake_score, real, cond"),
    Mutation("discriminator_swapped", "discriminator's real and fake inputs swapped", "dmd/module.py",
             "gan_discriminator_loss(self.discriminate(real, cond), self.discriminate(x, cond))",
             "gan_discriminator_loss(self.discriminate(x, cond), self.discriminate(real, cond))"),
    Mutation("ema_not_released", "released generator without the EMA weights", "dmd/student.py",
             "            self.ema.copy_to(trainable(released))", "            pass"),
    Mutation("backsim_grad_everywhere", "backward simulation differentiates every step",
             "dmd/generator.py",
             "        with torch.no_grad():\n            x0 = self.forward(noise, cond, num_steps=k",
             "        if True:\n            x0 = self.forward(noise, cond, num_steps=k"),
    Mutation("eval_labels_shifted_draw", "evaluation labels shifted by one (draw)", "dmd/draw.py",
             "    return torch.cat(out), labels\n",
             "    return torch.cat(out), (labels.roll(1) if isinstance(labels, torch.Tensor) else labels)\n"),
    Mutation("eval_labels_shifted_callback", "evaluation labels shifted by one (training callback)",
             "dmd/callbacks/evaluation.py",
             "metrics = self.evaluator(images, labels, teacher.prompt_list(self.num_samples))",
             "metrics = self.evaluator(images, None if labels is None else (labels + 1) % 10, "
             "teacher.prompt_list(self.num_samples))"),
    Mutation("regression_target_misaligned", "regression targets misaligned with their noise (batch)",
             "dmd/regression_pairs.py", 'pairs["images"][idx].to(device)',
             'pairs["images"][idx.roll(1)].to(device)'),
    Mutation("regression_pairs_misaligned", "regression pairs' noise not the teacher's input",
             "dmd/regression_pairs.py",
             'noise = stream_noise("regression-pairs", seed, num_pairs, teacher.sample_shape)',
             'noise = stream_noise("regression-pairs", seed, num_pairs, teacher.sample_shape).roll(1, 0)'),
    Mutation("prompt_latent_shifted", "prompt i paired with prompt i+1's latent", "dmd/data/prompts.py",
             "return self.latents[self.index[i]], select_condition(self.cond, i)",
             "return self.latents[self.index[(i + 1) % len(self.index)]], select_condition(self.cond, i)"),
    Mutation("clip_prompts_reversed", "CLIP score against reversed prompts", "dmd/metrics/clip.py",
             "list(prompts[sl])", "list(prompts[::-1][sl])"),
    # -- more of the same kinds ---------------------------------------------------------------
    Mutation("jsonl_images_reversed", "a .jsonl file's images read in reverse", "dmd/data/prompts.py",
             "files = ([p for p in self.paired] if", "files = ([p for p in self.paired][::-1] if"),
    Mutation("folder_images_reversed", "an image folder read in reverse", "dmd/data/prompts.py",
             "else image_files(self.images))", "else image_files(self.images)[::-1])"),
    Mutation("shards_reversed", "webdataset shards read in reverse", "dmd/data/prompts.py",
             "files = shard_files(self.shards)", "files = shard_files(self.shards)[::-1]"),
    Mutation("pre_encoded_latents_shifted", "pre-encoded latents shifted by one", "dmd/data/prompts.py",
             "return latents.float()", "return latents.float().roll(1, 0)"),
    Mutation("embeddings_reversed_per_chunk", "cached prompt embeddings reversed within a chunk",
             "dmd/t2i/text.py", "save_arrays((flatten_condition(encoder(list(prompts[i:i + chunk])))",
             "save_arrays((flatten_condition(encoder(list(prompts[i:i + chunk])[::-1]))"),
    Mutation("clip_prompts_rolled", "CLIP prompts rolled by one within each batch", "dmd/metrics/clip.py",
             "list(prompts[sl])", "list(prompts[sl])[1:] + list(prompts[sl])[:1]"),
    Mutation("dm_real_fake_swapped", "DM gradient real minus fake instead of fake minus real",
             "dmd/losses.py", "(x0_fake - x0_real) / weight", "(x0_real - x0_fake) / weight"),
    Mutation("dm_no_normaliser", "DM gradient without DMD's per-sample normaliser", "dmd/losses.py",
             "return torch.nan_to_num((x0_fake - x0_real) / weight",
             "return torch.nan_to_num((x0_fake - x0_real) / 1.0"),
    Mutation("cfg_reversed", "guidance towards the null class", "dmd/conditioning.py",
             "x0_uncond + guidance_scale * (x0_cond - x0_uncond)",
             "x0_cond + guidance_scale * (x0_uncond - x0_cond)"),
    Mutation("fake_score_unconditional", "fake score queried with the null condition in DM",
             "dmd/losses.py", "x0_fake = fake_score(x_t, t, cond)", "x0_fake = fake_score(x_t, t, uncond)"),
    Mutation("ttur_offset", "generator steps at iterations 1, N+1, ... instead of 0, N, ...",
             "dmd/module.py", "if self.iteration % self.ttur_ratio == 0:",
             "if self.iteration % self.ttur_ratio == 1 % self.ttur_ratio:"),
    Mutation("gan_generator_sign", "GAN generator loss saturating the wrong way", "dmd/losses.py",
             "return F.softplus(-logits_fake.float()).mean()", "return F.softplus(logits_fake.float()).mean()"),
    Mutation("regression_weight_ignored", "regression term added without its weight", "dmd/module.py",
             "loss = loss + self.regression_weight * loss_reg", "loss = loss + loss_reg"),
    Mutation("discriminator_weight_ignored", "discriminator loss added without its weight", "dmd/module.py",
             "loss = loss + self.gan_discriminator_weight * loss_d", "loss = loss + loss_d"),
    Mutation("backsim_always_last_step", "backward simulation always trains the last step", "dmd/module.py",
             "k = backward_simulation_step(self.iteration, self.generator.num_steps, self.seed)",
             "k = self.generator.num_steps - 1"),
    Mutation("fake_loss_on_clean_samples", "fake score's denoising loss at t = 0 only", "dmd/losses.py",
             "t = sample_timesteps(x0.shape[0], schedule.num_train_timesteps, x0.device, generator=generator,\n"
             "                             distribution=distribution, schedule=schedule)",
             "t = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)"),
]


def copy_tree(dest: Path) -> None:
    """The working tree as git sees it (tracked and untracked, not ignored) under ``dest``."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def mutated(tree: Path, m: Mutation) -> str:
    """The text of ``m.path`` in ``tree`` with the mutation applied."""
    text = (tree / m.path).read_text()
    if text.count(m.old) != 1:
        raise SystemExit(f"mutation {m.name}: its text is {'missing from' if m.old not in text else 'ambiguous in'} "
                         f"{m.path}; update experiments/mutations.py to the code.")
    return text.replace(m.old, m.new)


def run_tier(tree: Path, timeout: int, tests: list[str] | None = None) -> tuple[bool, float, str]:
    """(passed, seconds, the first failing test or the last lines) of the fast tier in ``tree``
    (or of the given ``tests``)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    # Every test file named, FIRST ones first (pytest would otherwise collect a folder alphabetically).
    files = FIRST + sorted(str(f.relative_to(tree)) for f in (tree / "tests").glob("test_*.py")
                           if str(f.relative_to(tree)) not in FIRST)
    cmd = [sys.executable, "-m", "pytest", "-m", "not slow", "-x", "-q", "-p", "no:cacheprovider",
           *(tests or files)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return True, time.perf_counter() - started, f"timed out after {timeout} s (counted as not caught)"
    seconds = time.perf_counter() - started
    failed = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return proc.returncode == 0, seconds, (failed[0] if failed else proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="names of the mutations to try (default: all)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per run of the tier")
    ap.add_argument("--tests", nargs="*", help="pytest arguments instead of the whole fast tier "
                    "(a quick look while writing tests; the published result uses the tier)")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "mutations"))
    args = ap.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.only and len(chosen) != len(args.only):
        raise SystemExit(f"unknown mutation(s): {sorted(set(args.only) - {m.name for m in MUTATIONS})}")
    with tempfile.TemporaryDirectory(prefix="dmd-mutations-") as tmp:
        clean = Path(tmp) / "clean"
        copy_tree(clean)
        for m in chosen:  # every edit must still match the code before anything runs
            mutated(clean, m)
        passed, unmutated_seconds, last = run_tier(clean, args.timeout, args.tests)
        print(f"unmutated: {'passes' if passed else 'FAILS'} in {unmutated_seconds:.0f} s ({last})", flush=True)
        if not passed:
            raise SystemExit("The fast tier fails without a mutation: fix that first.")
        rows = []
        for m in chosen:
            tree = Path(tmp) / m.name
            shutil.copytree(clean, tree)
            (tree / m.path).write_text(mutated(clean, m))
            passed, seconds, first = run_tier(tree, args.timeout, args.tests)
            rows.append({"name": m.name, "bug": m.bug, "path": m.path, "caught": not passed,
                         "seconds": round(seconds, 1), "first_failure": first})
            print(f"{m.name}: {'caught' if not passed else 'MISSED'} in {seconds:.0f} s  {first}", flush=True)
            shutil.rmtree(tree)
    caught = sum(r["caught"] for r in rows)
    lines = [f"Fast tier (`pytest -m \"not slow\"`) against {len(rows)} mutations: {caught} caught.", "",
             "| mutation | bug | file | caught | seconds to first failure | first failing test |",
             "|---|---|---|---|---|---|"]
    lines += [f"| `{r['name']}` | {r['bug']} | `{r['path']}` | {'yes' if r['caught'] else '**no**'} | "
              f"{r['seconds']} | {r['first_failure'].replace('|', '/')} |" for r in rows]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"unmutated_seconds": round(unmutated_seconds, 1), "rows": rows}, indent=1))
    print("\n".join(lines))
    if caught < len(rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
