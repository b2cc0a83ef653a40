"""Progressive distillation (Salimans & Ho 2022, Algorithm 2), with classifier-free guidance
distilled in the first round (Meng et al. 2023's two-stage method in one: the first round's
teacher is the guided teacher).

Rounds halve the number of DDIM steps: round r's teacher takes 2N steps (round 0: the original
teacher at ``start_steps``; later rounds: a frozen copy of the previous round's student) and
the student learns to take N = 2N / 2 steps. Each iteration, on the trailing grid of 2N steps:

    x0, c ~ data;  i ~ U{0..N-1};  t, t', t'' = grid2N[2i], grid2N[2i+1], grid2N[2i+2] (data after the last)
    x_t   = alpha_t x0 + sigma_t eps
    x_t'' = two DDIM steps of the teacher, t -> t' -> t''
    x~    = the x0 prediction whose single DDIM step t -> t'' lands on x_t''
            (ODE coordinates y = x / alpha, s = sigma / alpha:  x~ = (s_t y'' - s'' y_t) / (s_t - s''))
    loss  = max(SNR(t), 1) * ||x0_student(x_t, t) - x~||^2               ("truncated SNR" weighting)

The learning rate decays linearly to 0 within each round (the paper's schedule) and restarts at
its full value with the next (the warm-up runs once, at the start of round 0). One AdamW runs
through all rounds, so its moment estimates carry over from one round's student to the next (a
fresh optimizer per round has not been compared). Rounds run until N reaches the generator's number of steps: ``max_iterations`` is split evenly between
them. Each round's student samples by deterministic DDIM steps (``Generator(sampling="ddim")``)
on trailing timesteps (4 steps: 999, 749, 499, 249); train.py releases every round's student
(see :class:`dmd.callbacks.rounds.RoundReleases`).
"""

from __future__ import annotations

import math

import torch

from dmd.conditioning import guided_x0
from dmd.generator import Generator
from dmd.losses import truncated_snr_loss
from dmd.sampling import ode_step
from dmd.schedule import trailing_timesteps
from dmd.student import StudentModule, copy_denoiser, trainable
from dmd.teachers import Teacher


def ddim_x0_target(x_t, x_end, t, t_end, schedule):
    """The x0 prediction at (x_t, t) whose DDIM step to ``t_end`` (-1: the data) gives ``x_end``."""
    a, s = schedule.ode_coordinates(t, x_t)
    a_e, s_e = schedule.ode_coordinates(t_end.clamp(min=0), x_t)
    to_data = (t_end < 0).reshape(-1, *[1] * (x_t.ndim - 1))
    s_e = torch.where(to_data, torch.zeros_like(s_e), s_e)
    a_e = torch.where(to_data, torch.ones_like(a_e), a_e)
    y, y_e = x_t.to(a.dtype) / a, x_end.to(a.dtype) / a_e
    return ((s * y_e - s_e * y) / (s - s_e)).to(x_t.dtype)


def plan_problems(timesteps, start_steps: int, max_iterations, num_train_timesteps: int = 1000) -> list[str]:
    """Why these settings cannot make a progressive-distillation plan (none: [])."""
    steps, found = len(timesteps), []
    if list(timesteps) != trailing_timesteps(steps, num_train_timesteps):
        found.append(f"algorithm.generator_timesteps={list(timesteps)}: a progressively distilled student takes "
                     f"DDIM steps on trailing timesteps, {trailing_timesteps(steps, num_train_timesteps)}")
    rounds = math.log2(start_steps / steps) if start_steps > steps else 0
    if rounds < 1 or rounds != int(rounds) or start_steps > num_train_timesteps:
        found.append(f"algorithm.pd.start_steps={start_steps} must be the student's {steps} step(s) times a "
                     f"power of two >= 2 (each round halves the steps), at most {num_train_timesteps}")
    elif max_iterations is not None and max_iterations < rounds:
        found.append(f"max_iterations={max_iterations}: progressive distillation from {start_steps} to "
                     f"{steps} step(s) runs {int(rounds)} rounds, at least one iteration each")
    return found


