"""What the LightningModule of every distillation method shares: the student generator, the
frozen teacher, the module's own counters and random stream, EMA of the generator's weights,
checkpointed state, FSDP sharding and the release of the generator.

Methods subclass :class:`StudentModule` with their own ``train_iteration`` and optimisers
(:class:`dmd.module.DMDModule`: DMD and DMD2; :mod:`dmd.methods`: SiD, knowledge, consistency
and progressive distillation). Optimisation is manual: ``iteration`` counts training steps of
the method's loop, ``generator_steps`` the generator's updates and ``fake_steps`` those of a
fake score (if any); they are checkpointed with every rank's random stream, so that a resumed
run continues exactly where it stopped.

``network_passes`` counts, per rank, the samples every network (teacher, generator, fake score,
target or previous-round networks; an analytic teacher too) was run forward on during training
iterations (a CFG call counts twice, a GAN head's truncated pass once; backward passes and
evaluation are not counted): the budget that compares methods whose iterations cost different
numbers of passes. ``max_network_passes`` stops training once it is spent.
"""

from __future__ import annotations

import copy
import hashlib

import pytorch_lightning as pl
import torch
from diffusers.training_utils import EMAModel
from torch import nn

from dmd.generator import Generator
from dmd.sharding import (
    full_state_dict,
    gather_to_cpu,
    is_sharded,
    materialize,
    meta_copy,
    shard_like,
    shard_networks,
    whole,
)
from dmd.streams import stream_seed
from dmd.teachers import Teacher

RANK_SEED_STRIDE = 1_000_003


def training_rng(seed: int, rank: int = 0) -> torch.Generator:
    """The module's random stream on one rank: noise, timesteps and regression batches."""
    return torch.Generator().manual_seed(stream_seed("training", seed + RANK_SEED_STRIDE * rank))


def warmup(optimizer, steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, steps)))


def _grad_norm(parameters) -> torch.Tensor:
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    return whole(torch.nn.utils.get_total_norm(grads))  # sharded grads: one all-reduce


