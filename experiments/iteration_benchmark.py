"""What one DMD2 iteration costs against what its network passes must cost (issue 18).

    python experiments/iteration_benchmark.py [--preset fmnist_dmd2 fmnist_dmd2_4step t2i_tiny]
        [--iterations 50] [--warmup 10] [--probe-iterations 10] [--override KEY=VALUE ...]
        [--sd15 full full+gc lora64 lora64+gc] [--out experiments/results/iteration_benchmark]

On a GPU, ``bash experiments/iteration_benchmark_gpu.sh`` gives every GPU row in one run.

For each preset the module is built exactly as ``python -m dmd.train experiment=<preset>`` builds
it (:func:`dmd.build.build_module`) and trained by a Lightning Trainer from the preset's trainer
config (no logger, progress bar, checkpoint or evaluation callback: their cost is not the
iteration's). Reported:

- wall time per iteration (median over ``--iterations`` after ``--warmup``; an iteration runs from
  one ``on_train_batch_start`` to the next, so data loading and Lightning's own work count), split
  into generator iterations (every TTUR-ratio-th: generator update + fake-score update) and
  fake-score iterations;
- the same iteration's network passes timed alone, back to back, on the same batch: generator
  forward (+ backward), the real score's (CFG) forward, the fake score's forward and forward +
  backward, the discriminator (fake score's encoder + head) forward + backward for its own step and
  forward + backward to the sample only (the generator's GAN loss); their sum per iteration type and
  the ratio iteration / sum of passes (everything else -- loss arithmetic, optimiser steps, EMA,
  gradient norms and clipping, bookkeeping -- is overhead; the AdamW steps are timed alone too);
- generator updates per hour, peak memory (peak RSS of the process on the CPU,
  ``torch.cuda.max_memory_allocated`` on a GPU);
- host synchronisations per iteration (reads of GPU tensors' values, ``.item()`` and friends)
  and the reads of tensor values made by dmd's own code (the hot path's; measurable on the CPU
  too), over ``--probe-iterations`` iterations; on a GPU, over as many more under
  ``torch.profiler``, the share of wall time in which no kernel runs.

Writes ``<out>.json`` and ``<out>.md``. Runs on the CPU or on one GPU (the default device of the
preset's trainer config); everything else is the same code path.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils._python_dispatch import TorchDispatchMode

from dmd import ROOT_DIR
from dmd.build import build_module, student_init
from dmd.conditioning import guided_x0
from dmd.gan import bottleneck_features
from dmd.module import DMDModule
from dmd.teachers import Teacher


def compose_train(preset: str, overrides=()):
    with initialize_config_dir(str(ROOT_DIR / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"experiment={preset}", *overrides])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ValueReads(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (``aten::_local_scalar_dense``: ``.item()``,
    ``float(t)``, ``if t:``): on a GPU, those of device tensors are host synchronisations. On any
    device it also counts those made by dmd's own code and by Lightning's (its logging): on a GPU
    they read device tensors (torch's optimisers read their CPU step counters: never a sync)."""

    def __init__(self):
        super().__init__()
        self.device_reads = self.dmd_reads = self.lightning_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.device_reads += args[0].device.type != "cpu"
            frames = [f.filename for f in traceback.extract_stack()[:-1]]
            if any(f"{os.sep}torch{os.sep}optim{os.sep}" in f for f in frames):
                return func(*args, **(kwargs or {}))  # an optimiser's CPU step counter
            caller = next((f for f in reversed(frames) if f"{os.sep}torch{os.sep}" not in f
                           and "python_dispatch" not in f), "")
            self.dmd_reads += f"{os.sep}dmd{os.sep}" in caller
            self.lightning_reads += "lightning" in caller
        return func(*args, **(kwargs or {}))


