"""The DMD LightningModule's cadence (TTUR) and its checkpointed counters."""

import math

import pytest
import pytorch_lightning as pl
import torch
from diffusers import DDPMScheduler
from torch.utils.data import DataLoader

from dmd.data import GaussianMixture
from dmd.data.mixtures import _MixtureSamples
from dmd.denoisers import MLPDenoiser
from dmd.generator import Generator
from dmd.module import DMDModule
from dmd.teachers import gaussian_mixture_teacher


def _module(ratio, steps=(999,)):
    torch.manual_seed(0)
    teacher = gaussian_mixture_teacher(GaussianMixture.ring(), DDPMScheduler())
    sched = teacher.denoiser.schedule
    gen = Generator(MLPDenoiser(sched, "v_prediction", hidden=16, depth=2), steps)
    fake = MLPDenoiser(sched, "epsilon", hidden=16, depth=2)
    return DMDModule(teacher, gen, fake, ttur_ratio=ratio, lr_generator=1e-3, lr_fake=1e-3)


def _fit(module, iterations, tmp_path, epochs=1, ckpt_path=None):
    data = DataLoader(_MixtureSamples(GaussianMixture.ring(), 4 * iterations, 0), batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False,
                         enable_progress_bar=False, enable_checkpointing=False,
                         default_root_dir=tmp_path, enable_model_summary=False)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("ratio", [1, 3, 5])
def test_ttur_cadence(tmp_path, ratio):
    module = _module(ratio)
    trainer = _fit(module, 11, tmp_path)
    assert module.iteration == 11 and module.fake_steps == 11
    assert module.generator_steps == math.ceil(11 / ratio)
    # Lightning's global_step counts both optimizers' steps (the pitfall the counters avoid).
    assert trainer.global_step == 11 + math.ceil(11 / ratio)


def test_cadence_survives_resume_in_the_middle(tmp_path):
    module = _module(3)
    trainer = _fit(module, 7, tmp_path)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    ckpt = torch.load(tmp_path / "mid.ckpt", weights_only=True)
    # Passes at batch 4 without GAN: a generator iteration runs generator, real score, fake score
    # and the fake step's denoising pass (16), the others generator and denoising (8).
    assert ckpt["dmd_counters"] == {"iteration": 7, "generator_steps": 3, "fake_steps": 7,
                                    "network_passes": 3 * 16 + 4 * 8}
    assert not any(k.startswith("real_score.") for k in ckpt["state_dict"])

    resumed = _module(3)
    _fit(resumed, 7, tmp_path, epochs=2, ckpt_path=tmp_path / "mid.ckpt")
    assert resumed.iteration == 14 and resumed.fake_steps == 14
    assert resumed.generator_steps == math.ceil(14 / 3)
    assert resumed.network_passes == 5 * 16 + 9 * 8  # counted on from the checkpoint


@pytest.mark.slow
def test_a_checkpoint_of_other_networks_is_refused_in_one_sentence(tmp_path):
    trainer = _fit(_module(3), 3, tmp_path)
    trainer.save_checkpoint(tmp_path / "small.ckpt")
    wider = _module(3)
    sched = wider.real_score.schedule
    wider.generator = Generator(MLPDenoiser(sched, "v_prediction", hidden=32, depth=2), (999,))
    with pytest.raises(ValueError, match=r"holds other networks than this run builds \(\d+ of \d+ weights differ, "
                                         r"e.g. generator\..*: \(16,\) in the checkpoint, \(32,\) here\)"):
        _fit(wider, 3, tmp_path, epochs=2, ckpt_path=tmp_path / "small.ckpt")


class _NaNNet(torch.nn.Module):  # a network whose outputs are NaN
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        out.sample = out.sample * float("nan")
        return out


def test_non_finite_loss_stops_training_before_the_update(tmp_path):
    module = _module(1)
    module.fake_score.unet = _NaNNet(module.fake_score.unet)
    before = {k: v.clone() for k, v in module.fake_score.state_dict().items()}
    with pytest.raises(FloatingPointError, match="Non-finite fake score loss .* before this update.* good state to resume from"):
        _fit(module, 3, tmp_path)
    after = module.fake_score.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_queued_finite_checks_run_before_any_save(tmp_path):
    """finite_check_every > 1 (the GPU default: no host read per update) checks the queued losses
    every N iterations and before a checkpoint is written: a non-finite loss never reaches a save."""
    from dmd.callbacks.checkpoint import IterationCheckpoint

    module = _module(1)
    module.finite_check_every = 5
    module.fake_score.unet = _NaNNet(module.fake_score.unet)
    data = DataLoader(_MixtureSamples(GaussianMixture.ring(), 40, 0), batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[IterationCheckpoint(str(tmp_path / "ckpt"), every_n_iterations=2)])
    with pytest.raises(FloatingPointError, match="fake score loss .* at iteration 0. Training stopped at "
                                                 "iteration 2, with nothing saved since"):
        trainer.fit(module, data)
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())
    finite = _module(1)  # finite losses: checked at iterations 5 and 10 and the run completes
    finite.finite_check_every = 5
    _fit(finite, 10, tmp_path / "finite")
    assert finite.iteration == 10 and finite._unchecked == []


