"""One DMD iteration checked exactly: how the module wires the scores, the losses and the optimizers.

Stub networks on 2-D samples keep every check to a fraction of a second. ``Recorder`` wraps a
denoiser and keeps every network call it answers, so each test recomputes by hand, from the
recorded inputs, what the iteration must have done (which makes the checks independent of the
order in which the module draws its noise and timesteps), and compares it with the gradients
and parameters the optimizers saw.
"""

import copy

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dmd.denoisers import Denoiser, MLPDenoiser
from dmd.gan import bottleneck_features, discriminator_logits
from dmd.generator import Generator, backward_simulation_step
from dmd.module import DMDModule, trainable
from dmd.schedule import VPSchedule
from dmd.teachers import Teacher

CLASSES, BATCH = 3, 4
LABELS = torch.tensor([0, 1, 2, 1])


class Recorder(Denoiser):
    """A denoiser that answers like ``inner`` and records each call (inputs, grad mode)."""

    def __init__(self, inner: Denoiser):
        super().__init__(inner.schedule, inner.prediction_type)
        self.inner, self.calls = inner, []

    @property
    def unet(self):  # the GAN head reads the inner network's bottleneck
        return self.inner.unet

    def network_output(self, x_t, t, cond):
        self.calls.append({"x_t": x_t.detach().clone(), "t": t.clone(),
                           "cond": None if cond is None else cond.clone(), "grad": torch.is_grad_enabled()})
        return self.inner.network_output(x_t, t, cond)


class OffsetDenoiser(Denoiser):
    """x0 = scale * x_t + offset, with a per-sample offset: the gradient of any loss with respect
    to the generator's output is exactly ``offset.grad``."""

    def __init__(self, schedule, batch: int = BATCH, dim: int = 2):
        super().__init__(schedule, "sample")
        self.scale = nn.Parameter(torch.full((dim,), 0.5))
        self.offset = nn.Parameter(torch.zeros(batch, dim))

    def network_output(self, x_t, t, cond):
        return self.scale * x_t + self.offset


def _schedule():
    return VPSchedule.from_diffusers(DDPMScheduler())


def _module(**kwargs) -> DMDModule:
    """A class-conditional stub teacher (random MLP), an offset generator and an MLP fake score."""
    torch.manual_seed(0)
    sched = _schedule()
    teacher = Teacher(Recorder(MLPDenoiser(sched, "epsilon", hidden=16, depth=2, num_classes=CLASSES)),
                      (2,), num_classes=CLASSES)
    fake = Recorder(MLPDenoiser(sched, "v_prediction", hidden=16, depth=2, num_classes=CLASSES))
    generator = Generator(Recorder(OffsetDenoiser(sched)), (999,))
    defaults = dict(guidance_scale=2.5, ttur_ratio=1, lr_generator=1e-2, lr_fake=1e-2, grad_clip=1e9)
    return DMDModule(teacher, generator, fake, **{**defaults, **kwargs})


def _real_batch(n: int = BATCH):
    return torch.full((n, 2), 3.0) + 0.1 * torch.randn(n, 2, generator=torch.Generator().manual_seed(1))


def _fit(module, tmp_path, iterations: int = 1):
    data = TensorDataset(_real_batch(BATCH * iterations), LABELS.repeat(iterations))
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, default_root_dir=tmp_path, enable_model_summary=False)
    trainer.fit(module, DataLoader(data, batch_size=BATCH))
    return trainer