class IterationTimer(pl.Callback):
    """Wall time of the iterations ``timed`` (one batch start to the next), by iteration type;
    then ``probe`` iterations that count the host's tensor-value reads (:class:`ValueReads`) and,
    on a GPU, ``probe`` iterations under ``torch.profiler`` (the share of time no kernel runs)."""

    def __init__(self, timed: range, probe: int):
        self.timed, self.probe = timed, probe
        self.times: dict[str, list[float]] = {"generator": [], "fake": []}
        self._last: tuple[float, str, int] | None = None
        self.probes: dict = {}
        self._open = None  # (kind, context, start time, start iteration)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        now = self._now(module)
        it = module.iteration
        reads_from = self.timed.stop
        profile_from = reads_from + self.probe
        if self.probe and it == reads_from:
            self._start("reads", ValueReads(), now, it)
        elif self.probe and it == profile_from and module.device.type == "cuda":
            self._stop(now, it)
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            self._start("profile", torch.profiler.profile(activities=activities), now, it)
        self._last = (now, "generator" if it % module.ttur_ratio == 0 else "fake", it)

    def on_train_end(self, trainer, module):
        self._stop(self._now(module), module.iteration)

    def _start(self, kind, context, now, it):
        context.__enter__()
        self._open = (kind, context, now, it)

    def _stop(self, now, it):
        if self._open is None:
            return
        kind, context, start, first = self._open
        context.__exit__(None, None, None)
        self._open, n = None, max(1, it - first)
        if kind == "reads":
            self.probes["probed_iterations"] = n
            self.probes["host_syncs_per_iteration"] = context.device_reads / n
            self.probes["value_reads_in_dmd_per_iteration"] = context.dmd_reads / n
            self.probes["value_reads_in_lightning_per_iteration"] = context.lightning_reads / n
        else:
            self.probes["gpu_idle_share"] = gpu_idle_share(context, now - start)

    def _now(self, module) -> float:
        """The time now; closes the previous iteration (recorded if it is a timed one)."""
        _sync(module.device)
        now = time.perf_counter()
        if self._last is not None and self._last[2] in self.timed:
            self.times[self._last[1]].append(now - self._last[0])
        return now


def gpu_idle_share(prof, wall: float) -> float:
    """The share of ``wall`` seconds in which no CUDA kernel ran (union of kernel intervals)."""
    kernels = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    if not kernels:
        return 1.0
    busy, (lo, hi) = 0.0, kernels[0]
    for s, e in kernels[1:]:
        if s > hi:
            busy, lo, hi = busy + hi - lo, s, e
        else:
            hi = max(hi, e)
    busy += hi - lo
    return max(0.0, 1.0 - busy * 1e-6 / wall)


