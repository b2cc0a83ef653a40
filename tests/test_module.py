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
    assert ckpt["dmd_counters"] == {"iteration": 7, "generator_steps": 3, "fake_steps": 7}
    assert not any(k.startswith("real_score.") for k in ckpt["state_dict"])

    resumed = _module(3)
    _fit(resumed, 7, tmp_path, epochs=2, ckpt_path=tmp_path / "mid.ckpt")
    assert resumed.iteration == 14 and resumed.fake_steps == 14
    assert resumed.generator_steps == math.ceil(14 / 3)
