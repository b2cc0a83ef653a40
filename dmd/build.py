"""The networks and LightningModule of a ``dmd.train`` config: the student's initial network
(:func:`student_init`) and the module of ``algorithm.method`` (:func:`build_module`), for the
train command and for experiments that build the same module (e.g. the iteration benchmark)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from dmd.distances import build_distance
from dmd.generator import Generator
from dmd.methods import method_module
from dmd.regression_pairs import pairs_for_config
from dmd.runs import require
from dmd.student import StudentModule, copy_denoiser
from dmd.t2i.lora import add_lora
from dmd.teachers import Teacher, load_teacher


def student_init(teacher: Teacher, init: str | None) -> Teacher:
    """The network generator and fake score start from: the teacher's, or the one at ``init``
    (e.g. a trained MLP when the real score is the analytic mixture)."""
    if teacher.pipeline_class is not None:  # text-to-image
        require(not init, "init= is not supported for text-to-image teachers: the generator and fake "
                "score start from the teacher's UNet (set init=null).")
        return teacher if teacher.denoiser.unet.dtype == torch.float32 else teacher.with_float32_unet()
    if not init:
        require(hasattr(teacher.denoiser, "unet"),
                f"the teacher ({type(teacher.denoiser).__name__}) has no network to copy into the "
                "generator and fake score: set init=<diffusers folder> (e.g. "
                "init=${paths.checkpoints_dir}/gmm8_mlp for the 2-D mixtures).")
        return teacher
    source = load_teacher(init)
    require(tuple(source.sample_shape) == tuple(teacher.sample_shape),
            f"init={init} makes samples of shape {source.sample_shape}, the teacher "
            f"{teacher.sample_shape}.")
    require(source.num_classes == teacher.num_classes,
            f"init={init} has {source.num_classes} classes, the teacher {teacher.num_classes}.")
    require(source.denoiser.schedule.same_as(teacher.denoiser.schedule),
            f"init={init} was trained with a different noise schedule than the teacher.")
    return source


def build_module(cfg: DictConfig, teacher: Teacher, init: Teacher) -> StudentModule:
    """The LightningModule of ``algorithm.method`` (DMD/DMD2, SiD, knowledge, consistency or
    progressive distillation), its networks compiled when ``compile.enabled``."""
    module = _method_module(cfg, teacher, init)
    options = cfg.get("compile") or {}
    if options.get("enabled"):
        compile_networks(module, options.get("backend", "inductor"), options.get("mode"))
    return module


def compile_networks(module: StudentModule, backend: str = "inductor", mode: str | None = None) -> list:
    """``torch.compile`` every network of the module with weights (:meth:`StudentModule.networks`;
    an analytic teacher has none) in place (``nn.Module.compile``), so weights keep their names:
    checkpoints, resumes and the released generator are those of an eager run. Returns them."""
    networks = [n for n in module.networks() if any(True for _ in n.parameters())]
    for network in networks:
        network.compile(backend=backend, mode=mode)
    return networks


def _method_module(cfg: DictConfig, teacher: Teacher, init: Teacher) -> StudentModule:
    a, o = cfg.algorithm, cfg.optim
    method = method_module(a.get("method", "dmd"))
    T = teacher.denoiser.schedule.num_train_timesteps
    require(a.ttur_ratio >= 1, f"algorithm.ttur_ratio must be >= 1, got {a.ttur_ratio}.")
    require(all(0 <= t < T for t in a.generator_timesteps),
            f"algorithm.generator_timesteps={list(a.generator_timesteps)} must lie in [0, {T - 1}].")
    reg = a.regression
    uses_pairs = method.uses_pairs(a)
    require(not uses_pairs or reg.batch_size >= 1,
            f"algorithm.regression.batch_size must be >= 1, got {reg.batch_size}.")
    require(not uses_pairs or teacher.pipeline_class is None,
            "Teacher noise -> image pairs (DMD's regression loss, knowledge distillation) are not "
            "supported for text-to-image teachers (DMD2 drops the regression): set "
            "algorithm.regression.weight=0, or use algorithm=dmd2.")
    generator = Generator(copy_denoiser(init.denoiser), a.generator_timesteps, sampling=method.generator_sampling)
    fake_score = copy_denoiser(init.denoiser) if method.has_fake_score else None
    lora = a.get("lora") or {}
    trained = [(generator.denoiser, lora.get("generator_rank", 0)), (fake_score, lora.get("fake_score_rank", 0))]
    trained = [(net, rank) for net, rank in trained if net is not None]
    for net, rank in trained:
        if rank:
            require(hasattr(net.unet, "add_adapter"), f"LoRA needs a diffusers UNet; this teacher's "
                    f"network is a {type(net.unet).__name__}: set algorithm.lora ranks to 0.")
            add_lora(net.unet, rank, lora.get("alpha"))
    if cfg.get("gradient_checkpointing"):
        for net, _ in trained:
            require(hasattr(net.unet, "enable_gradient_checkpointing"), "gradient_checkpointing needs a "
                    f"diffusers UNet; this teacher's network is a {type(net.unet).__name__}.")
            net.unet.enable_gradient_checkpointing()
    pairs = distance = None
    if uses_pairs:
        pairs = pairs_for_config(cfg, teacher)
        distance = build_distance(reg.distance, reg.get("network"))
    student = dict(lr_generator=o.lr_generator, betas=o.betas, weight_decay=o.weight_decay, fused=o.get("fused", False),
                   warmup_steps=o.warmup_steps, grad_clip=o.grad_clip, ema_decay=a.ema_decay,
                   max_iterations=cfg.max_iterations, seed=cfg.seed,
                   max_network_passes=cfg.get("max_network_passes"),
                   finite_check_every=cfg.get("finite_check_every"))
    return method.from_config(cfg, teacher, generator, fake_score, pairs, distance, **student)
