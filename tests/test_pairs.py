"""Regression pairs are cached by what they are (teacher weights, sampler), not where the teacher lives."""

import shutil

import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from dmd.regression_pairs import pairs_for_config


def test_the_pair_cache_is_shared_by_copies_of_one_teacher(tmp_path):
    copy = tmp_path / "teacher_copy"
    shutil.copytree(ROOT / "experiments/checkpoints/fmnist_teacher", copy)
    made = []
    for path in (ROOT / "experiments/checkpoints/fmnist_teacher", copy):
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[
                "experiment=fmnist_dmd", f"teacher.path={path}", f"paths.cache_dir={tmp_path}/cache",
                "algorithm.regression.num_pairs=4", "algorithm.regression.steps=1"])
        made.append(pairs_for_config(cfg, instantiate(cfg.teacher)))
    files = list((tmp_path / "cache" / "pairs").glob("*"))
    assert sorted(f.suffix for f in files) == [".json", ".safetensors"]  # one set, no temporary left
    assert all(made[0][k].equal(made[1][k]) for k in made[0])


def test_each_pair_is_the_teachers_sample_for_its_own_noise_and_label():
    """Pairs drawn in batches: pair i's image is what the teacher's sampler makes of noise i and label i."""
    import torch
    from diffusers import DDPMScheduler

    from dmd.denoisers import MLPDenoiser
    from dmd.regression_pairs import make_pairs
    from dmd.sampling import sample
    from dmd.schedule import VPSchedule
    from dmd.teachers import Teacher

    torch.manual_seed(0)
    denoiser = MLPDenoiser(VPSchedule.from_diffusers(DDPMScheduler()), "epsilon", hidden=16, depth=2, num_classes=3)
    teacher = Teacher(denoiser.requires_grad_(False), (2,), num_classes=3)
    pairs = make_pairs(teacher, 7, "heun", 2, guidance_scale=2.0, batch_size=3)
    assert torch.equal(pairs["labels"], teacher.labels(7))
    for i in range(7):
        alone = sample(denoiser, pairs["noise"][i:i + 1], pairs["labels"][i:i + 1], teacher.null_condition(1),
                       "heun", 2, 2.0)
        torch.testing.assert_close(pairs["images"][i:i + 1], alone)


@pytest.mark.slow
def test_a_truncated_pair_cache_is_recomputed(tmp_path):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=fmnist_dmd", f"paths.cache_dir={tmp_path}",
                                          "algorithm.regression.num_pairs=4", "algorithm.regression.steps=1"])
    teacher = instantiate(cfg.teacher)
    made = pairs_for_config(cfg, teacher)
    (path,) = (tmp_path / "pairs").glob("*.safetensors")
    whole = path.read_bytes()
    for cut in (0, 40, len(whole) // 2):
        path.write_bytes(whole[:cut])
        again = pairs_for_config(cfg, teacher)
        assert all(made[k].equal(again[k]) for k in made) and path.read_bytes() == whole