class PDModule(StudentModule):
    """Rounds of step-halving distillation; one student update per iteration on a data batch."""

    generator_sampling = "ddim"  # each round's student takes DDIM steps, as its teacher did
    # rounds split max_iterations (or the pass budget): a longer resume would change every round
    planned_lengths = ("max_iterations", "generator_steps", "max_network_passes")

    @classmethod
    def from_config(cls, cfg, teacher, generator, fake_score, pairs, distance, **student):
        return cls(teacher, generator, guidance_scale=cfg.algorithm.guidance_scale,
                   batch_size=cfg.data.batch_size, **cfg.algorithm.pd, **student)

    def __init__(self, teacher: Teacher, generator: Generator, guidance_scale: float = 1.0,
                 start_steps: int = 64, batch_size: int | None = None, **student):
        super().__init__(teacher, generator, **student)
        T = teacher.denoiser.schedule.num_train_timesteps
        planned = None if self.max_network_passes else (self.max_iterations or 0)
        problems = plan_problems(generator.timesteps, start_steps, planned, T)
        if generator.sampling != "ddim":
            problems.append("a progressively distilled student samples by DDIM steps (sampling='ddim')")
        if problems:
            raise ValueError("; ".join(problems) + ".")
        self.rounds = round(math.log2(start_steps / generator.num_steps))
        self.start_steps, self.guidance_scale = start_steps, guidance_scale
        if self.max_network_passes:  # equal iterations per round, as many as the budget buys
            self.max_iterations = self.iterations_for_budget(self.max_network_passes, batch_size)
        self.round_length = self.max_iterations // self.rounds  # the last round takes the remainder
        # The previous round's student, frozen: trained state (checkpointed); unused in round 0.
        self.round_teacher = copy_denoiser(generator.denoiser).requires_grad_(False).eval()

    def passes_per_iteration(self, round_index: int, batch_size: int) -> int:
        """Network passes of one iteration: the student once, the round's teacher twice (the
        original teacher with CFG: two passes per call)."""
        guided = round_index == 0 and self.guidance_scale != 1.0 and self.teacher.null_condition(1) is not None
        return batch_size * (1 + 2 * (2 if guided else 1))

    def iterations_for_budget(self, budget: int, batch_size: int | None) -> int:
        if not batch_size:
            raise ValueError("Planning progressive distillation's rounds from max_network_passes needs the batch size.")
        per_round = sum(self.passes_per_iteration(r, batch_size) for r in range(self.rounds))
        if budget < per_round:
            raise ValueError(f"max_network_passes={budget} buys less than one iteration in each of the "
                             f"{self.rounds} rounds ({per_round} passes at batch {batch_size}): raise it.")
        return budget // per_round * self.rounds

    def round_of(self, iteration: int) -> int:
        return min(iteration // self.round_length, self.rounds - 1)

    def student_steps(self, round_index: int) -> int:
        return self.start_steps // 2 ** (round_index + 1)

    def finished_round(self) -> int | None:
        """The round whose last iteration was the one just counted, if any."""
        done = self.iteration - 1
        if self.iteration == self.max_iterations or self.round_of(done) != self.round_of(self.iteration):
            return self.round_of(done)
        return None

    def train_iteration(self, batch):
        r = self.round_of(self.iteration)
        if r > 0 and self.iteration == r * self.round_length:  # a new round: its teacher is the last student
            self.round_teacher.load_state_dict(self.generator.denoiser.state_dict())
        real, cond = self.data_batch(batch)
        n, N = real.shape[0], self.student_steps(r)
        grid = torch.tensor([*trailing_timesteps(2 * N, self.teacher.denoiser.schedule.num_train_timesteps), -1])
        i = torch.randint(0, N, (n,), generator=self.rng)
        t, t_mid, t_end = (grid[2 * i + j].to(self.device) for j in range(3))
        eps = self.generator.denoiser.noise_like(real, self.rng)
        schedule = self.teacher.denoiser.schedule
        x_t = schedule.add_noise(real, eps, t)
        with torch.no_grad():
            x_end = self.teacher_steps(r, x_t, [t, t_mid, t_end], cond)
            target = ddim_x0_target(x_t, x_end, t, t_end, schedule)
        loss = truncated_snr_loss(self.generator.denoiser(x_t, t, cond), target, schedule.snr(t).to(self.device))
        logs = self.generator_update(loss, "progressive")
        logs["counters/round"] = float(r)
        self.finish_iteration(logs)
        return None

    def teacher_steps(self, r: int, x, times, cond):
        """Two DDIM steps of round r's teacher (round 0: the guided original teacher)."""
        teacher, scale = (self.real_score, self.guidance_scale) if r == 0 else (self.round_teacher, 1.0)
        uncond = self.teacher.null_condition(x.shape[0], self.device)
        for t, t_next in zip(times, times[1:]):
            x = ode_step(x, guided_x0(teacher, x, t, cond, uncond, scale), t, t_next, teacher.schedule)
        return x

    def round_generator(self, round_index: int) -> Generator | None:
        """Round ``round_index``'s released student (the current weights), with that round's steps."""
        released = self.release_generator()
        if released is not None:
            T = self.teacher.denoiser.schedule.num_train_timesteps
            released.timesteps = trailing_timesteps(self.student_steps(round_index), T)
        return released

    def other_trained_networks(self) -> list:
        return [self.round_teacher]

    def configure_optimizers(self):
        # Linear decay to 0 within each round (after the warm-up), as in the paper.
        opt = self.adamw(trainable(self.generator), self.lr_generator)
        length, warm = self.round_length, max(1, self.warmup_steps)

        def factor(step: int) -> float:
            within = step - self.round_of(step) * length
            span = self.max_iterations - self.round_of(step) * length if self.round_of(step) == self.rounds - 1 else length
            return min(1.0, (step + 1) / warm) * (1.0 - within / span)
        return [opt], [torch.optim.lr_scheduler.LambdaLR(opt, factor)]
