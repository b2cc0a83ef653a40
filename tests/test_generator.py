import pytest
import torch
from diffusers import DDPMScheduler

from dmd.data import GaussianMixture
from dmd.denoisers import GaussianMixtureDenoiser, MLPDenoiser
from dmd.generator import Generator, backward_simulation_step
from dmd.schedule import VPSchedule


def _sched():
    return VPSchedule.from_diffusers(DDPMScheduler())


def test_multistep_generator_on_the_exact_denoiser_follows_its_schedule():
    mix = GaussianMixture.ring()
    gen = Generator(GaussianMixtureDenoiser(_sched(), mix.means, mix.stds), [999, 749, 499, 249])
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    one = gen(z, num_steps=1)
    four = gen(z, generator=torch.Generator().manual_seed(1))
    # One exact step at t=999 returns (about) the mixture mean, the origin; each further step
    # re-noises to a lower t, where the posterior mean moves out towards the modes.
    assert one.norm(dim=1).median() < 0.03
    radii = [gen(z, num_steps=k, generator=torch.Generator().manual_seed(1)).norm(dim=1).median()
             for k in (1, 2, 3, 4)]
    assert all(a < b for a, b in zip(radii, radii[1:])) and 1.0 < radii[-1] < 2.0
    assert torch.allclose(four, gen(z, generator=torch.Generator().manual_seed(1)))


def test_backward_simulation_differentiates_only_the_last_step():
    gen = Generator(MLPDenoiser(_sched(), "epsilon", hidden=16, depth=2), [999, 749, 499, 249])
    z = torch.randn(8, 2)
    for k in range(4):
        g = torch.Generator().manual_seed(5)
        x = gen.backward_simulation(z, None, k, generator=g)
        expected = gen(z, num_steps=k + 1, generator=torch.Generator().manual_seed(5))
        assert torch.allclose(x, expected, atol=1e-6)
        gen.zero_grad()
        x.sum().backward()
        assert all(p.grad is not None for p in gen.parameters())


def test_backward_simulation_builds_a_graph_through_step_k_only():
    """Steps 0..k-1 run without autograd (one graph per training sample, not k of them)."""
    gen = Generator(MLPDenoiser(_sched(), "epsilon", hidden=16, depth=2), [999, 749, 499, 249])
    grad_modes = []
    gen.denoiser.register_forward_pre_hook(lambda module, args: grad_modes.append(torch.is_grad_enabled()))
    z = torch.randn(8, 2)
    for k in range(4):
        grad_modes.clear()
        x = gen.backward_simulation(z, None, k, generator=torch.Generator().manual_seed(5))
        assert grad_modes == [False] * k + [True]
        assert x.grad_fn is not None


def test_backward_simulation_step_is_shared_and_uniform():
    picks = [backward_simulation_step(i, 4, seed=7) for i in range(4000)]
    assert picks == [backward_simulation_step(i, 4, seed=7) for i in range(4000)]  # any rank
    counts = torch.bincount(torch.tensor(picks), minlength=4).float() / 4000
    assert (counts - 0.25).abs().max() < 0.03


def test_bad_timesteps_are_refused():
    import pytest

    with pytest.raises(ValueError, match="decreasing"):
        Generator(MLPDenoiser(_sched()), [249, 999])


@pytest.mark.slow
def test_a_failed_release_leaves_the_previous_generator_whole(tmp_path, monkeypatch):
    from conftest import ROOT

    from dmd.generator import load_generator, save_generator
    from dmd.teachers import load_teacher

    teacher = load_teacher(str(ROOT / "experiments/checkpoints/gmm8_mlp"))
    folder = save_generator(Generator(teacher.denoiser, (999,)), teacher, tmp_path / "generator")
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with torch.no_grad():
        for p in teacher.denoiser.parameters():
            p.add_(1.0)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(teacher.scheduler), "save_pretrained", disk_full)  # after the new weights
    with pytest.raises(OSError, match="No space left"):
        save_generator(Generator(teacher.denoiser, (999,)), teacher, folder)
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generator"]  # no temporary left
    monkeypatch.undo()
    save_generator(Generator(teacher.denoiser, (250,)), teacher, folder)
    generator, _ = load_generator(folder)
    assert generator.timesteps == [250] and not (tmp_path / "generator.old").exists()
