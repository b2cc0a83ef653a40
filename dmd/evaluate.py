"""``python -m dmd.evaluate``: score a teacher sampler or a distilled generator.

    python -m dmd.evaluate ckpt=<train run dir | generator folder>     # a distilled generator
                                   # (a run dir brings its teacher, data and eval preset)
    python -m dmd.evaluate sampler=heun sampler.steps=8 sampler.guidance_scale=2.0  # the teacher

Draws ``eval.num_samples`` samples (seeded noise, class-balanced labels), scores them with the
evaluator of ``eval=`` (FID/KID vs the data and the teacher's reference samples, class
consistency), and times the model: NFE and milliseconds per image at each of
``latency.batch_sizes`` (warm, median of ``latency.repeats``), beside the time of one forward
of the network alone. Writes ``results.json``, ``results.md`` (a markdown table row) and
``samples.png`` into the run dir.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from dmd.generator import Generator, load_generator
from dmd.latency import device_name, latency_ms_per_image
from dmd.provenance import run_provenance
from dmd.runs import job_overrides, require, run_dir, save_resolved_config
from dmd.sample import default_device, draw_samples, generator_sampling_fn, teacher_sampling_fn
from dmd.sampling import SAMPLERS, nfe
from dmd.streams import noise as stream_noise
from dmd.teachers import Teacher
from dmd.visualize import save_sample_grid

log = logging.getLogger(__name__)


@dataclass
class Model:
    """Something that turns noise into samples: a teacher sampler setting or a generator."""

    name: str
    nfe: int
    info: Teacher  # sample shape, labels, null condition
    fn: Callable  # (noise, cond, uncond) -> samples
    network: torch.nn.Module  # the denoiser one NFE runs


def teacher_model(teacher: Teacher, sampler: str = "heun", steps: int = 8,
                  guidance_scale: float = 2.0, spacing: str = "karras") -> Model:
    return Model(f"teacher {sampler} {steps} step{'s' * (steps > 1)}, CFG {guidance_scale:g}",
                 nfe(sampler, steps, guidance_scale), teacher,
                 teacher_sampling_fn(teacher, sampler, steps, guidance_scale, spacing), teacher.denoiser)


def generator_model(generator: Generator, info: Teacher, name: str = "generator",
                    seed: int = 0) -> Model:
    """The same samples for a seed as ``dmd.sample`` and the training-time evaluation draw."""
    return Model(f"{name} ({generator.num_steps} step{'s' * (generator.num_steps > 1)})",
                 generator.num_steps, info, generator_sampling_fn(generator.eval(), seed),
                 generator.denoiser)


def network_forward_fn(model: Model):
    """One forward of the model's network at t = T-1 (the unit NFE counts)."""
    t_max = model.network.schedule.num_train_timesteps - 1

    def fn(z, cond, uncond):
        return model.network(z, torch.full((z.shape[0],), t_max, device=z.device), cond)

    return fn


def evaluate_model(model: Model, evaluator, num_samples: int, seed: int = 0,
                   batch_size: int = 500, latency_batch_sizes=(1, 256), repeats: int = 10,
                   warmup: int = 3, device=None, progress: bool = True):
    """(results dict, samples as images) for one model: metrics, NFE and latency (of the model's
    samples; a latent model's VAE decode is not timed)."""
    device = torch.device(device or default_device())
    model.network.to(device)
    noise = stream_noise("eval", seed, num_samples, model.info.sample_shape)
    started = time.perf_counter()
    samples, labels = draw_samples(model.info, model.fn, noise, None, batch_size, device,
                                   model.name, progress)
    sampling_seconds = time.perf_counter() - started
    samples, labels = model.info.as_images(samples, labels)
    metrics = evaluator(samples, labels, model.info.prompt_list(num_samples))
    latency, forward = {}, {}
    for b in latency_batch_sizes:
        latency[str(b)] = latency_ms_per_image(model.fn, model.info, b, device, repeats, warmup)
        forward[str(b)] = latency_ms_per_image(network_forward_fn(model), model.info, b, device,
                                               repeats, warmup)
    results = {"model": model.name, "nfe": model.nfe, "metrics": metrics,
               "latency_ms_per_image": latency, "network_forward_ms_per_image": forward,
               "sampling_seconds": round(sampling_seconds, 2), "device": device_name(device),
               "num_samples": num_samples, "seed": seed}
    return results, samples


def markdown_table(rows: list[dict], latency_batch: str | None = None) -> str:
    """A markdown table of ``evaluate_model`` results: model, NFE, every metric, ms/image."""
    keys = [k for k in rows[0]["metrics"] if k != "num_samples"]
    for r in rows[1:]:
        keys += [k for k in r["metrics"] if k not in keys and k != "num_samples"]
    lat = latency_batch or next(iter(rows[0]["latency_ms_per_image"]))
    head = ["model", "NFE", *keys, f"ms/image (batch {lat})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vals = [_fmt(r["metrics"].get(k)) for k in keys]
        lines.append("| " + " | ".join([r["model"], str(r["nfe"]), *vals,
                                        _fmt(r["latency_ms_per_image"].get(lat))]) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1 else f"{v:.3f}"
    return str(v)


def run(cfg: DictConfig) -> Path:
    started = time.time()
    require(cfg.eval.num_samples >= 2, f"eval.num_samples must be >= 2, got {cfg.eval.num_samples}.")
    out_dir = run_dir()
    save_resolved_config(cfg, out_dir)
    teacher: Teacher = instantiate(cfg.teacher)  # the real score: its samples are a reference
    evaluator = instantiate(cfg.eval.evaluator)
    evaluator.teacher = teacher  # set after: instantiate() would turn the dataclass into a config
    if cfg.ckpt:
        generator, info = load_generator(cfg.ckpt)
        model = generator_model(generator, info, f"generator {Path(cfg.ckpt).name}", cfg.seed)
    else:
        s = cfg.sampler
        require(s.name in SAMPLERS, f"sampler.name={s.name!r}; choose one of {SAMPLERS}.")
        require(s.steps >= 1, f"sampler.steps must be >= 1, got {s.steps}.")
        model = teacher_model(teacher, s.name, s.steps, s.guidance_scale, s.spacing)
    lat = cfg.latency
    results, samples = evaluate_model(model, evaluator, cfg.eval.num_samples, cfg.seed,
                                      cfg.batch_size, lat.batch_sizes, lat.repeats, lat.warmup)
    results["teacher_metrics"] = evaluator.teacher_metrics(cfg.eval.num_samples)
    results.update(command=" ".join(["python -m dmd.evaluate", *sys.argv[1:]]),
                   provenance=run_provenance(),
                   wall_seconds=round(time.time() - started, 1),
                   config=OmegaConf.to_container(cfg, resolve=True))
    save_sample_grid(samples[: cfg.eval.grid_size], out_dir / "samples.png")
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "results.md").write_text(markdown_table([results]))
    log.info("%s: NFE %d, %s; ms/image %s. Written to %s", model.name, model.nfe,
             {k: round(v, 4) for k, v in results["metrics"].items() if isinstance(v, float)},
             {k: round(v, 3) for k, v in results["latency_ms_per_image"].items()}, out_dir)
    return out_dir


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