def time_call(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls, after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _backward(out: torch.Tensor) -> None:
    (out.float() * torch.randn_like(out, dtype=torch.float32)).sum().backward()


def pass_costs(module: DMDModule, batch, repeats: int) -> dict[str, float]:
    """Each network pass of a DMD2 iteration timed alone on ``batch`` (seconds, median)."""
    device = module.device
    real, cond = module.data_batch(batch)
    n = real.shape[0]
    uncond = module.teacher.null_condition(n, device)
    T = module.real_score.schedule.num_train_timesteps
    t = torch.full((n,), T // 2, device=device, dtype=torch.long)
    with torch.no_grad():
        x_t = module.generate(n, cond)
    fake, head = module.fake_score, module.gan_head

    # Step k of a multi-step generator runs k no-grad passes before its own (backward
    # simulation): its passes are the mean over the uniform k of training.
    noise = module.noise(n)
    steps = range(module.generator.num_steps) if module.backward_simulation else range(1)

    def generator(k: int, grad: bool):
        with torch.set_grad_enabled(grad):
            out = module.generator.backward_simulation(noise, cond, k, generator=module.rng)
        if grad:
            _backward(out)

    def discriminator_to_sample():  # the generator's GAN loss: gradients reach the sample only
        x = x_t.detach().requires_grad_(True)
        with module.discriminator_frozen():
            torch.autograd.grad(head(bottleneck_features(fake, x, t, cond)).sum(), x)

    costs = {name: statistics.mean(time_call(lambda k=k, g=grad: generator(k, g), device, repeats) for k in steps)
             for name, grad in (("generator forward", False), ("generator forward+backward", True))}
    passes = {
        "real score forward (CFG)": lambda: _no_grad(guided_x0, module.real_score, x_t, t, cond, uncond,
                                                     module.guidance_scale),
        "fake score forward": lambda: _no_grad(fake, x_t, t, cond),
        "fake score forward+backward": lambda: _backward(fake(x_t, t, cond)),
    }
    if head is not None:
        passes["discriminator forward+backward"] = lambda: _backward(head(bottleneck_features(fake, x_t, t, cond)))
        passes["discriminator forward+backward to the sample"] = discriminator_to_sample
    costs.update({name: time_call(fn, device, repeats) for name, fn in passes.items()})
    module.zero_grad(set_to_none=True)
    return costs


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


def expected_passes(module: DMDModule, costs: dict[str, float]) -> dict[str, float]:
    """Sum of pass costs of each iteration type (what the iteration must cost)."""
    fake_step = costs["fake score forward+backward"]
    if module.gan_discriminator_weight > 0:
        fake_step += 2 * costs["discriminator forward+backward"]  # real and generated samples
    generator = costs["generator forward+backward"] + costs["real score forward (CFG)"] + costs["fake score forward"]
    if module.gan_generator_weight > 0:
        generator += costs["discriminator forward+backward to the sample"]
    return {"generator": generator + fake_step, "fake": costs["generator forward"] + fake_step}


def optimizer_costs(module: DMDModule, repeats: int) -> dict[str, float]:
    """One AdamW step of each optimiser alone (gradients present), seconds."""
    out = {}
    for name, opt in zip(("generator", "fake"), module.optimizers()):
        params = [p for g in opt.param_groups for p in g["params"]]
        for p in params:
            p.grad = torch.zeros_like(p)
        out[f"AdamW step ({name})"] = time_call(opt.step, module.device, repeats)
    return out


@dataclasses.dataclass
class _TextTeacher(Teacher):
    """A text-conditioned teacher on random prompt embeddings (no text encoder, no VAE: the
    iteration never runs them; embeddings are cached in real runs)."""

    tokens: int = 77

    def condition(self, batch_condition):
        return batch_condition

    def null_condition(self, n: int, device=None):
        width = self.denoiser.unet.config.cross_attention_dim
        return {"encoder_hidden_states": torch.zeros(n, self.tokens, width, device=device)}


def sd15_setup(batch_size: int, lora_rank: int = 0, checkpointing: bool = False, scale: str = "full",
               teacher_dtype=torch.bfloat16):
    """DMD2 (TTUR 5, GAN, CFG 1.75, one step) on a random UNet2DConditionModel of Stable
    Diffusion 1.5's published config (``scale="tiny"``: a small one of the same kind, for tests),
    64x64 latents; the teacher in ``teacher_dtype``, generator and fake score in float32 (fully
    trained, or LoRA adapters of ``lora_rank``), with or without gradient checkpointing.
    Returns (module, data loader of random latents and prompt embeddings)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from dmd.denoisers import DiffusersUNetDenoiser
    from dmd.generator import Generator
    from dmd.schedule import VPSchedule
    from dmd.student import copy_denoiser
    from dmd.t2i.lora import add_lora

    spec = importlib.util.spec_from_file_location("memory_recipe", Path(__file__).with_name("memory_recipe.py"))
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    config = recipe.UNETS["SD1.5"]
    if scale == "tiny":
        config = {**config, "sample_size": 16, "block_out_channels": (32, 32, 64, 64), "layers_per_block": 1,
                  "cross_attention_dim": 32, "norm_num_groups": 8}
    size = config["sample_size"]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    schedule = VPSchedule.from_diffusers(scheduler)
    trained = [copy_denoiser(DiffusersUNetDenoiser(unet, schedule, "epsilon")) for _ in range(2)]
    for net in trained:
        if lora_rank:
            add_lora(net.unet, lora_rank)
        if checkpointing:
            net.unet.enable_gradient_checkpointing()
    frozen = DiffusersUNetDenoiser(unet.to(teacher_dtype), schedule, "epsilon")
    teacher = _TextTeacher(frozen.requires_grad_(False), (4, size, size), 0, scheduler)
    module = DMDModule(teacher, Generator(trained[0], (999,)), trained[1], guidance_scale=1.75, ttur_ratio=5,
                       lr_generator=1e-5, lr_fake=1e-5, gan_generator_weight=1e-3,
                       gan_discriminator_weight=1e-2, ema_decay=None, finite_check_every=None)
    width = config["cross_attention_dim"]
    latents = torch.randn(8 * batch_size, 4, size, size)
    prompts = torch.randn(8 * batch_size, 77, width)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(latents)

        def __getitem__(self, i):
            return latents[i], {"encoder_hidden_states": prompts[i]}

    return module, torch.utils.data.DataLoader(Data(), batch_size=batch_size, shuffle=True, drop_last=True)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build(preset: str, overrides=()):
    """(config, module, datamodule) of ``preset`` as ``dmd.train`` builds them (seeded)."""
    cfg = compose_train(preset, ["logger=none", *overrides])
    pl.seed_everything(cfg.seed)
    teacher = instantiate(cfg.teacher)
    return cfg, build_module(cfg, teacher, student_init(teacher, cfg.init)), instantiate(cfg.data)


def benchmark(preset: str, overrides=(), iterations: int = 50, warmup: int = 10, probe: int = 10,
              repeats: int = 20) -> dict:
    """Train ``preset`` (as ``dmd.train`` builds it) for warmup + iterations (+ probes) and time
    it; time the same passes alone. Returns the report row."""
    cfg, module, datamodule = build(preset, overrides)
    row = measure(module, lambda callbacks: instantiate(cfg.trainer, callbacks=callbacks, **QUIET),
                  {"datamodule": datamodule}, iterations, warmup, probe, repeats)
    return {"preset": preset, "overrides": list(overrides), "precision": cfg.trainer.get("precision"), **row}


def sd15_benchmark(batch_size: int, lora_rank: int, checkpointing: bool, iterations: int = 50, warmup: int = 10,
                   probe: int = 10, repeats: int = 20, scale: str = "full") -> dict:
    """:func:`sd15_setup`'s module trained on one GPU in bf16 autocast (float32 on the CPU)."""
    module, data = sd15_setup(batch_size, lora_rank, checkpointing, scale,
                              torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    row = measure(module, lambda callbacks: pl.Trainer(accelerator="auto", devices=1, precision=precision,
                                                      max_epochs=-1, callbacks=callbacks, **QUIET),
                  {"train_dataloaders": data}, iterations, warmup, probe, repeats)
    label = f"SD1.5-size UNet ({scale}), {f'LoRA {lora_rank}' if lora_rank else 'full'}"
    return {"preset": label + (", gradient checkpointing" if checkpointing else ""), "overrides": [],
            "precision": precision, **row}


class LossRecorder(pl.Callback):
    """The fake-score (every iteration) and DM (generator iterations) losses of each iteration."""

    def __init__(self):
        self.losses: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        logged = trainer.callback_metrics
        self.losses.append({k: float(logged[k]) for k in ("loss/fake", "loss/dm") if k in logged})


def compile_check(preset: str, overrides=(), iterations: int = 20, backend: str = "inductor",
                  mode: str | None = None) -> dict:
    """``iterations`` of ``preset`` in eager mode and compiled (``compile.enabled=true``), from
    the same seed: each iteration's losses, and the largest relative difference between them."""
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["compile.enabled=true", f"compile.backend={backend}",
                                                     f"compile.mode={mode or 'null'}"])):
        cfg, module, datamodule = build(preset, [*overrides, *extra])
        module.max_iterations = iterations
        recorder = LossRecorder()
        started = time.perf_counter()
        instantiate(cfg.trainer, callbacks=[recorder], **QUIET).fit(module, datamodule=datamodule)
        runs[name] = {"losses": recorder.losses, "wall_s": time.perf_counter() - started,
                      "network_passes": module.network_passes, "weight_names": sorted(module.state_dict())}
    pairs = [(a[k], b[k]) for a, b in zip(runs["eager"]["losses"], runs["compiled"]["losses"]) for k in a]
    worst = max(abs(x - y) / max(abs(x), 1e-12) for x, y in pairs)
    same_names = runs["eager"].pop("weight_names") == runs["compiled"].pop("weight_names")
    return {"preset": preset, "backend": backend, "mode": mode, "iterations": iterations,
            "max_relative_loss_difference": worst, "same_weight_names": same_names, **runs}


# The trainers' root (a prompt datamodule writes its index there): never the working directory.
QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
             default_root_dir=tempfile.mkdtemp(prefix="iteration_benchmark_"))


