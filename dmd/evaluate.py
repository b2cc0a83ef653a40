"""``python -m dmd.evaluate``: score a teacher sampler or a distilled generator.

    python -m dmd.evaluate ckpt=<train run dir | generator folder>     # a distilled generator
                                   # (a run dir brings its teacher, data and eval preset)
    python -m dmd.evaluate ckpt=<...> timesteps=[999,499]  # the generator's network in 2 steps
    python -m dmd.evaluate sampler=heun sampler.steps=8 sampler.guidance_scale=2.0  # the teacher

Draws ``eval.num_samples`` samples (seeded noise, class-balanced labels), scores them with the
evaluator of ``eval=`` (FID/KID vs the data and the teacher's reference samples, class
consistency), and times the model: NFE and milliseconds per image at each of
``latency.batch_sizes`` (warm, median of ``latency.repeats``), beside the time of one forward
of the network alone. Writes ``results.json`` (with ``generator``: which generator, at which
timesteps, and the training its run had when scored), ``results.md`` (a markdown table row) and
``samples.png`` into the run dir.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from dmd.evaluation import evaluate_model, generator_model, markdown_table, teacher_model
from dmd.files import atomic_path, read_results, write_results
from dmd.generator import load_generator
from dmd.provenance import run_provenance
from dmd.rundir import claim_run_dir
from dmd.runs import job_overrides
from dmd.teachers import Teacher
from dmd.validation import validate
from dmd.visualize import save_sample_grid

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> Path:
    validate(cfg, "evaluate")
    with claim_run_dir(cfg, "evaluate") as (out_dir, _):
        return score(cfg, out_dir)


def score(cfg: DictConfig, out_dir: Path) -> Path:
    started = time.time()
    teacher: Teacher = instantiate(cfg.teacher)  # the real score: its samples are a reference
    evaluator = instantiate(cfg.eval.evaluator)
    evaluator.teacher = teacher  # set after: instantiate() would turn the dataclass into a config
    if cfg.ckpt:
        generator, info = load_generator(cfg.ckpt, cfg.get("timesteps"))
        scored = scored_generator(Path(cfg.ckpt), generator.timesteps)  # before the work: it may refuse
        model = generator_model(generator, info, f"generator {Path(cfg.ckpt).name}", cfg.seed)
    else:
        s = cfg.sampler
        model = teacher_model(teacher, s.name, s.steps, s.guidance_scale, s.spacing)
    lat = cfg.latency
    results, samples = evaluate_model(model, evaluator, cfg.eval.num_samples, cfg.seed,
                                      cfg.batch_size, lat.batch_sizes, lat.repeats, lat.warmup)
    results["teacher_metrics"] = evaluator.teacher_metrics(cfg.eval.num_samples)
    if cfg.ckpt:
        results["generator"] = scored
    results.update(command=" ".join(["python -m dmd.evaluate", *sys.argv[1:]]),
                   provenance=run_provenance(),
                   wall_seconds=round(time.time() - started, 1),
                   config=OmegaConf.to_container(cfg, resolve=True))
    save_sample_grid(samples[: cfg.eval.grid_size], out_dir / "samples.png")
    write_results(out_dir / "results.json", results)
    with atomic_path(out_dir / "results.md") as tmp:
        tmp.write_text(markdown_table([results]))
    log.info("%s: NFE %d, %s; ms/image %s. Written to %s", model.name, model.nfe,
             {k: round(v, 4) for k, v in results["metrics"].items() if isinstance(v, float)},
             {k: round(v, 3) for k, v in results["latency_ms_per_image"].items()}, out_dir)
    return out_dir


def scored_generator(ckpt: Path, timesteps: list[int]) -> dict:
    """Which generator was scored: its absolute path, the timesteps it sampled at, and, for a
    ``dmd.train`` run dir, the training it had when scored (so that a table can tell a score of
    a run extended since from one of the run as it stands)."""
    scored = {"path": str(ckpt.expanduser().resolve()), "timesteps": list(timesteps)}
    try:
        record = read_results(ckpt / "results.json")
    except (OSError, ValueError) as err:  # a score must not lose which training it belongs to
        raise ValueError(f"{ckpt / 'results.json'} is unreadable ({err}): it records the training this "
                         f"score would belong to. Restore it (e.g. git checkout of a committed record), or "
                         f"score the weights alone: ckpt={ckpt / 'generator'}") from err
    if not record:  # a bare generator folder
        return scored
    scored["training"] = {k: record.get(k) for k in ("status", "iterations", "network_passes")}
    return scored


def with_run_settings(cfg: DictConfig) -> DictConfig:
    """``ckpt=<dmd.train run dir>``: score the generator with the run's own evaluation preset,
    teacher and data (a text-to-image run needs its pipeline and prompts), unless the command
    line picks them (``eval=``, ``teacher=``/``teacher.*``, ``data=``/``data.*``). The preset is
    composed as if given on the command line, so ``eval.num_samples`` keeps this command's
    default; teacher and data are the run's resolved settings."""
    from hydra import compose

    run = Path(str(cfg.ckpt)).expanduser() if cfg.ckpt else None
    if run is None or not (run / "config_resolved.yaml").is_file() or not (run / ".hydra" / "hydra.yaml").is_file():
        return cfg  # the teacher itself, or a bare generator folder
    overrides = job_overrides()
    picked = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    trained = OmegaConf.load(run / "config_resolved.yaml")
    preset = OmegaConf.load(run / ".hydra" / "hydra.yaml").hydra.runtime.choices.get("eval")
    adopted = []
    if preset and "eval" not in picked:
        cfg = compose("evaluate", overrides=[f"eval={preset}", *overrides])
        adopted.append(f"eval={preset}")
    for group in ("teacher", "data"):
        if group in trained and not any(p == group or p.startswith(group + ".") for p in picked):
            cfg[group] = trained[group]
            adopted.append(group)
    guidance = OmegaConf.select(trained, "algorithm.guidance_scale")
    if guidance is not None and not picked & {"algorithm.guidance_scale", "sampler.guidance_scale"}:
        with open_dict(cfg):  # eval presets read the teacher reference's CFG from algorithm.*
            cfg.algorithm = {"guidance_scale": guidance}
        adopted.append(f"guidance scale {guidance:g}")
    if adopted:
        log.info("Evaluating %s with the run's %s (pick others on the command line).", run, ", ".join(adopted))
    return cfg


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run(with_run_settings(cfg))


if __name__ == "__main__":
    main()