class StudentModule(pl.LightningModule):
    """A generator trained against a frozen teacher (``real_score``), by a method's own loop.

    A method declares what :func:`dmd.build.build_module` makes for it (class attributes) and
    how its config group becomes its arguments (:meth:`from_config`)."""

    #: the method trains a fake score (a copy of the initial network beside the generator)
    has_fake_score = False
    #: how the generator takes its steps: fresh noise (DMD) or DDIM steps (progressive distillation)
    generator_sampling = "fresh"
    #: length settings that are part of what a run trains (a resume may not change them)
    planned_lengths: tuple[str, ...] = ()

    @classmethod
    def uses_pairs(cls, algorithm) -> bool:
        """Whether the method trains on cached teacher noise -> image pairs."""
        return algorithm.regression.weight > 0

    @classmethod
    def from_config(cls, cfg, teacher: Teacher, generator: Generator, fake_score: nn.Module | None,
                    pairs: dict | None, distance: nn.Module | None, **student) -> StudentModule:
        """The module of a ``dmd.train`` config (``student``: the settings every method shares)."""
        raise NotImplementedError(f"{cls.__name__} does not say how it is built from a config.")

    def __init__(self, teacher: Teacher, generator: Generator, lr_generator: float = 1e-5,
                 betas=(0.9, 0.999), weight_decay: float = 0.01, warmup_steps: int = 0,
                 grad_clip: float = 10.0, ema_decay: float | None = None,
                 max_iterations: int | None = None, seed: int = 0,
                 regression_distance: nn.Module | None = None, max_network_passes: int | None = None,
                 finite_check_every: int | None = None, fused: bool = False):
        super().__init__()
        self.automatic_optimization = False
        self.teacher = teacher
        self.real_score = teacher.denoiser.requires_grad_(False).eval()
        self.generator = generator
        # The distance of regressions on teacher pairs (DMD's term, KD's loss): frozen, not checkpointed.
        self.regression_distance = regression_distance
        if isinstance(regression_distance, nn.Module):
            regression_distance.requires_grad_(False)
        self.lr_generator, self.betas = lr_generator, tuple(betas)
        self.weight_decay, self.warmup_steps, self.grad_clip = weight_decay, warmup_steps, grad_clip
        self.fused = fused  # torch's fused AdamW (not bit-identical to the default implementation)
        self.seed, self.max_iterations = seed, max_iterations
        # Only trained weights (all of them, or the LoRA adapters) are optimised and averaged.
        self.ema_decay = ema_decay
        self.ema = EMAModel(trainable(generator), decay=ema_decay) if ema_decay else None
        self._release_template: list[nn.Module] = []  # FSDP: the generator's shape, weightless
        self.rng = training_rng(seed)
        self.iteration = self.generator_steps = self.fake_steps = 0
        self.network_passes, self.max_network_passes = 0, max_network_passes
        self._counting = False  # inside a training iteration (not evaluation or release)
        self.finite_check_every = finite_check_every  # None: auto (see finite_check_interval)
        self._unchecked: list = []  # (iteration, which, loss) of losses not yet checked
        self._pass_hooks: list = []
        # (iteration, step) pairs backward simulation trained, hashed: ranks compare it (train.py)
        self.backward_simulation_trace = hashlib.sha256()

    def other_trained_networks(self) -> list:
        """Trained networks besides the generator (sharded with it under FSDP)."""
        return []

    def frozen_networks(self) -> dict:
        """Submodules that are not trained state: never checkpointed, rebuilt from the config."""
        frozen = {"real_score": self.real_score}
        if isinstance(self.regression_distance, nn.Module):
            frozen["regression_distance"] = self.regression_distance
        return frozen

    def adamw(self, params, lr: float):
        return torch.optim.AdamW(params, lr=lr, betas=self.betas, weight_decay=self.weight_decay,
                                 fused=self.fused or None)

    def training_step(self, batch, batch_idx):
        """One iteration of the method's loop (``train_iteration``), its network passes counted."""
        self._counting = True
        try:
            return self.train_iteration(batch)
        finally:
            self._counting = False

    def train_iteration(self, batch):
        raise NotImplementedError

    def finish_iteration(self, logs: dict) -> None:
        """Count the iteration, log it and stop at the run's length (or spent pass budget)."""
        self.iteration += 1
        if self.iteration % self.finite_check_interval == 0:
            self.verify_finite()
        logs.update({"counters/iteration": float(self.iteration),
                     "counters/generator_steps": float(self.generator_steps),
                     "counters/fake_steps": float(self.fake_steps),
                     "counters/network_passes": float(self.network_passes)})
        self.log_dict(logs, prog_bar=False)
        if self.max_iterations and self.iteration >= self.max_iterations:
            self.trainer.should_stop = True
        if self.budget_spent:
            self.trainer.should_stop = True

    def progress(self, name: str, value) -> None:
        """Show ``value`` on the progress bar, on the CPU only: Lightning reads every progress-bar
        value on the host after each batch (on a GPU, a sync per iteration); the logger still
        records every loss every ``trainer.log_every_n_steps``."""
        if self.device.type == "cpu":
            self.log(name, value, prog_bar=True, logger=False)

    @property
    def budget_spent(self) -> bool:
        return bool(self.max_network_passes) and self.network_passes >= self.max_network_passes

    def networks(self) -> list[nn.Module]:
        """Every network the module runs, once each: a denoiser's ``unet``, or an analytic
        denoiser itself (teacher, generator, fake score, target or previous-round networks)."""
        from dmd.denoisers import Denoiser

        found = {id(n): n for m in self.modules() if isinstance(m, Denoiser) for n in [getattr(m, "unet", m)]}
        return list(found.values())

    def count_network_passes(self) -> None:
        """Hook every network (:meth:`networks`) so that each forward call inside a training
        iteration adds its batch size to ``network_passes``."""
        for handle in self._pass_hooks:
            handle.remove()

        def count(network, args, kwargs):
            if self._counting:
                first = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
                self.network_passes += int(first.shape[0])

        self._pass_hooks = [n.register_forward_pre_hook(count, with_kwargs=True) for n in self.networks()]

    def setup(self, stage: str) -> None:
        # Each rank draws its own noise and timesteps (rank 0: the single-process stream), before
        # a resumed checkpoint restores every rank's own state. The backward-simulation step
        # stays a function of (iteration, seed): the same on every rank.
        self.rng = training_rng(self.seed, self.global_rank)

    def configure_model(self) -> None:
        # Under trainer=fsdp (dmd.sharding.FullyShardedStrategy) Lightning gives the module a
        # device mesh: shard the trained networks. The frozen real score stays whole on every
        # rank (rank 0 alone samples the teacher for evaluation references).
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None or is_sharded(self.generator):
            return
        self._release_template[:] = [meta_copy(self.generator)]
        shard_networks([self.generator.denoiser, *self.other_trained_networks()], mesh["data_parallel"])
        if self.ema is not None:  # average the shards each rank holds
            self.ema = EMAModel(trainable(self.generator), decay=self.ema_decay)

    @property
    def sharded(self) -> bool:
        return is_sharded(self.generator)

    def on_fit_start(self):
        self.count_network_passes()
        if self.ema is not None:  # EMAModel keeps its own copies: follow the module's device
            self.ema.to(self.device)

    def on_train_start(self):
        self.apply_configured_hyperparameters()

    def apply_configured_hyperparameters(self):
        """Set the optimisers' and schedulers' settings (learning rates, betas, weight decay) to
        this run's config. Lightning restores them from a resumed checkpoint, so a change allowed
        on resume (``allow_changes_on_resume``) would otherwise be recorded and never trained with;
        unchanged settings give the restored values exactly."""
        fresh_optimizers, fresh_schedulers = self.configure_optimizers()
        schedulers = [c.scheduler for c in self.trainer.lr_scheduler_configs]
        for opt, fresh, sched, fresh_sched in zip(self.trainer.optimizers, fresh_optimizers, schedulers,
                                                  fresh_schedulers, strict=True):
            for group, new in zip(opt.param_groups, fresh.param_groups, strict=True):
                for key in ("initial_lr", "betas", "weight_decay", "eps"):
                    group[key] = new[key]
            sched.base_lrs = list(fresh_sched.base_lrs)
            for group, base, factor in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
                group["lr"] = base * factor(sched.last_epoch)  # the scheduler's own rule at its step
            sched._last_lr = [group["lr"] for group in opt.param_groups]

    def on_train_batch_start(self, batch, batch_idx):
        # A run resumed at (or beyond) its length does no further update.
        if (self.max_iterations and self.iteration >= self.max_iterations) or self.budget_spent:
            self.trainer.should_stop = True
            return -1
        return None

    def data_batch(self, batch):
        """(samples, condition) of a data batch, checked against the teacher's sample shape."""
        real, labels = batch
        if tuple(real.shape[1:]) != tuple(self.teacher.sample_shape):
            raise ValueError(f"The data's samples have shape {tuple(real.shape[1:])}, the teacher's "
                             f"{tuple(self.teacher.sample_shape)}: match the data's resolution "
                             "(e.g. data.image_size) to the teacher's.")
        return real, self.teacher.condition(labels)  # class labels, text embeddings or None

    def noise(self, n: int):
        """Pure noise z ~ N(0, I) from the module's random stream."""
        return torch.randn(n, *self.teacher.sample_shape, generator=self.rng).to(self.device)

    def _check_finite(self, loss, which: str):
        """Check that ``loss`` is finite before its update (``finite_check_every`` = 1, the CPU
        default), or queue the check for the next :meth:`verify_finite`, so that on a GPU the hot
        path never waits for the device (a check reads the value on the host)."""
        self._unchecked.append((self.iteration, which, loss.detach()))
        if self.finite_check_interval == 1:
            self.verify_finite()

    @property
    def finite_check_interval(self) -> int:
        """Iterations between checks of the losses: ``finite_check_every``, or 1 on the CPU and
        10 on accelerators (auto)."""
        if self.finite_check_every:
            return int(self.finite_check_every)
        return 1 if self.device.type == "cpu" else 10

    def verify_finite(self) -> None:
        """Raise if a loss queued by :meth:`_check_finite` is not finite: one host read of the
        device, and every rank learns of a non-finite loss on any rank (none is left waiting in
        an all-reduce). Called before every save, release and evaluation, so that nothing is
        written from weights a non-finite loss has updated. Collective."""
        queued, self._unchecked = self._unchecked, []
        if not queued:  # every rank queues the same updates: all return here together
            return
        bad = not bool(torch.stack([torch.isfinite(q[2]).all() for q in queued]).all())
        if not self.trainer.strategy.reduce_boolean_decision(bad, all=False):
            return
        iteration, which, loss = next((q for q in queued if not torch.isfinite(q[2]).all()),
                                      (self.iteration, "(another rank's)", float("nan")))
        after = ("Training stopped before this update" if self.finite_check_interval == 1 else
                 f"Training stopped at iteration {self.iteration}, with nothing saved since")
        raise FloatingPointError(
            f"Non-finite {which} loss (this rank: {float(loss)}) at iteration {iteration}. {after}; "
            "<run dir>/checkpoints/last.ckpt (the last periodic save) is a good state to resume "
            "from. Lower optim.lr_generator / optim.lr_fake or raise optim.warmup_steps.")

    def _step(self, optimizer, scheduler, loss):
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        params = optimized(optimizer)
        norm = _grad_norm(params)  # logged before clipping: growth is the first sign of trouble
        if self.sharded or str(self.trainer.precision).startswith("16"):  # DTensor grads; scaled fp16 grads
            self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        elif self.grad_clip and self.grad_clip > 0:  # what clip_gradients does, without a second norm
            torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], self.grad_clip, norm)
        optimizer.step()
        scheduler.step()
        return norm

    def generator_update(self, loss, name: str) -> dict:
        """One step of the generator's optimiser on a method's single loss (KD, CD, PD) and of its
        EMA; returns the step's logs (``loss/<name>``, gradient norm, learning rate)."""
        opt, sched = self.optimizers(), self.lr_schedulers()
        self._check_finite(loss, name)
        logs = {f"loss/{name}": loss.detach(), "grad_norm/generator": self._step(opt, sched, loss),
                "lr/generator": sched.get_last_lr()[0]}
        if self.ema is not None:
            self.ema.step(optimized(opt))
        self.generator_steps += 1
        self.progress(f"loss_{name}", logs[f"loss/{name}"])
        return logs

    def configure_optimizers(self):
        """The generator's optimiser with linear warm-up (methods that train nothing else)."""
        opt = self.adamw(trainable(self.generator), self.lr_generator)
        return [opt], [warmup(opt, self.warmup_steps)]

    def on_save_checkpoint(self, checkpoint):
        self.verify_finite()  # never save weights a non-finite loss has updated
        checkpoint["dmd_counters"] = {"iteration": self.iteration,
                                      "generator_steps": self.generator_steps,
                                      "fake_steps": self.fake_steps, "network_passes": self.network_passes}
        # Every rank's stream (collective: all ranks save together, rank 0 writes the file).
        gathered = self.all_gather(self.rng.get_state().to(self.device)).reshape(self.trainer.world_size, -1)
        checkpoint["dmd_rng_states"] = [state.clone() for state in gathered.cpu()]  # own storage each
        if self.ema is not None:  # whole, on rank 0 (it writes the file); sharded: every rank gathers
            ema = self.ema.state_dict()
            checkpoint["generator_ema"] = {**ema, "shadow_params": gather_to_cpu(
                ema["shadow_params"], keep=self.global_rank == 0)}
        if self.sharded:  # the strategy saves and reloads the whole module strictly, frozen parts too
            return
        # The frozen teacher (and e.g. a regression distance's network) are not trained state.
        frozen = tuple(f"{name}." for name in self.frozen_networks())
        for key in [k for k in checkpoint["state_dict"] if k.startswith(frozen)]:
            del checkpoint["state_dict"][key]

    def on_load_checkpoint(self, checkpoint):
        if "dmd_counters" not in checkpoint:
            raise ValueError("This checkpoint was not written by dmd.train (no DMD counters): "
                             "point ckpt_path at a dmd.train run's checkpoints/last.ckpt.")
        if (self.ema is not None) != ("generator_ema" in checkpoint):
            raise ValueError("algorithm.ema_decay must match the run being resumed (EMA was "
                             f"{'on' if 'generator_ema' in checkpoint else 'off'} there).")
        counters = checkpoint["dmd_counters"]
        self.iteration = counters["iteration"]
        self.generator_steps, self.fake_steps = counters["generator_steps"], counters["fake_steps"]
        self.network_passes = counters.get("network_passes", 0)  # older checkpoints: not counted
        states = checkpoint.get("dmd_rng_states") or [checkpoint["dmd_rng_state"]]  # older: one rank
        if len(states) != self.trainer.world_size:
            raise ValueError(f"This checkpoint was written by {len(states)} process(es), this run has "
                             f"{self.trainer.world_size}: resume with the same number of devices x nodes.")
        self.rng.set_state(states[self.global_rank].clone())  # a view into a shared storage crashes it
        if self.ema is not None:
            self.ema.load_state_dict(checkpoint["generator_ema"])
            self.ema.shadow_params = shard_like(self.ema.shadow_params, trainable(self.generator))
        if self.sharded:  # the strategy has loaded the module's weights itself
            return
        state = checkpoint["state_dict"]
        self._check_matches(state, checkpoint)
        for name, network in self.frozen_networks().items():
            state.update({f"{name}.{k}": v for k, v in network.state_dict().items()})

    def _check_matches(self, state: dict, checkpoint: dict) -> None:
        """Refuse, in one sentence, a checkpoint of other networks (another preset's run)."""
        frozen = tuple(f"{name}." for name in self.frozen_networks())
        mine = {k: tuple(v.shape) for k, v in self.state_dict().items() if not k.startswith(frozen)}
        theirs = {k: tuple(v.shape) for k, v in state.items() if not k.startswith(frozen)}
        differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        if differ:
            k = differ[0]
            raise ValueError(
                f"This checkpoint holds other networks than this run builds ({len(differ)} of "
                f"{len(mine)} weights differ, e.g. {k}: {theirs.get(k, 'missing')} in the checkpoint, "
                f"{mine.get(k, 'missing')} here): it was written by a run of another preset or "
                "network. Resume it with its own command, or point ckpt_path elsewhere.")

    def release_generator(self) -> Generator | None:
        """A copy of the generator with the EMA weights if EMA is on (the model to release), on
        rank 0; None on the other ranks. Collective: under FSDP every rank must call it (the
        shards are gathered to rank 0)."""
        self.verify_finite()
        if self.sharded:
            return self._gather_generator()
        if self.global_rank != 0:
            return None
        released = copy.deepcopy(self.generator)
        if self.ema is not None:
            self.ema.copy_to(trainable(released))
        return released.eval()

    def _gather_generator(self) -> Generator | None:
        state = full_state_dict(self.generator)
        if self.ema is not None:
            names = [n for n, p in self.generator.named_parameters() if p.requires_grad]
            averaged = gather_to_cpu(self.ema.shadow_params, keep=self.global_rank == 0)
            state.update(zip(names, averaged))
        if self.global_rank != 0:
            return None
        return materialize(self._release_template[0], state).to(self.device).eval()


def optimized(optimizer) -> list[nn.Parameter]:
    """The parameters an optimizer updates (under FSDP: the shards, whatever state the module's
    forward has left its parameter attributes in)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """The parameters that train (all of a fully fine-tuned network; the adapters of a LoRA one)."""
    return [p for p in module.parameters() if p.requires_grad]


def copy_denoiser(denoiser: nn.Module) -> nn.Module:
    """A trainable copy of a network (generator and fake score start from the teacher's, or from
    its float32 reload when the teacher is kept in half precision: see ``dmd.build.student_init``)."""
    return copy.deepcopy(denoiser).requires_grad_(True).train()
