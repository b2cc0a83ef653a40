"""Consistency and progressive distillation (algorithm=cd, algorithm=pd): the teacher's ODE step
they share, PD's DDIM-step target and DDIM-sampled students, both losses recomputed by hand from
the module's random stream, PD's rounds and learning-rate plan, and the plans refused before a run
dir is written. Training from the CLI, resuming and the oracle: tests/test_methods.py."""

import pytest
import torch
from conftest import ROOT
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from dmd.data import GaussianMixture
from dmd.generator import Generator
from dmd.methods.cd import CDModule, grid_problems
from dmd.methods.pd import PDModule, ddim_x0_target, plan_problems
from dmd.sampling import ode_step, sample
from dmd.schedule import trailing_timesteps
from dmd.student import copy_denoiser, training_rng
from dmd.teachers import gaussian_mixture_teacher, load_teacher

SCHEDULERS = {"vp": lambda: DDPMScheduler(beta_schedule="linear"),
              "flow": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0)}


def _teacher(kind="vp"):
    return gaussian_mixture_teacher(GaussianMixture.ring(), SCHEDULERS[kind]())


@pytest.mark.parametrize("kind", SCHEDULERS)
def test_a_ddim_generator_on_the_teacher_is_the_teachers_ddim_sampler(kind):
    teacher = _teacher(kind)
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    for steps in (2, 4):
        generator = Generator(teacher.denoiser, trailing_timesteps(steps), sampling="ddim")
        expected = sample(teacher.denoiser, noise, name="ddim", steps=steps, spacing="trailing")
        torch.testing.assert_close(generator(noise), expected, atol=1e-5, rtol=1e-5)
    # Re-noising with fresh noise is a different sampler.
    fresh = Generator(teacher.denoiser, trailing_timesteps(4))(noise, generator=torch.Generator().manual_seed(1))
    assert (fresh - expected).abs().max() > 0.1


@pytest.mark.parametrize("kind", SCHEDULERS)
def test_ode_steps_at_per_sample_timesteps_are_the_samplers_steps(kind):
    den = _teacher(kind).denoiser
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    x = noise
    for t, t_next in [(999, 499), (499, -1)]:  # two trailing DDIM steps, the last into the data
        tt = torch.full((64,), t)
        x = ode_step(x, den(x, tt), tt, torch.full((64,), t_next), den.schedule)
    torch.testing.assert_close(x, sample(den, noise, name="ddim", steps=2, spacing="trailing"), atol=1e-5, rtol=1e-5)
    # A batch mixing timesteps steps each sample as it would alone.
    t, t_next = torch.tensor([999, 600, 300, 20]), torch.tensor([900, 100, -1, -1])
    xs = torch.randn(4, 2, generator=torch.Generator().manual_seed(2))
    together = ode_step(xs, den(xs, t), t, t_next, den.schedule)
    alone = torch.cat([ode_step(xs[i:i + 1], den(xs[i:i + 1], t[i:i + 1]), t[i:i + 1], t_next[i:i + 1], den.schedule)
                       for i in range(4)])
    torch.testing.assert_close(together, alone)
    torch.testing.assert_close(together[2:], den(xs, t)[2:])  # into the data: the x0 prediction