def test_gan_head_reads_the_bottleneck_and_trains_the_fake_encoder(tiny_unet_kwargs):
    from diffusers import UNet2DModel

    from dmd.denoisers import DiffusersUNetDenoiser
    from dmd.gan import DiscriminatorHead, bottleneck_features, discriminator_logits
    from dmd.losses import gan_discriminator_loss, gan_generator_loss
    from dmd.schedule import VPSchedule

    torch.manual_seed(0)
    unet = UNet2DModel(**tiny_unet_kwargs)
    fake = DiffusersUNetDenoiser(unet, VPSchedule.from_diffusers(DDPMScheduler()), "v_prediction")
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    cond = torch.tensor([0, 1, 2, 0])
    feats = bottleneck_features(fake, x, torch.full((4,), 500), cond)
    assert feats.shape == (4, 16, 4, 4)  # mid block of the 8 -> 4 UNet, 16 channels
    head = DiscriminatorHead.for_network(unet)
    logits = discriminator_logits(fake, head, x, cond)
    assert logits.shape == (4,)
    gan_discriminator_loss(logits, logits.detach() + 1).backward(retain_graph=True)
    assert unet.down_blocks[0].resnets[0].conv1.weight.grad.abs().sum() > 0  # encoder trained
    assert all(p.grad is None for p in unet.up_blocks.parameters())  # decoder untouched
    x.grad = None
    gan_generator_loss(logits).backward()
    assert x.grad.abs().sum() > 0  # the generator's GAN loss reaches the sample


def test_gan_losses_by_hand():
    from dmd.losses import gan_discriminator_loss, gan_generator_loss

    real, fake = torch.tensor([0.0, 2.0]), torch.tensor([-1.0, 0.0])
    sp = torch.nn.functional.softplus
    assert torch.isclose(gan_generator_loss(fake), (sp(torch.tensor(1.0)) + sp(torch.tensor(0.0))) / 2)
    expected = (sp(torch.tensor(0.0)) + sp(torch.tensor(-2.0))) / 2 + (sp(torch.tensor(-1.0)) + sp(torch.tensor(0.0))) / 2
    assert torch.isclose(gan_discriminator_loss(real, fake), expected)


def _gan_module(tiny_unet_kwargs, **kwargs):
    """A class-conditional tiny-UNet teacher (1x8x8) with the GAN on, generator and fake score
    copies of it; one iteration is one generator step (ratio 1)."""
    from diffusers import UNet2DModel

    from dmd.denoisers import DiffusersUNetDenoiser
    from dmd.module import copy_denoiser
    from dmd.schedule import VPSchedule
    from dmd.teachers import Teacher

    torch.manual_seed(0)
    unet = UNet2DModel(**tiny_unet_kwargs)
    den = DiffusersUNetDenoiser(unet, VPSchedule.from_diffusers(DDPMScheduler()), "v_prediction")
    teacher = Teacher(den, (1, 8, 8), num_classes=2)
    return DMDModule(teacher, Generator(copy_denoiser(den), (999,)), copy_denoiser(den),
                     guidance_scale=2.0, ttur_ratio=1, gan_discriminator_weight=1e-2, **kwargs)


def _one_generator_step(module, tmp_path):
    from torch.utils.data import TensorDataset

    data = TensorDataset(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]))
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, default_root_dir=tmp_path,
                         enable_model_summary=False)
    trainer.fit(module, DataLoader(data, batch_size=4))
    return {k: float(v) for k, v in trainer.callback_metrics.items()
            if k.startswith("grad_norm/x/") or k == "grad_norm/generator"}


def test_each_terms_gradient_wrt_the_generator_output_is_logged_and_weighted(tiny_unet_kwargs, tmp_path):
    one = _one_generator_step(_gan_module(tiny_unet_kwargs, gan_generator_weight=1e-3), tmp_path)
    two = _one_generator_step(_gan_module(tiny_unet_kwargs, gan_generator_weight=2e-3, dm_weight=3.0), tmp_path)
    assert set(one) == {"grad_norm/x/dm", "grad_norm/x/gan", "grad_norm/generator"}
    assert all(v > 0 for v in one.values())
    # The same first step (same seeds, same weights): each norm scales with its own weight only.
    assert math.isclose(two["grad_norm/x/gan"], 2 * one["grad_norm/x/gan"], rel_tol=1e-4)
    assert math.isclose(two["grad_norm/x/dm"], 3 * one["grad_norm/x/dm"], rel_tol=1e-4)


