"""Scoring a model -- a teacher sampler setting or a distilled generator -- with an evaluator:
metrics of its samples, NFE and latency beside one forward of its network. The library behind
``dmd.evaluate`` and the paper-style tables (``experiments/fmnist_table.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dmd.draw import default_device, draw_samples, generator_sampling_fn, teacher_sampling_fn
from dmd.generator import Generator
from dmd.latency import device_name, latency_ms_per_image
from dmd.sampling import nfe
from dmd.streams import noise as stream_noise
from dmd.teachers import Teacher


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