def _state(*modules):
    return [p.detach().clone() for m in modules for p in m.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_the_generator_gradient_is_the_guided_dm_gradient_times_its_weight(tmp_path):
    module = _module(dm_weight=0.7)
    real0, fake0 = copy.deepcopy(module.teacher.denoiser.inner), copy.deepcopy(module.fake_score.inner)
    _fit(module, tmp_path)
    gen, real, fake = module.generator.denoiser, module.teacher.denoiser, module.fake_score
    noise = gen.calls[0]["x_t"]
    x = 0.5 * noise  # the generator's output before its update (scale 0.5, offset 0)

    # The real score is asked once, for the conditional and the null class together (CFG).
    call = real.calls[0]
    x_t, t = call["x_t"][:BATCH], call["t"][:BATCH]
    assert torch.equal(call["x_t"][BATCH:], x_t) and torch.equal(call["t"][BATCH:], t)
    assert torch.equal(call["cond"], torch.cat([LABELS, torch.full((BATCH,), CLASSES)]))
    # x_t is x noised to t in [0.02 T, 0.98 T]
    assert ((t >= 20) & (t <= 980)).all()
    with torch.no_grad():
        cond_x0 = real0(x_t, t, LABELS).double()
        null_x0 = real0(x_t, t, torch.full((BATCH,), CLASSES)).double()
        guided = null_x0 + 2.5 * (cond_x0 - null_x0)
        # The fake score is asked at the same noised sample, with the condition, unguided.
        assert torch.equal(fake.calls[0]["x_t"], x_t) and torch.equal(fake.calls[0]["cond"], LABELS)
        fake_x0 = fake0(x_t, t, LABELS).double()
    grad = (fake_x0 - guided) / (x.double() - guided).abs().mean(dim=1, keepdim=True)
    expected = 0.7 * grad / x.numel()  # d(dm_weight * 0.5 * mse(x, x - grad)) / dx
    torch.testing.assert_close(gen.inner.offset.grad.double(), expected, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(gen.inner.scale.grad.double(), (expected * noise).sum(0), rtol=1e-4, atol=1e-9)


def test_the_fake_score_learns_to_denoise_the_detached_generator_samples(tmp_path):
    module = _module()
    fake0 = copy.deepcopy(module.fake_score.inner)
    _fit(module, tmp_path)
    fake, sched = module.fake_score, module.fake_score.schedule
    x = 0.5 * module.generator.denoiser.calls[0]["x_t"]  # this iteration's generator samples
    call = fake.calls[-1]  # the fake score's own step (after the DM loss's query)
    assert call["grad"] and torch.equal(call["cond"], LABELS)
    x_t, t = call["x_t"], call["t"]
    a, s = sched.alpha_sigma(t, x)
    eps = (x_t.double() - a * x.double()) / s  # the noise that makes x_t from the generator sample
    target = sched.target(x.double(), eps, t, "v_prediction")
    loss = F.mse_loss(fake0.network_output(x_t, t, LABELS).float(), target.float())
    loss.backward()
    for hand, trained in zip(fake0.parameters(), fake.inner.parameters(), strict=True):
        torch.testing.assert_close(trained.grad, hand.grad, rtol=1e-4, atol=1e-7)


def test_the_fake_score_step_adds_the_discriminator_loss_with_its_weight(tmp_path):
    module = _module(gan_discriminator_weight=0.3)
    fake0, head0 = copy.deepcopy(module.fake_score.inner), copy.deepcopy(module.gan_head)
    _fit(module, tmp_path)
    fake, sched = module.fake_score, module.fake_score.schedule
    x = 0.5 * module.generator.denoiser.calls[0]["x_t"]
    denoise, on_real, on_fake = fake.calls[-3:]  # the fake step: denoising, then D(real), D(fake)
    a, s = sched.alpha_sigma(denoise["t"], x)
    eps = (denoise["x_t"].double() - a * x.double()) / s
    target = sched.target(x.double(), eps, denoise["t"], "v_prediction")
    loss = F.mse_loss(fake0.network_output(denoise["x_t"], denoise["t"], LABELS).float(), target.float())

    def logits(call):  # the head on the fake network's bottleneck (MLPNet: its ``mid`` layer)
        return head0(bottleneck_features(fake0, call["x_t"], call["t"], call["cond"]))

    loss = loss + 0.3 * (F.softplus(-logits(on_real)).mean() + F.softplus(logits(on_fake)).mean())
    loss.backward()
    for hand, trained in zip([*fake0.parameters(), *head0.parameters()],
                             [*fake.inner.parameters(), *module.gan_head.parameters()], strict=True):
        torch.testing.assert_close(trained.grad, hand.grad, rtol=1e-4, atol=1e-7)


def test_backward_simulation_trains_the_step_the_iteration_draws(tmp_path):
    module = _module()
    module.generator = Generator(module.generator.denoiser, (999, 749, 499, 249))
    _fit(module, tmp_path, iterations=6)
    modes = [c["grad"] for c in module.generator.denoiser.calls]
    expected = [m for i in range(6) for m in [False] * backward_simulation_step(i, 4, 0) + [True]]
    assert modes == expected


def test_the_losses_noise_to_timesteps_over_their_ranges(tmp_path):
    """The fake score learns every noise level in [0, T); DM asks the scores in [0.02 T, 0.98 T]."""
    module = _module()
    _fit(module, tmp_path, iterations=8)
    calls = module.fake_score.calls  # per iteration: the DM query (no grad), then the fake step
    fake_t = torch.cat([c["t"] for c in calls if c["grad"]])
    dm_t = torch.cat([c["t"] for c in calls if not c["grad"]])
    assert len(fake_t) == len(dm_t) == 8 * BATCH
    assert fake_t.min() < 200 and fake_t.max() > 800 and fake_t.unique().numel() > 20
    assert dm_t.min() >= 20 and dm_t.max() <= 980 and dm_t.unique().numel() > 20


def test_each_optimizer_steps_only_the_networks_it_owns(tmp_path):
    module = _module(gan_generator_weight=0.5, gan_discriminator_weight=0.5)
    gen, fake, head, real = module.generator, module.fake_score, module.gan_head, module.real_score
    before = {"gen": _state(gen), "fake": _state(fake, head), "real": _state(real)}
    seen = {}
    fake_score_step = module.fake_score_step

    def probe(*args, **kwargs):  # between the generator step and the fake-score step
        seen.update(gen=_state(gen), fake=_state(fake, head), real=_state(real))
        return fake_score_step(*args, **kwargs)

    module.fake_score_step = probe
    _fit(module, tmp_path)
    # The generator step (DM + GAN generator loss) moves the generator only...
    assert not _same(seen["gen"], before["gen"])
    assert _same(seen["fake"], before["fake"]), "the generator step changed the fake score or GAN head"
    # ...the fake-score step (denoising + discriminator loss) the fake score and the head only.
    assert _same(_state(gen), seen["gen"]), "the fake-score step changed the generator"
    after = _state(fake, head)
    assert all(not torch.equal(a, b) for a, b in zip(after, seen["fake"]))  # every fake/head tensor trained
    assert _same(_state(real), before["real"])


def test_one_discriminator_step_separates_real_from_fake_logits(tmp_path):
    # Low noise levels for the discriminator, so that its inputs still tell real from fake.
    module = _module(gan_discriminator_weight=10.0, gan_t_range=(0.0, 0.05), lr_generator=0.0, lr_fake=0.1)
    real_x = _real_batch()
    fake_x = 0.5 * torch.randn(BATCH, 2, generator=torch.Generator().manual_seed(2))

    def gap():  # mean logit of real minus fake samples, at the same noise
        with torch.no_grad():
            real, fake = (discriminator_logits(module.fake_score, module.gan_head, x, LABELS, (0.0, 0.05),
                                               generator=torch.Generator().manual_seed(3)) for x in (real_x, fake_x))
        return (real - fake).mean().item()

    before = gap()
    _fit(module, tmp_path)
    assert gap() > before + 0.02, (before, gap())


def test_the_released_generator_has_the_ema_weights(tmp_path):
    module = _module(ema_decay=0.5)
    _fit(module, tmp_path, iterations=3)
    released = module.release_generator()
    shadow = module.ema.shadow_params
    assert _same(trainable(released), shadow)
    assert not _same(trainable(module.generator), shadow)  # the EMA weights are not the live ones


def test_generator_steps_follow_the_ttur_ratio(tmp_path):
    module = _module(ttur_ratio=3)
    iterations = []
    generator_step = module.generator_step

    def probe(*args, **kwargs):
        iterations.append(module.iteration)
        return generator_step(*args, **kwargs)

    module.generator_step = probe
    _fit(module, tmp_path, iterations=7)
    assert iterations == [0, 3, 6] and module.fake_steps == 7


def test_regression_targets_stay_aligned_with_their_noise_and_labels():
    """Pairs whose image is a known function of (noise, label): every batch the regression
    term draws must pair the generator's input with that input's own teacher image."""
    n = 50
    noise = torch.randn(n, 2)
    labels = torch.randint(0, CLASSES, (n,))
    images = 3 * noise + labels[:, None]
    seen = []

    def distance(x, target):
        seen.append(target)
        return (x - target).pow(2).sum(1)

    module = _module(regression_weight=1.0, regression_distance=distance, regression_batch_size=BATCH,
                     regression_pairs={"noise": noise, "images": images, "labels": labels})
    for _ in range(5):
        module.regression_term()
    calls = module.generator.denoiser.calls
    assert len(calls) == len(seen) == 5
    for call, target in zip(calls, seen):
        torch.testing.assert_close(target, 3 * call["x_t"] + call["cond"][:, None])


def test_the_regression_term_enters_the_generator_gradient_with_its_weight(tmp_path):
    n = 20
    noise, labels = torch.randn(n, 2), torch.randint(0, CLASSES, (n,))
    pairs = {"noise": noise, "images": 3 * noise + labels[:, None], "labels": labels}
    module = _module(dm_weight=0.0, regression_weight=0.3, regression_batch_size=BATCH, regression_pairs=pairs,
                     regression_distance=lambda x, target: (x - target).pow(2).sum(1))
    _fit(module, tmp_path)
    call = module.generator.denoiser.calls[1]  # [0]: the DM sample, [1]: the regression batch
    out = 0.5 * call["x_t"]  # the generator's answer before its update
    target = 3 * call["x_t"] + call["cond"][:, None]
    expected = 0.3 * 2 * (out - target) / BATCH  # d(0.3 * mean_i |out_i - target_i|^2) / d out
    torch.testing.assert_close(module.generator.denoiser.inner.offset.grad, expected, rtol=1e-4, atol=1e-8)
