"""Consistency distillation (Song et al. 2023, "Consistency models", Algorithm 2), with the
latent-consistency choices of LCM (Luo et al. 2023) for guided teachers.

The student's x0 prediction f_theta(x_t, t) is the consistency function. The probability-flow
ODE is discretised on N trailing timesteps (``num_ode_steps``; LCM: 50 DDIM steps, a skip of
20). Each iteration:

    x0, c ~ data;  n ~ U{0..N-1};  t = grid[n],  t' = grid[n + 1] (the data after the last)
    x_t  = alpha_t x0 + sigma_t eps
    x_t' = one DDIM step of the teacher's guided ODE from (x_t, t) to t'   (CFG-augmented, LCM)
    target = f_theta^-(x_t', t')    (the target network; at the data: x_t' itself, f(x, 0) = x)
    loss = d(f_theta(x_t, t), target)                            (l2, or LCM's pseudo-Huber)
    theta^- <- mu theta^- + (1 - mu) theta                       (mu = ``target_decay``)

The boundary condition f(x, 0) = x is imposed by the target at the data rather than by
c_skip / c_out scalings (LCM's scalings are ~0 / ~1 away from t = 0). Sampling is the
generator's multi-step sampling with fresh noise (consistency models' Algorithm 1): its
timesteps must lie on the grid, where the consistency function was trained.
"""

from __future__ import annotations

import torch

from dmd.conditioning import guided_x0
from dmd.generator import Generator
from dmd.losses import CONSISTENCY_DISTANCES, consistency_loss
from dmd.sampling import ode_step
from dmd.schedule import trailing_timesteps
from dmd.student import StudentModule, copy_denoiser
from dmd.teachers import Teacher


def step_pairs(grid: list[int], index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, t_next) for grid indices: each timestep and the next lower one (-1: the data)."""
    padded = torch.tensor([*grid, -1])
    return padded[index], padded[index + 1]


def grid_problems(timesteps, num_ode_steps: int, num_train_timesteps: int = 1000) -> list[str]:
    """Why a generator with ``timesteps`` cannot be consistency-distilled on the grid (none: [])."""
    if not 1 <= num_ode_steps <= num_train_timesteps:
        return [f"algorithm.cd.num_ode_steps={num_ode_steps} must lie in [1, {num_train_timesteps}]"]
    grid = trailing_timesteps(num_ode_steps, num_train_timesteps)
    off_grid = [t for t in timesteps if t not in grid]
    if not off_grid:
        return []
    return [f"algorithm.generator_timesteps {off_grid} are not on consistency distillation's grid of "
            f"{num_ode_steps} trailing timesteps ({grid[0]}, {grid[1]}, ..., {grid[-1]}), where the student is "
            "trained: use trailing generator timesteps (e.g. [999,499] for 2 steps) and a multiple of "
            "their number as algorithm.cd.num_ode_steps (e.g. 40 for 1, 2 or 4 steps)"]


class CDModule(StudentModule):
    """One student update per iteration on a data batch, then the target network's EMA step."""

    @classmethod
    def from_config(cls, cfg, teacher, generator, fake_score, pairs, distance, **student):
        return cls(teacher, generator, guidance_scale=cfg.algorithm.guidance_scale, **cfg.algorithm.cd, **student)

    def __init__(self, teacher: Teacher, generator: Generator, guidance_scale: float = 1.0,
                 num_ode_steps: int = 50, target_decay: float = 0.95, distance: str = "l2",
                 huber_c: float = 1e-3, **student):
        super().__init__(teacher, generator, **student)
        T = teacher.denoiser.schedule.num_train_timesteps
        problems = grid_problems(generator.timesteps, num_ode_steps, T)
        if problems:
            raise ValueError("; ".join(problems) + ".")
        self.grid = trailing_timesteps(num_ode_steps, T)
        if generator.sampling != "fresh":
            raise ValueError("A consistency model samples by re-noising with fresh noise (sampling='fresh').")
        self.guidance_scale, self.target_decay = guidance_scale, target_decay
        self.distance, self.huber_c = distance, huber_c
        if distance not in CONSISTENCY_DISTANCES:
            raise ValueError(f"Unknown consistency distance {distance!r}; choose one of {CONSISTENCY_DISTANCES}.")
        # theta^-: trained state (checkpointed), updated only by the EMA step.
        self.target_network = copy_denoiser(generator.denoiser).requires_grad_(False).eval()

    def train_iteration(self, batch):
        real, cond = self.data_batch(batch)
        n = real.shape[0]
        index = torch.randint(0, len(self.grid), (n,), generator=self.rng)
        t, t_next = (v.to(self.device) for v in step_pairs(self.grid, index))
        eps = self.generator.denoiser.noise_like(real, self.rng)
        x_t = self.teacher.denoiser.schedule.add_noise(real, eps, t)
        with torch.no_grad():
            uncond = self.teacher.null_condition(n, self.device)
            x0_teacher = guided_x0(self.real_score, x_t, t, cond, uncond, self.guidance_scale)
            x_next = ode_step(x_t, x0_teacher, t, t_next, self.real_score.schedule)
            target = self.target_network(x_next, t_next.clamp(min=0), cond)
            target = torch.where((t_next < 0).reshape(-1, *[1] * (real.ndim - 1)), x_next, target)
        loss = consistency_loss(self.generator.denoiser(x_t, t, cond), target, self.distance, self.huber_c)
        logs = self.generator_update(loss, "consistency")
        self.update_target()
        self.finish_iteration(logs)
        return None

    @torch.no_grad()
    def update_target(self) -> None:
        """theta^- <- mu theta^- + (1 - mu) theta (every weight, LoRA or not)."""
        for target, online in zip(self.target_network.parameters(), self.generator.denoiser.parameters()):
            target.lerp_(online.detach(), 1.0 - self.target_decay)

    def other_trained_networks(self) -> list:
        return [self.target_network]