def measure(module: DMDModule, make_trainer, data: dict, iterations: int, warmup: int, probe: int,
            repeats: int) -> dict:
    """Fit ``module`` with a trainer from ``make_trainer(callbacks)`` on ``data`` (fit's keyword
    arguments), timing iterations, then its passes alone; the report row's measurements."""
    if type(module) is not DMDModule or module.regression_weight > 0:
        raise SystemExit("The benchmark models DMD2's passes (DMDModule without a regression term).")
    ratio = module.ttur_ratio
    module.max_iterations = warmup + iterations + probe * (2 if torch.cuda.is_available() else 1)
    timer = IterationTimer(range(warmup, warmup + iterations), probe)
    trainer = make_trainer([timer])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, **data)
    peak = peak_memory_mb(module.device)
    loader = data["datamodule"].train_dataloader() if "datamodule" in data else data["train_dataloaders"]
    batch = module.transfer_batch_to_device(next(iter(loader)), module.device, 0)
    with torch.autocast(module.device.type, torch.bfloat16, enabled="bf16" in str(trainer.precision)):
        costs = pass_costs(module, batch, repeats)
    costs.update(optimizer_costs(module, repeats))
    must = expected_passes(module, costs)
    med = {k: statistics.median(v) for k, v in timer.times.items() if v}
    per_iteration = (med["generator"] + (ratio - 1) * med.get("fake", 0.0)) / ratio
    must_per_iteration = (must["generator"] + (ratio - 1) * must["fake"]) / ratio
    return {
        "device": _device_name(module.device), "batch_size": int(batch[0].shape[0]), "ttur_ratio": ratio,
        "generator_steps": module.generator.num_steps,
        "timed_iterations": {k: len(v) for k, v in timer.times.items()},
        "iteration_s": {**med, "mean_over_ttur_cycle": per_iteration},
        "passes_alone_s": costs, "sum_of_passes_s": {**must, "mean_over_ttur_cycle": must_per_iteration},
        "ratio_iteration_to_passes": {k: med[k] / must[k] for k in med} | {
            "mean_over_ttur_cycle": per_iteration / must_per_iteration},
        "generator_updates_per_hour": 3600 / (per_iteration * ratio),
        "peak_memory_mb": peak, **timer.probes,
        "threads": torch.get_num_threads(),
    }


