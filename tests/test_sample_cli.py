"""The sampling CLI contract: python -m dmd.sample num_samples=N out=FILE.npz seed=S."""

import numpy as np
import pytest
from conftest import ROOT

from dmd.data import GaussianMixture


@pytest.mark.slow
def test_gmm_samples_are_points_and_seeded(cli, tmp_path):
    outs = []
    for i, seed in enumerate((1, 1, 2)):
        out = tmp_path / f"g{i}.npz"
        cli("dmd.sample", "teacher=gmm8", "num_samples=2000", f"out={out}", f"seed={seed}",
            "sampler=heun", "sampler.steps=25", f"hydra.run.dir={tmp_path}/run{i}")
        outs.append(np.load(out))
    a, b, c = outs
    assert a["arr_0"].shape == (2000, 2) and a["arr_0"].dtype == np.float32
    assert (a["arr_1"] == -1).all() and a["arr_1"].dtype == np.int64
    assert np.array_equal(a["arr_0"], b["arr_0"]) and not np.array_equal(a["arr_0"], c["arr_0"])
    means = GaussianMixture.ring().means.numpy()
    dist = np.linalg.norm(a["arr_0"][:, None] - means[None], axis=-1)
    assert np.median(dist.min(1)) < 0.2
    assert (tmp_path / "g0.png").is_file()
    assert (tmp_path / "run0" / "config_resolved.yaml").is_file()


def test_relative_out_is_relative_to_the_working_directory(cli, tmp_path):
    cli("dmd.sample", "teacher=gmm8", "num_samples=5", "out=rel/x.npz", "sampler.steps=2",
        f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert (tmp_path / "rel" / "x.npz").is_file()


def _nan_copy(tmp_path):
    """The bundled 2-D teacher with one weight turned NaN (as a flipped exponent bit does)."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    shutil.copytree(ROOT / "experiments/checkpoints/gmm8_mlp", folder)
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(path)
    name = sorted(weights)[0]
    weights[name].view(-1)[3] = float("nan")
    save_file(weights, path)
    return folder, name


@pytest.mark.slow
def test_weights_with_nan_are_refused_before_sampling(cli, tmp_path):
    folder, name = _nan_copy(tmp_path)
    out = tmp_path / "x.npz"
    proc = cli("dmd.sample", "teacher=gmm8_mlp", f"teacher.path={folder}", "num_samples=8", f"out={out}",
               f"hydra.run.dir={tmp_path}/run", check=False)
    assert proc.returncode != 0 and "holds non-finite weights (NaN/Inf) in 1 tensor(s), e.g. " + name in proc.stderr
    assert not out.exists()


def test_samples_with_nan_are_never_returned():
    import torch

    from dmd.draw import draw_samples
    from dmd.teachers import load_teacher

    teacher = load_teacher(str(ROOT / "experiments/checkpoints/gmm8_mlp"))
    noise = torch.randn(6, 2)
    fine, _ = draw_samples(teacher, lambda z, c, u: z * 2, noise, batch_size=4, progress=False)
    assert torch.equal(fine, noise * 2)
    with pytest.raises(FloatingPointError, match="samples 4-5 contain NaN/Inf"):
        draw_samples(teacher, lambda z, c, u: z if z.shape[0] == 4 else z * float("nan"), noise,
                     batch_size=4, progress=False)


@pytest.mark.parametrize("keep", [0.001, 0.5])
def test_a_truncated_weights_file_is_named(tmp_path, keep):
    import shutil

    from dmd.teachers import load_teacher

    folder = tmp_path / "cut"
    shutil.copytree(ROOT / "experiments/checkpoints/gmm8_mlp", folder)
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(OSError, match=rf"{path} is truncated or corrupt \({int(len(data) * keep)} bytes"):
        load_teacher(str(folder))
