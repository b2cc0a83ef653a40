"""Teacher pretraining: a few steps on a tiny UNet, saved and reloaded like a hub model."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from dmd.teachers import load_teacher


@pytest.mark.slow
def test_pretrain_saves_a_loadable_teacher_and_resumes(cli, tmp_path):
    run = tmp_path / "run"
    args = ["network=tiny_unet", "trainer=smoke", f"hydra.run.dir={run}", "grid.num_samples=4",
            "grid.steps=2", "data.batch_size=8"]
    cli("dmd.pretrain", *args)
    teacher_dir = run / "teacher"
    unet = UNet2DModel.from_pretrained(teacher_dir / "unet")
    sched = DDPMScheduler.from_pretrained(teacher_dir / "scheduler")
    assert unet.config.num_class_embeds == 11
    assert sched.config.prediction_type == "v_prediction"
    assert (run / "samples.png").is_file() and (run / "config_resolved.yaml").is_file()
    assert json.loads((teacher_dir / "training.json").read_text())["optimizer_steps"] == 3
    first = {k: v.clone() for k, v in unet.state_dict().items()}

    # The same command with a longer schedule resumes from last.ckpt instead of restarting.
    proc = cli("dmd.pretrain", *args, "trainer.max_steps=5")
    assert "Resuming from" in proc.stdout + proc.stderr
    assert json.loads((teacher_dir / "training.json").read_text())["optimizer_steps"] == 5
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 5 and "ema" in ckpt
    second = UNet2DModel.from_pretrained(teacher_dir / "unet").state_dict()
    assert any(not torch.equal(first[k], second[k]) for k in first)

    teacher = load_teacher(str(teacher_dir))
    assert teacher.num_classes == 10 and teacher.sample_shape == (1, 28, 28)
    assert not any(p.requires_grad for p in teacher.denoiser.parameters())

    # The sampling CLI writes the documented .npz from this teacher.
    out = tmp_path / "s.npz"
    cli("dmd.sample", f"teacher.path={teacher_dir}", "num_samples=12", f"out={out}", "seed=3",
        "sampler.steps=2", f"hydra.run.dir={tmp_path}/sample")
    data = np.load(out)
    assert data["arr_0"].shape == (12, 28, 28, 1) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].dtype == np.int64 and data["arr_1"].tolist() == [i % 10 for i in range(12)]
    assert out.with_suffix(".png").is_file()


def test_missing_teacher_folder_is_a_clear_error(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_teacher(str(tmp_path / "nope"))
    (tmp_path / "unet").mkdir()
    with pytest.raises(OSError, match="diffusion_pytorch_model.safetensors"):
        load_teacher(str(tmp_path))