def attempt(label: str, fn, *args, **kwargs) -> dict:
    """``fn(*args, **kwargs)``'s row, or {label, error} if it fails: one GPU run gives every row
    it can (an unsupported compile mode must not cost the others)."""
    try:
        row = fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 -- recorded in the report, beside the rows that ran
        traceback.print_exc()
        return {"label": label, "error": f"{type(err).__name__}: {err}"[:500]}
    print(json.dumps(row, indent=1), flush=True)
    return row


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def markdown(rows: list[dict], command: str) -> str:
    head = ["preset", "device", "batch", "iteration (gen / fake) ms", "sum of passes (gen / fake) ms",
            "iteration / passes", "generator updates / h", "peak memory MiB", "host syncs / iteration", "value reads (dmd / Lightning) / iteration",
            "GPU idle"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        it, must, ratio = r["iteration_s"], r["sum_of_passes_s"], r["ratio_iteration_to_passes"]
        idle = f"{100 * r['gpu_idle_share']:.0f}%" if "gpu_idle_share" in r else "-"
        lines.append(
            f"| {r['preset']}{' ' + ' '.join(r['overrides']) if r['overrides'] else ''} | {r['device']} | "
            f"{r['batch_size']} | {1e3 * it['generator']:.1f} / {1e3 * it.get('fake', 0):.1f} | "
            f"{1e3 * must['generator']:.1f} / {1e3 * must['fake']:.1f} | "
            f"{ratio['mean_over_ttur_cycle']:.3f} | {r['generator_updates_per_hour']:.0f} | "
            f"{r['peak_memory_mb']:.0f} | {r.get('host_syncs_per_iteration', 0):.1f} | "
            f"{r.get('value_reads_in_dmd_per_iteration', 0):.1f} / "
            f"{r.get('value_reads_in_lightning_per_iteration', 0):.1f} | {idle} |")
    lines += ["", "Iteration: median wall time from one batch start to the next (generator iterations "
              "update the generator and the fake score, fake-score iterations the fake score only); "
              "sum of passes: the same network passes timed alone, back to back "
              "(per pass: experiments/results/iteration_benchmark.json); the ratio is over one TTUR cycle.",
              "", f"Command: `{command}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="*", default=["fmnist_dmd2", "fmnist_dmd2_4step", "t2i_tiny"],
                   help="presets, each NAME or NAME:KEY=VALUE,... (e.g. fmnist_dmd2:data.batch_size=128)")
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--probe-iterations", type=int, default=10)
    p.add_argument("--repeats", type=int, default=20, help="timings of each pass alone")
    p.add_argument("--override", nargs="*", default=[], help="Hydra overrides for every preset")
    p.add_argument("--sd15", nargs="*", default=[], metavar="VARIANT",
                   help="SD1.5-size UNet rows (GPU): full, full+gc, lora64, lora64+gc (gc: gradient checkpointing)")
    p.add_argument("--sd15-batch", type=int, default=8)
    p.add_argument("--sd15-scale", choices=["full", "tiny"], default="full", help="tiny: a small UNet (tests)")
    p.add_argument("--compile-check", nargs="*", default=[], metavar="PRESET",
                   help="also train each PRESET 20 iterations eager and compiled (--compile-backend) and "
                        "compare their losses")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--out", default=str(ROOT_DIR / "experiments" / "results" / "iteration_benchmark"))
    args = p.parse_args()
    rows = []
    timing = (args.iterations, args.warmup, args.probe_iterations, args.repeats)

    def parse(entry):  # NAME or NAME:KEY=VALUE,KEY=VALUE (that preset's own overrides)
        preset, _, own = entry.partition(":")
        return preset, [*args.override, *filter(None, re.split(r",(?![^\[]*\])", own))]  # not inside [...]

    for entry in args.preset:
        rows.append(attempt(entry, benchmark, *parse(entry), *timing))
    for variant in args.sd15:
        name, _, extra = variant.partition("+")
        rank = int(name[4:]) if name.startswith("lora") else 0
        rows.append(attempt(f"sd15 {variant}", sd15_benchmark, args.sd15_batch, rank, extra == "gc", *timing,
                            args.sd15_scale))
    checks = [attempt(f"compile check {entry}", compile_check, *parse(entry), backend=args.compile_backend)
              for entry in args.compile_check]
    failed = [r for r in [*rows, *checks] if "error" in r]
    rows, checks = [r for r in rows if "error" not in r], [c for c in checks if "error" not in c]
    command = "python experiments/iteration_benchmark.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows, "compile_checks": checks,
                                                    "failed": failed}, indent=1))
    text = markdown(rows, command) + "".join(
        f"\nCompiled ({c['backend']}) vs eager, {c['preset']}, {c['iterations']} iterations from the same seed: "
        f"largest relative loss difference {c['max_relative_loss_difference']:.2e}, wall "
        f"{c['compiled']['wall_s']:.1f} s vs {c['eager']['wall_s']:.1f} s (compilation included).\n" for c in checks) + "".join(
        f"\nFAILED: {f['label']}: {f['error']}\n" for f in failed)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
