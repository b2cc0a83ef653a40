"""Flow-matching schedules (rectified flow, SD3/Flux): diffusers' tables, the conversions, the
exact mixture teacher and the samplers under x_t = (1 - sigma) x0 + sigma eps."""

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from dmd.data import GaussianMixture
from dmd.denoisers import GaussianMixtureDenoiser
from dmd.sampling import sample
from dmd.schedule import (
    FlowSchedule,
    VPSchedule,
    prediction_type_of,
    sampling_timesteps,
    schedule_from_diffusers,
)
from dmd.teachers import gaussian_mixture_teacher


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_the_table_is_diffusers_flow_match_euler(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    schedule = schedule_from_diffusers(scheduler)
    assert isinstance(schedule, FlowSchedule) and prediction_type_of(scheduler) == "flow_prediction"
    # Our index t runs from data (0) to noise (T-1); diffusers' tables run the other way.
    assert torch.equal(schedule.sigmas.float(), scheduler.sigmas.flip(0))
    t = torch.tensor([0, 10, 500, 999])
    assert torch.equal(schedule.model_time(t), scheduler.timesteps.flip(0)[t])
    x0, eps = torch.randn(4, 3), torch.randn(4, 3)
    ours = schedule.add_noise(x0, eps, t)
    theirs = torch.stack([scheduler.scale_noise(x0[i:i + 1], scheduler.timesteps.flip(0)[t[i]:t[i] + 1], eps[i:i + 1])[0]
                          for i in range(4)])
    assert torch.allclose(ours, theirs, atol=1e-6)
    a, s = schedule.alpha_sigma(t, x0)
    assert torch.allclose(a + s, torch.ones_like(a)) and s[-1].item() == 1.0  # pure noise at T-1
    assert isinstance(schedule_from_diffusers(DDPMScheduler()), VPSchedule)


@pytest.mark.parametrize("ptype", ["flow_prediction", "epsilon", "sample"])
def test_flow_conversions_invert(ptype):
    schedule = FlowSchedule(shift=3.0)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(64, 2, generator=g).double(), torch.randn(64, 2, generator=g).double()
    t = torch.randint(0, 999, (64,), generator=g)  # below T-1, where alpha = 0 (epsilon cannot give x0)
    x_t = schedule.add_noise(x0, eps, t)
    target = schedule.target(x0, eps, t, ptype)
    assert torch.allclose(schedule.to_x0(target, x_t, t, ptype), x0, atol=1e-8)
    pred = torch.randn(64, 2, dtype=torch.float64, generator=g)
    assert torch.allclose(schedule.from_x0(schedule.to_x0(pred, x_t, t, ptype), x_t, t, ptype), pred, atol=1e-6)
    if ptype == "flow_prediction":  # the velocity of the straight path
        assert torch.allclose(target, eps - x0)


def test_v_prediction_is_refused_for_a_flow_schedule():
    with pytest.raises(ValueError, match="Unknown prediction_type 'v_prediction' for this schedule"):
        FlowSchedule().to_x0(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([1, 2]), "v_prediction")


def test_the_exact_mixture_denoiser_is_tweedie_under_flow_matching():
    mix = GaussianMixture.ring()
    den = GaussianMixtureDenoiser(FlowSchedule(shift=3.0), mix.means, mix.stds, mix.weights)
    x = torch.randn(16, 2, dtype=torch.float64) * 2
    for t_val in (0, 100, 500, 900, 998):
        t = torch.full((16,), t_val)
        xg = x.clone().requires_grad_(True)
        (score,) = torch.autograd.grad(den.log_prob(xg, t).sum(), xg)
        a, s = den.schedule.alpha_sigma(t, x)
        assert torch.allclose(den(x, t), (x + s**2 * score) / a, atol=1e-8), t_val
    mean = (mix.weights.double() / mix.weights.sum()) @ mix.means.double()
    assert torch.allclose(den(x, torch.full((16,), 999)), mean.expand(16, 2), atol=1e-8)  # pure noise: the mean


def test_an_euler_step_is_diffusers_flow_match_euler_step():
    """One step of our first-order sampler = diffusers' FlowMatchEulerDiscreteScheduler.step."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    teacher = gaussian_mixture_teacher(GaussianMixture.ring(), scheduler)
    schedule, den = teacher.denoiser.schedule, teacher.denoiser
    x = torch.randn(8, 2, dtype=torch.float64)
    t, t_next = 700, 300
    d = den(x, torch.full((8,), t))
    a, s = schedule.alpha_sigma(torch.tensor([t]), x)
    velocity = schedule.from_x0(d, x, torch.full((8,), t), "flow_prediction")
    ours = x + (schedule.sigmas[t_next] - schedule.sigmas[t]) * velocity
    stepper = FlowMatchEulerDiscreteScheduler(shift=1.0)  # set_timesteps would shift given sigmas again
    stepper.set_timesteps(sigmas=[schedule.sigmas[t].item(), schedule.sigmas[t_next].item()])
    theirs = stepper.step(velocity, stepper.timesteps[0], x).prev_sample
    assert torch.allclose(ours, theirs.double(), atol=1e-5)
    # ... and our sampler's Euler update in its ODE coordinates is that same step.
    c, tau = schedule.ode_coordinates(torch.tensor([t]), x)
    c_n, tau_n = schedule.ode_coordinates(torch.tensor([t_next]), x)
    y = x / c
    assert torch.allclose(c_n * (y + (tau_n - tau) * (y - d) / tau), ours, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("name,steps,spacing", [("euler", 100, "linspace"), ("heun", 25, "karras")])
def test_ode_samplers_reproduce_the_mixture_under_flow_matching(name, steps, spacing):
    mix = GaussianMixture.ring()
    teacher = gaussian_mixture_teacher(mix, FlowMatchEulerDiscreteScheduler(shift=3.0))
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
    x = sample(teacher.denoiser, noise, name=name, steps=steps, spacing=spacing)
    d = torch.cdist(x.double(), mix.means.double())
    share = torch.bincount(d.argmin(1), minlength=8).double() / 4000
    assert share.min() > 0.09 and share.max() < 0.16
    assert d.min(1).values.median().item() < 0.2  # the modes' own: 0.118
    ts = sampling_timesteps(steps, teacher.denoiser.schedule, spacing)
    assert ts[0] == 999 and ts[-1] == 0


@pytest.mark.slow
def test_the_bundled_flow_teacher_loads_as_flow_and_samples_the_mixture():
    from conftest import ROOT

    from dmd.draw import sample_teacher
    from dmd.teachers import load_teacher

    teacher = load_teacher(str(ROOT / "experiments/checkpoints/gmm8_flow_mlp"))
    assert isinstance(teacher.denoiser.schedule, FlowSchedule) and teacher.denoiser.prediction_type == "flow_prediction"
    x, _ = sample_teacher(teacher, 4000, "heun", 25, 1.0, seed=0, progress=False)
    mix = GaussianMixture.ring()
    d = torch.cdist(x.double(), mix.means.double())
    share = torch.bincount(d.argmin(1), minlength=8).double() / 4000
    assert share.min() > 0.09 and share.max() < 0.16 and d.min(1).values.median().item() < 0.2


def test_timestep_distributions_of_the_dm_and_fake_score_losses():
    """uniform in t (sigma follows the shifted table), uniform in sigma, or SD3's logit-normal."""


    from dmd.losses import sample_timesteps
    from dmd.schedule import FlowSchedule

    schedule = FlowSchedule(1000, shift=3.0)
    n, lo, hi = 40000, 0.02, 0.5

    def draw(distribution):
        t = sample_timesteps(n, 1000, low=lo, high=hi, distribution=distribution, schedule=schedule,
                             generator=torch.Generator().manual_seed(0))
        assert t.dtype == torch.long and t.min() >= 20 and t.max() <= 500
        return t, schedule.sigmas[t]

    s_lo, s_hi = schedule.sigmas[20].item(), schedule.sigmas[500].item()
    _, sig = draw("sigma")  # evenly spread over [sigma(20), sigma(500)]: four equal bins
    counts = torch.histc(sig.float(), bins=4, min=s_lo, max=s_hi) / n
    assert torch.allclose(counts, torch.full((4,), 0.25, dtype=counts.dtype), atol=0.01)
    t, sig_t = draw("uniform")  # uniform in t: the shift pushes sigma up (mean above the midpoint)
    assert t.float().mean().item() == pytest.approx(260, abs=3)
    assert sig_t.mean().item() > sig.mean().item() + 0.05
    t, _ = draw("logit_normal")  # sigmoid(N(0, 1)) * T truncated to the range: its density rises
    counts = torch.histc(t.float(), bins=4, min=20, max=501) / n  # towards T/2, no pile at the end
    assert (counts[1:] > counts[:-1]).all() and (t == 500).float().mean().item() < 0.01
    full = sample_timesteps(n, 1000, distribution="logit_normal", generator=torch.Generator().manual_seed(0))
    logits = torch.logit((full.double() + 0.5) / 1000)
    assert logits.mean().item() == pytest.approx(0, abs=0.02) and logits.std().item() == pytest.approx(1, abs=0.03)
    with pytest.raises(ValueError, match="choose one of"):
        sample_timesteps(2, 1000, distribution="beta")


def test_dynamic_shift_is_fluxs_shift_at_that_resolution():
    """A dynamic-shift (Flux) scheduler at N latent tokens = the fixed shift exp(mu(N)): the
    sigmas diffusers' pipelines sample with at that size are the schedule's table values."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from dmd.schedule import FlowSchedule

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    ts = [999, 749, 499, 249, 20]
    for tokens in (64, 1024, 4096):
        schedule = FlowSchedule.from_diffusers(scheduler, image_seq_len=tokens)
        scheduler.set_timesteps(sigmas=[(t + 1) / 1000 for t in ts], mu=calculate_shift(tokens))
        assert torch.allclose(scheduler.sigmas[:-1].double(), schedule.sigmas[ts], atol=1e-6)
    assert FlowSchedule.from_diffusers(scheduler).shift == 1.0  # no size given: the unshifted table


@pytest.mark.slow
def test_a_class_conditional_flow_student_samples_with_the_stock_flow_scheduler(cli, tmp_path):
    """A flow teacher pretrained by dmd.pretrain, distilled into a 2-step student: its released
    folder (UNet2DModel + FlowMatchEulerDiscreteScheduler) sampled by the stock scheduler at the
    sigmas in generator.json gives dmd's samples."""
    import json

    from diffusers import UNet2DModel

    from dmd.generator import load_generator

    teacher = tmp_path / "teacher"
    cli("dmd.pretrain", "network=tiny_unet", "noise_scheduler=flow_match", "noise_scheduler.shift=2.0",
        "trainer=smoke", "grid.num_samples=4", "grid.steps=2", "data.batch_size=8", f"hydra.run.dir={teacher}")
    run = tmp_path / "student"
    cli("dmd.train", "experiment=fmnist_dmd2", f"teacher.path={teacher}/teacher", "max_iterations=2",
        "data.batch_size=4", "algorithm.generator_timesteps=[999,499]", "callbacks.evaluation=null",
        "logger=csv", "trainer.enable_progress_bar=false", f"hydra.run.dir={run}")
    folder = run / "generator"
    call = json.loads((folder / "generator.json").read_text())["pipeline_call"]
    assert call["num_inference_steps"] == 2 and call["sigmas"] == [1.0, 0.5]
    unet = UNet2DModel.from_pretrained(folder / "unet")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    assert scheduler.config.stochastic_sampling and scheduler.config.shift == 2.0

    gen, info = load_generator(run)
    noise = torch.randn(6, *info.sample_shape, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(6) % 10
    with torch.no_grad():
        ours = gen(noise, labels, generator=torch.Generator().manual_seed(1))
        scheduler.set_timesteps(sigmas=call["sigmas"])
        x, rng = noise, torch.Generator().manual_seed(1)
        for t in scheduler.timesteps:  # the stock loop: velocity from the UNet, one scheduler step
            x = scheduler.step(unet(x, t.expand(6), class_labels=labels).sample, t, x, generator=rng).prev_sample
    assert torch.allclose(ours, x, atol=1e-5), (ours - x).abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("preset,sigmas", [("fmnist_flow_dmd2", [1.0]), ("fmnist_flow_dmd2_4step", [1.0, 0.75, 0.5, 0.25])])
def test_the_fashion_mnist_flow_presets_train_on_the_bundled_flow_teacher(cli, tmp_path, preset, sigmas):
    import json

    run = tmp_path / "run"
    cli("dmd.train", f"experiment={preset}", "max_iterations=3", "data.batch_size=4", "callbacks.evaluation=null",
        "logger=none", "trainer.enable_progress_bar=false", f"hydra.run.dir={run}")
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed" and results["config"]["teacher"]["path"].endswith("fmnist_flow_teacher")
    call = json.loads((run / "generator" / "generator.json").read_text())["pipeline_call"]
    assert call["sigmas"] == sigmas  # released for the stock FlowMatchEulerDiscreteScheduler
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(run / "generator" / "scheduler")
    assert scheduler.config.stochastic_sampling  # DMD2's multi-step sampling re-noises
