"""Acceptance on the analytic mixture: the gmm_dmd2 preset's one-step student matches gmm8."""

import json

import pytest

from dmd.data import GaussianMixture
from dmd.draw import sample_generator
from dmd.generator import load_generator
from dmd.metrics.mixture import energy_distance, mixture_report


def test_energy_distance_is_zero_for_equal_sets_and_grows_with_a_shift():
    x = GaussianMixture.ring().sample(2000)[0]
    assert energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    small = energy_distance(x, x + 0.1)
    assert 0 < small < energy_distance(x, x + 0.5)


@pytest.mark.slow
def test_gmm_dmd2_one_step_student_covers_every_mode_sharply(cli, tmp_path):
    run = tmp_path / "gmm_dmd2"
    cli("dmd.train", "experiment=gmm_dmd2", "logger=none", "trainer.enable_progress_bar=false",
        "eval.num_samples=1000", f"hydra.run.dir={run}", timeout=1200)
    generator, info = load_generator(run)
    assert generator.num_steps == 1
    samples, _ = sample_generator(generator, info, 10_000, seed=123, progress=False)
    report = mixture_report(samples, GaussianMixture.ring(), num_energy=4000, seed=1)
    assert all(0.09 <= s <= 0.16 for s in report["mode_shares"]), report
    assert report["median_dist_to_mode"] <= 0.2, report
    assert report["energy_distance"] <= 0.03, report
    assert json.loads((run / "results.json").read_text())["iterations"] > 0
