"""The sampling CLI contract: python -m dmd.sample num_samples=N out=FILE.npz seed=S."""

import numpy as np
import pytest

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