def test_gan_balance_dimension_and_adaptive(tiny_unet_kwargs, tmp_path):
    dim = _gan_module(tiny_unet_kwargs, gan_generator_weight=3e-3, gan_balance="dimension")
    assert math.isclose(dim.gan_weight, 3e-3 * 64 * 64 * 3 / (8 * 8))  # stated at ImageNet-64
    generator_norms = []
    for ratio in (0.5, 2.0):
        norms = _one_generator_step(_gan_module(tiny_unet_kwargs, gan_generator_weight=1e-3,
                                                gan_balance="adaptive", gan_grad_ratio=ratio), tmp_path)
        assert math.isclose(norms["grad_norm/x/gan"], ratio * norms["grad_norm/x/dm"], rel_tol=1e-4)
        generator_norms.append(norms["grad_norm/generator"])
    assert generator_norms[0] != pytest.approx(generator_norms[1], rel=1e-3)  # the rescaled gradient is the one applied
    with pytest.raises(ValueError, match="gan_balance"):
        _gan_module(tiny_unet_kwargs, gan_generator_weight=1e-3, gan_balance="auto")


def test_gan_generator_loss_trains_the_generator_only_and_changes_no_number(tiny_unet_kwargs, tmp_path,
                                                                            monkeypatch):
    """The generator's GAN term backpropagates to the sample only (no discriminator gradients
    that the fake-score step would clear); the generator's update is bit-identical to
    backpropagating into the discriminator too."""
    import contextlib

    def run(freeze: bool):
        module = _gan_module(tiny_unet_kwargs, gan_generator_weight=1e-2)
        if not freeze:
            monkeypatch.setattr(module, "discriminator_frozen", contextlib.nullcontext)
        had_grads = []
        fake_step = module.fake_score_step

        def spy(*args, **kwargs):  # the first iteration's generator step has just run
            params = [*module.fake_score.parameters(), *module.gan_head.parameters()]
            had_grads.append(any(p.grad is not None for p in params))
            return fake_step(*args, **kwargs)

        monkeypatch.setattr(module, "fake_score_step", spy)
        _one_generator_step(module, tmp_path)
        return had_grads[0], module.generator.state_dict()

    frozen_grads, frozen = run(True)
    full_grads, full = run(False)
    assert (frozen_grads, full_grads) == (False, True)
    assert all(torch.equal(frozen[k], full[k]) for k in full)


def test_clipping_with_the_logged_norm_is_lightnings_clipping(tmp_path, monkeypatch):
    """The update clips with the gradient norm it has computed for the log (no second norm):
    bit-identical to Lightning's clip_gradients, with clipping active at every step."""
    from dmd.student import StudentModule

    def train(lightning: bool):
        module = _module(1)
        module.grad_clip = 1e-3
        if lightning:
            monkeypatch.setattr(StudentModule, "sharded", property(lambda self: True))
        _fit(module, 4, tmp_path)
        monkeypatch.undo()
        return module.generator.state_dict(), module.fake_score.state_dict()

    ours, theirs = train(False), train(True)
    for mine, lightning in zip(ours, theirs):
        assert all(torch.equal(mine[k], lightning[k]) for k in mine)
    unclipped = _module(1)
    _fit(unclipped, 4, tmp_path)
    assert not all(torch.equal(ours[0][k], v) for k, v in unclipped.generator.state_dict().items())


def test_fused_adamw_is_opt_in_and_equal_up_to_rounding(tmp_path):
    default, fused = _module(1), _module(1)
    fused.fused = True
    _fit(default, 4, tmp_path)
    _fit(fused, 4, tmp_path)
    assert [o.defaults["fused"] for o in fused.optimizers()] == [True, True]
    assert not any(o.defaults["fused"] for o in default.optimizers())
    mine, theirs = fused.generator.state_dict(), default.generator.state_dict()
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], rtol=1e-4, atol=1e-6)


def test_compile_networks_compiles_every_network_in_place(tiny_unet_kwargs):
    from dmd.build import compile_networks

    module = _gan_module(tiny_unet_kwargs, gan_generator_weight=1e-3)
    names = sorted(module.state_dict())
    compiled = compile_networks(module, backend="aot_eager")
    assert len(compiled) == 3  # teacher, generator, fake score: each its own UNet
    assert all(n._compiled_call_impl is not None for n in compiled)
    assert sorted(module.state_dict()) == names  # in place: checkpoints keep their keys
