"""Wall-clock latency of a sampling function: warm, median over repeats, per image."""

from __future__ import annotations

import statistics
import time

import torch

from dmd.conditioning import condition_to
from dmd.streams import stream


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def latency_ms_per_image(fn, info, batch_size: int, device, repeats: int = 10,
                         warmup: int = 3, seed: int = 0) -> float:
    """Median milliseconds per image of ``fn(noise, cond, uncond)`` on a batch of ``batch_size``
    (after ``warmup`` untimed calls; each call is synchronised on GPUs)."""
    device = torch.device(device)
    g = stream("latency", seed)
    noise = torch.randn(batch_size, *info.sample_shape, generator=g).to(device)
    cond = condition_to(info.labels(batch_size), device)
    uncond = info.null_condition(batch_size, device)
    for _ in range(warmup):
        fn(noise, cond, uncond)
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(noise, cond, uncond)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times) / batch_size


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