@pytest.mark.parametrize("kind", SCHEDULERS)
def test_pd_target_is_the_x0_whose_single_ddim_step_lands_on_the_teachers_two(kind):
    schedule = _teacher(kind).denoiser.schedule
    g = torch.Generator().manual_seed(0)
    x_t, x_end = torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g)
    t, t_end = torch.tensor([999, 749, 499, 249, 31]), torch.tensor([749, 499, 249, -1, -1])
    target = ddim_x0_target(x_t, x_end, t, t_end, schedule)
    torch.testing.assert_close(ode_step(x_t, target, t, t_end, schedule), x_end, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(target[3:], x_end[3:])


def _gmm_module(cls, timesteps, sampling, **kwargs):
    teacher = _teacher()
    init = load_teacher(str(ROOT / "experiments/checkpoints/gmm8_mlp"))
    generator = Generator(copy_denoiser(init.denoiser), timesteps, sampling=sampling)
    module = cls(teacher, generator, **kwargs)
    captured = []
    module.generator_update = lambda loss, name: captured.append(loss) or {}
    module.finish_iteration = lambda logs: setattr(module, "iteration", module.iteration + 1)
    return module, captured


def _alpha_sigma(schedule, t):
    return (v.reshape(-1, 1).double() for v in schedule.alpha_sigma(t, torch.zeros(len(t), 1)))


def _ddim_by_hand(schedule, x, x0, t, t_next):
    """x_{t'} = alpha' x0 + sigma' eps_hat (DDIM, eta 0), written in alpha and sigma."""
    a, s = _alpha_sigma(schedule, t)
    a_n, s_n = _alpha_sigma(schedule, t_next.clamp(min=0))
    x_next = a_n * x0.double() + s_n * (x.double() - a * x0.double()) / s
    return torch.where((t_next < 0)[:, None], x0.double(), x_next).float()


def test_the_consistency_loss_by_hand():
    module, captured = _gmm_module(CDModule, [999], "fresh", num_ode_steps=40, max_iterations=10)
    module.update_target = lambda: None
    with torch.no_grad():  # a target network apart from the student, as after some training
        for p in module.target_network.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    real = GaussianMixture.ring().sample(64, generator=torch.Generator().manual_seed(0))[0]
    rng = training_rng(0)
    module.training_step((real, torch.zeros(64, dtype=torch.long)), 0)
    grid = torch.tensor([*trailing_timesteps(40), -1])
    index = torch.randint(0, 40, (64,), generator=rng)
    t, t_next = grid[index], grid[index + 1]
    assert (t_next < 0).any() and (t_next >= 0).any()
    eps = torch.randn(64, 2, generator=rng)
    schedule = module.real_score.schedule
    a, s = _alpha_sigma(schedule, t)
    x_t = (a * real.double() + s * eps.double()).float()
    with torch.no_grad():
        x_next = _ddim_by_hand(schedule, x_t, module.real_score(x_t, t), t, t_next)
        target = torch.where((t_next < 0)[:, None], x_next, module.target_network(x_next, t_next.clamp(min=0)))
        expected = (module.generator.denoiser(x_t, t) - target).square().mean()
    torch.testing.assert_close(captured[0].detach(), expected, atol=1e-5, rtol=1e-4)


def test_the_progressive_distillation_loss_by_hand_in_rounds_0_and_1():
    module, captured = _gmm_module(PDModule, [999], "ddim", start_steps=8, max_iterations=6)
    assert module.rounds == 3 and module.round_length == 2
    real = GaussianMixture.ring().sample(64, generator=torch.Generator().manual_seed(0))[0]
    batch = (real, torch.zeros(64, dtype=torch.long))
    for step in range(3):  # iterations 0, 1 (round 0) and 2 (round 1 starts: its teacher is the student)
        rng_state = module.rng.get_state()
        with torch.no_grad():  # updates are not taken here: move the student as training would
            for p in module.generator.denoiser.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(step)))
        student_before = copy_denoiser(module.generator.denoiser).eval()
        module.training_step(batch, 0)
    assert torch.equal(next(module.round_teacher.parameters()), next(student_before.parameters()))
    rng = torch.Generator()
    rng.set_state(rng_state)
    N = 2  # round 1: 8 -> 4 -> 2 steps; its teacher takes 4
    grid = torch.tensor([*trailing_timesteps(2 * N), -1])
    i = torch.randint(0, N, (64,), generator=rng)
    t, t_mid, t_end = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
    eps = torch.randn(64, 2, generator=rng)
    schedule = module.real_score.schedule
    a, s = _alpha_sigma(schedule, t)
    x_t = (a * real.double() + s * eps.double()).float()
    with torch.no_grad():
        x_mid = _ddim_by_hand(schedule, x_t, student_before(x_t, t), t, t_mid)
        x_end = _ddim_by_hand(schedule, x_mid, student_before(x_mid, t_mid), t_mid, t_end)
        a_e, s_e = _alpha_sigma(schedule, t_end.clamp(min=0))
        # x~ = (x_end - sigma_e/sigma_t x_t) / (alpha_e - sigma_e/sigma_t alpha_t)  (Salimans & Ho, Alg. 2)
        ratio = torch.where((t_end < 0)[:, None], torch.zeros_like(s_e), s_e / s)
        a_e = torch.where((t_end < 0)[:, None], torch.ones_like(a_e), a_e)
        target = ((x_end.double() - ratio * x_t.double()) / (a_e - ratio * a)).float()
        per_sample = (student_before(x_t, t) - target).square().mean(dim=1)
        expected = ((a / s).square().flatten().clamp(min=1) * per_sample).mean()
    torch.testing.assert_close(captured[2].detach(), expected.float(), atol=1e-5, rtol=1e-4)


def test_pd_rounds_and_their_learning_rate_plan():
    module, _ = _gmm_module(PDModule, [999], "ddim", start_steps=8, max_iterations=13, lr_generator=1.0)
    assert [module.student_steps(r) for r in range(module.rounds)] == [4, 2, 1]
    assert [module.round_of(i) for i in range(13)] == [0] * 4 + [1] * 4 + [2] * 5  # the last takes the rest
    finished = []
    for module.iteration in range(1, 14):
        finished.append(module.finished_round())
    assert finished == [None, None, None, 0, None, None, None, 1, None, None, None, None, 2]
    (opt,), (sched,) = module.configure_optimizers()
    lrs = []
    for _ in range(13):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:8] == pytest.approx([1, 0.75, 0.5, 0.25] * 2) and lrs[8:] == pytest.approx([1, 0.8, 0.6, 0.4, 0.2])


def test_plans_that_cannot_run_are_named():
    assert grid_problems([999, 749, 499, 249], 40) == [] and grid_problems([999], 50) == []
    assert "not on consistency distillation's grid" in grid_problems([999, 749, 499, 249], 50)[0]
    assert plan_problems([999, 499], 64, 100) == []
    assert "trailing timesteps, [999, 499]" in plan_problems([999, 500], 64, 100)[0]
    assert "power of two" in plan_problems([999], 48, 100)[0]
    assert "runs 6 rounds" in plan_problems([999], 64, 5)[0]


@pytest.mark.parametrize("overrides,message", [
    (["experiment=gmm_cd", "algorithm.generator_timesteps=[999,749,499,249]", "algorithm.cd.num_ode_steps=50"],
     "not on consistency distillation's grid"),
    (["experiment=gmm_pd", "max_iterations=4"], "runs 6 rounds"),
    (["experiment=gmm_pd", "algorithm.generator_timesteps=[999,500]"], "DDIM steps on trailing timesteps"),
])
def test_the_cli_refuses_such_plans_before_writing(cli, tmp_path, overrides, message):
    proc = cli("dmd.train", *overrides, f"hydra.run.dir={tmp_path}/run", check=False)
    assert proc.returncode != 0 and message in proc.stderr
    assert not (tmp_path / "run" / "config_resolved.yaml").exists()
